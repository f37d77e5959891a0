"""moetool.runtime.quant.bnb: 4-bit (and int8) MoE experts, not just nn.Linear.

Tiny seeded models built from configs here (Mixtral, DeepSeek-V3, gpt-oss: hidden 64, 2 layers,
8 experts, expert width 128) check that the fused 3-D experts really end up quantized (bytes vs
bf16), that outputs stay close to the unquantized model, that the plain BitsAndBytesConfig trap
is real (so the fix matters), and that a missing backend skips here / raises a one-line error.

Run as a script to measure what docs/quantization.md reports:

    .venv/bin/python tests/test_quant.py --measure [--steps 200] [--families mixtral,...] [--cache DIR] [--json]
    .venv/bin/python tests/test_quant.py --memory    # peak memory of each load, ~700 MB checkpoint
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running as a script
    sys.path.insert(0, str(ROOT))

from bnb_paths import (PATHS, assert_path_taken, cpu_has_avx512bf16, force_cpu_path,  # noqa: E402
                       linear4bit_layers, reference_packed_gemv)
from moetool.runtime.quant import bnb as quant  # noqa: E402
from moetool.errors import MoetoolError  # noqa: E402

FIXTURES = ROOT / "fixtures"
SEED = 1234
FAMILIES = ("mixtral", "deepseek_v3", "gpt_oss")

# Tolerances: measured on these seeded models (CPU, bitsandbytes 0.50.2), with margin.
# NF4 at blocksize 64 is ~9% relative error per Gaussian weight; an experts module chains
# gate/up, the gating product and down, so its output is off by ~13-16% (the same as three
# bitsandbytes Linear4bit layers would be: the codes are bitsandbytes' own, see
# test_codes_are_bitsandbytes_codes). Random tiny models have near-uniform next-token
# distributions, so their KL is tiny; trained models are measured in docs/quantization.md.
EXPERTS_REL_ERR_4BIT = 0.20  # measured 0.159/0.159 mixtral, 0.163 deepseek_v3, 0.128/0.129 gpt_oss
EXPERTS_REL_ERR_8BIT = 0.02  # measured 0.011-0.0125
LOGITS_KL_4BIT = 0.005  # mean KL(bf16 || experts-nf4) per token, measured 1e-5 .. 2e-4
RATIO_MAX = 0.30  # expert bytes vs bf16: acceptance criterion; NF4 + float32 absmax/64 = 0.28125


# -- tiny models ---------------------------------------------------------------------------------------------
def tiny_config(family: str):
    from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=False)
    if family == "mixtral":
        return MixtralConfig(**common, intermediate_size=128, num_key_value_heads=2, num_local_experts=8,
                             num_experts_per_tok=2)
    if family == "deepseek_v3":
        return DeepseekV3Config(**common, intermediate_size=128, moe_intermediate_size=128, num_key_value_heads=4,
                                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                                routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=16, rope_scaling=None, num_nextn_predict_layers=0)
    if family == "gpt_oss":
        return GptOssConfig(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                            num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


_MODELS: dict = {}


def tiny_model(family: str, dtype=torch.bfloat16):
    """A fresh copy of the seeded tiny model (built once per process)."""
    from transformers import AutoModelForCausalLM

    key = (family, dtype)
    if key not in _MODELS:
        torch.manual_seed(SEED)
        with _quiet():
            _MODELS[key] = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype).eval()
    return copy.deepcopy(_MODELS[key])


class _quiet:
    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        self.bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)
        if self.bars:
            hf_logging.enable_progress_bar()


def tokens(n: int = 2, length: int = 24, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (n, length), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits.float()


def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over tokens of KL(ref || other) of the next-token distributions."""
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def rel(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((other.float() - ref.float()).norm() / ref.float().norm())


@torch.no_grad()
def experts_errors(model, quantized, ids) -> list[float]:
    """Relative error of each experts module's output, fed the unquantized model's own inputs."""
    inputs = {}
    hooks = []
    for name, module, _ in quant.expert_modules(model):
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: inputs.__setitem__(name, (args, kwargs)), with_kwargs=True))
    model(ids)
    for h in hooks:
        h.remove()
    qmods = {name: m for name, m, _ in quant.expert_modules(quantized)}
    fmods = {name: m for name, m, _ in quant.expert_modules(model)}
    return [rel(fmods[n](*a, **k), qmods[n](*a, **k)) for n, (a, k) in inputs.items()]


def _backend_ok() -> bool:
    return quant.backend_status("cpu")["available"]


needs_bnb_cpu = pytest.mark.skipif(not _backend_ok(), reason="bitsandbytes 4-bit does not run on this CPU: "
                                   + (quant.backend_status("cpu")["reason"] or "?"))


# -- import ------------------------------------------------------------------------------------------------------
def test_import_is_light():
    code = "import sys, moetool.runtime.quant.bnb; print(sorted(m for m in ('torch', 'bitsandbytes', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""


# -- the trap ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mixtral-bf16")
    tiny_model("mixtral").save_pretrained(path)
    return path


@needs_bnb_cpu
def test_plain_bitsandbytes_leaves_experts_in_full_precision(mixtral_checkpoint):
    """The trap (bitsandbytes #1849): only nn.Linear is quantized, the fused experts are not."""
    trap, report = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16", quantize_experts=False)
    experts = trap.model.layers[0].mlp.experts
    assert type(trap.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert isinstance(experts.gate_up_proj, torch.nn.Parameter) and experts.gate_up_proj.dtype == torch.bfloat16
    sizes = quant.expert_weight_bytes(trap)
    assert sizes["expert_ratio_vs_bf16"] == 1.0 and sizes["experts_quantized"] == "none"
    assert sizes["quantization"] == "bnb-nf4, experts bfloat16" == report["quantization"]
    assert sizes["expert_share"] > 0.5  # the experts are most of the model, left at 16 bits


@needs_bnb_cpu
def test_load_in_4bit_quantizes_experts_while_loading(mixtral_checkpoint):
    ref = _load_plain(mixtral_checkpoint)
    model, report = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16")
    assert report["quantization"] == "bnb-nf4" and report["linear"] == report["experts"] == "nf4"
    assert report["experts_quantized_while_loading"] == 4 and report["experts_quantized_after_loading"] == 0
    assert report["expert_ratio_vs_bf16"] <= RATIO_MAX and report["experts_forward"] == "eager"
    assert report["weight_bytes"] < 0.5 * quant.expert_weight_bytes(ref)["weight_bytes"]
    assert model.moetool_quantization == "bnb-nf4"
    ids = tokens()
    # the experts alone: what the plain config would have left in bf16
    assert max(experts_errors(ref, model, ids)) < EXPERTS_REL_ERR_4BIT
    assert torch.isfinite(logits(model, ids)).all()


@needs_bnb_cpu
def test_load_in_4bit_per_expert_checkpoint():
    """The bundled fixture stores experts per expert (w1/w2/w3): transformers fuses them while
    loading, and the fused tensor is what gets quantized."""
    model, report = quant.load_in_4bit(FIXTURES / "tiny-mixtral", dtype="auto")
    assert report["experts_quantized_while_loading"] == 4 and report["experts"] == "nf4"
    # hidden 32: no attention projection fits bitsandbytes' 4-bit CPU kernel; they stay float32 on CPU
    assert report["quantization"] == ("experts-nf4" if report["device"] == "cpu" else "bnb-nf4")
    assert report["dtype"] == "auto" and model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    assert report["expert_weight_bytes"] <= 0.15 * report["expert_params"] * 4  # vs float32


@needs_bnb_cpu
def test_load_in_8bit_covers_experts(mixtral_checkpoint):
    ref = _load_plain(mixtral_checkpoint)
    model, report = quant.load_in_8bit(mixtral_checkpoint, dtype="bfloat16")
    assert report["quantization"] == "bnb-int8" and report["experts"] == "int8"
    assert 0.5 < report["expert_ratio_vs_bf16"] < 0.55  # 1 byte + a float32 scale per row of 64
    assert max(experts_errors(ref, model, tokens())) < EXPERTS_REL_ERR_8BIT


def _load_plain(path):
    from transformers import AutoModelForCausalLM

    with _quiet():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


# -- quantizing in memory ------------------------------------------------------------------------------------------
@needs_bnb_cpu
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_experts_4bit(family):
    model = tiny_model(family)
    assert model.config._experts_implementation != "eager"  # the default reads whole 3-D tensors
    quantized = copy.deepcopy(model)
    report = quant.quantize_experts_4bit(quantized)
    found = quant.expert_modules(model)
    assert report["modules"] == len(found) and report["tensors"] == 2 * len(found)
    assert report["ratio_vs_bf16"] == 0.2812 and report["forward"] == "eager"
    sizes = quant.expert_weight_bytes(quantized)
    assert sizes["experts_quantized"] == "nf4" and sizes["expert_ratio_vs_bf16"] <= RATIO_MAX  # gpt-oss: + biases
    assert sizes["weight_bytes"] < quant.expert_weight_bytes(model)["weight_bytes"]
    for _, module, names in quant.expert_modules(quantized):
        assert names == ["gate_up_proj", "down_proj"]
        assert all(isinstance(getattr(module, n), quant.QuantizedExpertWeight) for n in names)
        assert not [n for n, p in module.named_parameters() if p.ndim == 3]  # no full-precision copy left
    ids = tokens()
    errors = experts_errors(model, quantized, ids)
    assert max(errors) < EXPERTS_REL_ERR_4BIT and min(errors) > 0.01  # really quantized, and close
    assert kl(logits(model, ids), logits(quantized, ids)) < LOGITS_KL_4BIT
    # the quantized forward is exactly the eager forward over the dequantized weights
    dequantized = copy.deepcopy(quantized)
    assert quant.dequantize_experts(dequantized) == 2 * len(found)
    dequantized.set_experts_implementation("eager")
    assert torch.equal(logits(dequantized, ids), logits(quantized, ids))
    assert quant.quantize_experts_4bit(quantized)["already_quantized"] == 2 * len(found)  # idempotent


@needs_bnb_cpu
def test_codes_are_bitsandbytes_codes():
    import bitsandbytes.functional as F

    w = torch.randn(3, 96, 40, dtype=torch.bfloat16)  # 96*40 = 3840 = 60 blocks of 64: chunked across experts
    q = quant._quantize_tensor(w, 4, "nf4", 64, torch.bfloat16, torch.device("cpu"))
    odd = quant._quantize_tensor(w[:, :, :30], 4, "fp4", 128, torch.bfloat16, torch.device("cpu"))  # partial blocks
    for e in range(3):
        packed, state = F.quantize_4bit(w[e], blocksize=64, quant_type="nf4")
        assert torch.equal(q.packed[e], packed.reshape(-1)) and torch.equal(q.absmax[e], state.absmax)
        assert torch.equal(q[e], F.dequantize_4bit(packed, state))
        flat = w[e, :, :30].reshape(-1)  # rows of 30 < block 128: compared flat (see test_expert_dequantize_...)
        packed, state = F.quantize_4bit(flat, blocksize=128, quant_type="fp4")
        assert torch.equal(odd.packed[e], packed.reshape(-1))
        assert torch.equal(odd[e], F.dequantize_4bit(packed, state).reshape(96, 30))
        assert torch.allclose(odd[e].float(), _plain_dequantize(odd, e), atol=1e-2, rtol=1e-2)


@needs_bnb_cpu
def test_indexing_and_tensor_surface():
    w = torch.randn(5, 16, 64, dtype=torch.float32)
    q = quant._quantize_tensor(w, 4, "nf4", 64, torch.float32, torch.device("cpu"))
    assert q.shape == (5, 16, 64) and q.dtype == torch.float32 and len(q) == 5 and q.ndim == 3
    assert torch.equal(q[torch.tensor(2)], q[2]) and torch.equal(q[-1], q[4])
    ids = torch.tensor([[3, 1], [3, 0]])  # batched_mm style: one matrix per routed token
    assert q[ids].shape == (2, 2, 16, 64) and torch.equal(q[ids][1, 0], q[3])
    assert torch.equal(q[1:3], torch.stack([q[1], q[2]])) and torch.equal(q[2, :4], q[2][:4])
    assert torch.equal(q.dequantize(), q[:])
    assert rel(w, q.dequantize()) < 0.12
    with pytest.raises(IndexError):
        q[5]


@needs_bnb_cpu
def test_8bit_experts():
    model = tiny_model("deepseek_v3")
    quantized = copy.deepcopy(model)
    report = quant.quantize_experts_8bit(quantized)
    assert report["quant_type"] == "int8" and 0.5 < report["ratio_vs_bf16"] < 0.55
    errors = experts_errors(model, quantized, tokens())
    assert max(errors) < EXPERTS_REL_ERR_8BIT and min(errors) > 0


@needs_bnb_cpu
def test_copy_pickle_state_dict_and_dtype():
    model = tiny_model("mixtral")
    quant.quantize_experts_4bit(model)
    ids = tokens(2, 12)
    out = logits(model, ids)
    assert torch.equal(logits(copy.deepcopy(model), ids), out)
    buf = io.BytesIO()
    torch.save(model, buf)  # the eager forward override survives pickling
    buf.seek(0)
    assert torch.equal(logits(torch.load(buf, weights_only=False), ids), out)
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj.packed" in state and "model.layers.0.mlp.experts.gate_up_proj" not in state
    other = tiny_model("mixtral")
    torch.nn.init.zeros_(other.model.layers[0].mlp.experts.gate_up_proj)
    quant.quantize_experts_4bit(other)
    other.load_state_dict(state)
    assert torch.equal(logits(other, ids), out)
    as_fp32 = copy.deepcopy(model).float()  # dequantize to float32 now; codes and float32 absmax untouched
    w = as_fp32.model.layers[0].mlp.experts.gate_up_proj
    assert w.dtype == torch.float32 and w.absmax.dtype == torch.float32 and w.packed.dtype == torch.uint8
    assert rel(out, logits(as_fp32, ids)) < 0.05
    assert copy.deepcopy(model).half().model.layers[1].mlp.experts.down_proj.absmax.dtype == torch.float32


@needs_bnb_cpu
def test_disk_offloaded_experts(mixtral_checkpoint, tmp_path):
    """Experts offloaded by a device map are read from the offload, quantized into CPU memory,
    and give exactly what quantizing them in memory gives."""
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(2):
        for sub in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate"):
            device_map[f"model.layers.{i}.{sub}"] = "cpu"
        device_map[f"model.layers.{i}.mlp.experts"] = "disk"
    with _quiet():
        offloaded = AutoModelForCausalLM.from_pretrained(mixtral_checkpoint, dtype=torch.bfloat16,
                                                         device_map=device_map, offload_folder=tmp_path).eval()
    assert quant.expert_weight_bytes(offloaded)["offloaded_bytes"] > 0
    report = quant.quantize_experts_4bit(offloaded)
    assert len(report["offloaded_modules"]) == 2 and report["tensors"] == 4
    assert quant.expert_weight_bytes(offloaded)["offloaded_bytes"] == 0
    in_memory = _load_plain(mixtral_checkpoint)
    quant.quantize_experts_4bit(in_memory)
    ids = tokens(2, 16)
    assert torch.equal(logits(offloaded, ids), logits(in_memory, ids))


@needs_bnb_cpu
def test_save_pretrained_refuses_until_dequantized(tmp_path):
    model = tiny_model("mixtral")
    quant.quantize_experts_4bit(model)
    with pytest.raises(MoetoolError, match="dequantize_experts"):
        model.save_pretrained(tmp_path)
    quant.dequantize_experts(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()


@needs_bnb_cpu
def test_argument_errors():
    model = tiny_model("mixtral")
    with pytest.raises(MoetoolError, match="blocksize"):
        quant.quantize_experts_4bit(model, blocksize=48)
    with pytest.raises(MoetoolError, match="quant_type"):
        quant.quantize_experts_4bit(model, quant_type="int4")


def test_missing_backend_is_one_line_error(monkeypatch, mixtral_checkpoint):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setattr(quant, "_BACKEND_CACHE", {})
    status = quant.backend_status("cpu")
    assert status["available"] is False and "bitsandbytes" in status["reason"]
    for loader in (quant.load_in_4bit, quant.load_in_8bit):
        with pytest.raises(MoetoolError) as err:
            loader(mixtral_checkpoint)
        assert "\n" not in str(err.value) and "not available" in str(err.value)
    with pytest.raises(MoetoolError):
        quant.quantize_experts_4bit(tiny_model("mixtral"))


# -- bitsandbytes' two CPU paths, forced whatever CPU runs the suite (tests/bnb_paths.py) ----------------------------
SHAPES = [(out, inp) for out in (16, 32, 48, 96) for inp in (16, 32, 96, 128, 192)]  # [out_features, in_features]


def _linear4bit(out_features: int, in_features: int, seed: int = 0):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=g), requires_grad=False)
    return layer.to("cpu").eval()


def _reference_linear(layer, x):
    import bitsandbytes.functional as F

    w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return torch.nn.functional.linear(x.float(), w, layer.bias.float())


@needs_bnb_cpu
@pytest.mark.parametrize("path", PATHS)
def test_rule_is_exactly_what_each_cpu_path_runs(monkeypatch, path):
    """moetool.runtime.quant.bnb.linear4bit_problem names exactly the shapes bitsandbytes' 4-bit Linear
    cannot run on the AVX512-BF16 path (a shape error on the first forward), and the generic
    path runs them all; where a layer runs, it computes x @ W.T + b with W its own codes."""
    force_cpu_path(monkeypatch, path)
    x = torch.randn(2, 5, 192, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    runs = {}
    for out_f, in_f in SHAPES:
        layer = _linear4bit(out_f, in_f)
        ref = _reference_linear(layer, x[..., :in_f])
        try:
            with torch.no_grad():
                y = layer(x[..., :in_f])
        except (RuntimeError, AssertionError):
            runs[(out_f, in_f)] = False
            continue
        runs[(out_f, in_f)] = True
        assert bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)) == (path == "avx512bf16")
        assert rel(ref, y) < 0.02, (out_f, in_f)
    expected = {shape: path == "generic" or quant.linear4bit_problem(*shape, "cpu") is None for shape in SHAPES}
    assert runs == expected
    assert any(expected.values()) and (path == "generic" or not all(expected.values()))


@needs_bnb_cpu
@pytest.mark.skipif(not cpu_has_avx512bf16(), reason="this CPU has no AVX512-BF16 kernel to compare with")
def test_reference_gemv_matches_the_avx512bf16_kernel(monkeypatch):
    """The stand-in used on CPUs without AVX512-BF16 computes what the real kernel does."""
    force_cpu_path(monkeypatch, "avx512bf16")
    x = torch.randn(3, 7, 192, dtype=torch.bfloat16)
    for shape in ((32, 64), (96, 192), (64, 128)):
        layer = _linear4bit(*shape)
        with torch.no_grad():
            y = layer(x[..., :shape[1]])
        state = layer.weight.quant_state
        assert state.packing_format_for_cpu
        mine = reference_packed_gemv(x[..., :shape[1]], layer.weight.data, state=state) + layer.bias
        assert rel(y, mine) < 0.01


@needs_bnb_cpu
@pytest.mark.parametrize("path", PATHS)
def test_load_in_4bit_on_each_cpu_path(monkeypatch, mixtral_checkpoint, path):
    """The fused-expert path of moetool.runtime.quant.bnb with bitsandbytes' Linear layers on either CPU path."""
    force_cpu_path(monkeypatch, path)
    ref = _load_plain(mixtral_checkpoint)
    model, report = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16")
    assert report["quantization"] == "bnb-nf4" and report["kept_in_compute_dtype"] == []  # hidden 64: all run
    ids = tokens()
    out = logits(model, ids)
    assert_path_taken(model, path)
    assert len(linear4bit_layers(model)) == 8
    assert torch.isfinite(out).all() and kl(logits(ref, ids), out) < LOGITS_KL_4BIT
    assert max(experts_errors(ref, model, ids)) < EXPERTS_REL_ERR_4BIT


@needs_bnb_cpu
@pytest.mark.parametrize("path", PATHS)
def test_narrow_layers_stay_in_compute_dtype_on_each_cpu_path(monkeypatch, path):
    """DeepSeek-V3 at hidden 64: kv_b_proj (in 32), kv_a_proj_with_mqa (out 40), the shared and
    dense MLPs' layers are narrower than bitsandbytes' CPU kernel takes; they stay bfloat16
    nn.Linear, the report names them with the reason, and the model runs on both paths."""
    from transformers import AutoModelForCausalLM

    force_cpu_path(monkeypatch, path)
    src = tiny_model("deepseek_v3")
    with tempfile.TemporaryDirectory() as tmp:
        src.save_pretrained(tmp)
        model, report = quant.load_in_4bit(tmp, dtype="bfloat16")
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    kept = {k["module"]: k for k in report["kept_in_compute_dtype"]}
    expected = {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
                and quant.linear4bit_problem(m.out_features, m.in_features, "cpu")}
    assert set(kept) == expected and "model.layers.0.self_attn.kv_b_proj" in kept
    assert kept["model.layers.0.self_attn.kv_b_proj"]["reason"] == "in_features 32 is not a multiple of 64"
    modules = dict(model.named_modules())
    for name in kept:
        assert type(modules[name]) is torch.nn.Linear and modules[name].weight.dtype == torch.bfloat16
    assert linear4bit_layers(model) and any("kept in bfloat16, not 4-bit" in n for n in report["notes"])
    ids = tokens()
    out = logits(model, ids)
    assert_path_taken(model, path)
    assert torch.isfinite(out).all() and kl(logits(src, ids), out) < LOGITS_KL_4BIT


@needs_bnb_cpu
def test_without_the_rule_the_avx512bf16_path_fails(monkeypatch):
    """The forced path reaches bitsandbytes' real limit on any CPU: without moetool's rule the
    narrow layers are quantized and the first forward fails in the repacking."""
    force_cpu_path(monkeypatch, "avx512bf16")
    monkeypatch.setattr(quant, "linear_exclusions", lambda *a, **k: [])
    model, report = quant.load_in_4bit(FIXTURES / "tiny-mixtral", dtype="bfloat16")
    assert report["kept_in_compute_dtype"] == [] and report["quantization"] == "bnb-nf4"
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        logits(model, tokens(1, 8, 384))


def _plain_dequantize(q, e: int) -> torch.Tensor:
    """Expert e of a 4-bit QuantizedExpertWeight dequantized in plain torch: two codes a byte
    (high nibble first), each code's value from the NF4/FP4 table times its block's absmax."""
    import bitsandbytes.functional as F

    rows, cols = q.expert_shape
    n = rows * cols
    codes = q.packed[e]
    idx = torch.stack([codes >> 4, codes & 0xF], -1).reshape(-1)[:n].long()
    table = F.get_4bit_type(q.quant_type, device="cpu")
    return (table[idx] * q.absmax[e].repeat_interleave(q.blocksize)[:n]).reshape(rows, cols)


@needs_bnb_cpu
@pytest.mark.parametrize("has_avx512", [True, False], ids=["torch-avx512", "torch-other"])
@pytest.mark.parametrize("shape", [(64, 128), (32, 24), (128, 64)])
def test_expert_dequantize_on_each_cpu_dequant_path(monkeypatch, has_avx512, shape):
    """bitsandbytes' CPU dequantization takes its native kernel or a generic one depending on
    torch's CPU capability (backends.cpu.ops._has_avx512) and the block size; its native kernel
    is wrong for a 2-D shape whose rows are shorter than the block. The experts' codes must
    dequantize to the plain-torch values on either path, at every block size."""
    import bitsandbytes.backends.cpu.ops as cpu_ops

    monkeypatch.setattr(cpu_ops, "_has_avx512", has_avx512)
    w = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    for blocksize in quant.BLOCKSIZES:
        q = quant._quantize_tensor(w, 4, "nf4", blocksize, torch.bfloat16, torch.device("cpu"))
        for e in range(2):
            assert torch.allclose(q[e].float(), _plain_dequantize(q, e), atol=1e-2, rtol=1e-2), blocksize
        assert rel(w, q.dequantize()) < 0.2


@needs_bnb_cpu
def test_fallback_to_quantizing_after_loading_is_loud(monkeypatch, mixtral_checkpoint, caplog):
    """Where moetool's registered quantizer cannot be had (moetool.runtime.quant.bnb_quantizer fails to
    import against some transformers), the experts are quantized after a full-precision load:
    same model, but the report and stderr say so."""
    monkeypatch.setitem(sys.modules, "moetool.runtime.quant.bnb_quantizer", None)  # import -> ImportError
    with caplog.at_level("WARNING", logger="moetool.runtime.quant.bnb"):
        model, report = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16")
    assert report["experts_quantized_while_loading"] == 0 and report["experts_quantized_after_loading"] == 4
    assert report["experts"] == "nf4" and len(report["warnings"]) == 1
    assert "after a full-precision load" in report["warnings"][0] and "could not be registered" in report["warnings"][0]
    assert [r.getMessage() for r in caplog.records] == [f"warning: {report['warnings'][0]}"]
    monkeypatch.undo()
    _, normal = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16")
    assert normal["warnings"] == [] and normal["experts_quantized_while_loading"] == 4


def test_fallback_warning_reaches_stderr(mixtral_checkpoint):
    """A program that sets up no logging still sees the warning on stderr (logging's last resort)."""
    code = ("import sys; sys.modules['moetool.runtime.quant.bnb_quantizer'] = None; from moetool.runtime.quant import bnb as quant; "
            f"quant.load_in_4bit({str(mixtral_checkpoint)!r}, dtype='bfloat16')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if "after a full-precision load" in line][0].startswith("warning: ")


@needs_bnb_cpu
def test_quantized_experts_load_eager_through_the_public_switch(mixtral_checkpoint):
    model, report = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16")
    assert model.config._experts_implementation == "eager" and report["experts_forward"] == "eager"


@needs_bnb_cpu
def test_registered_quantizer_patches_nothing(mixtral_checkpoint):
    """The experts ride on a quantizer registered through transformers' public API: the
    model's quantizer is moetool's subclass, transformers' own classes are untouched, the
    model's config serializes, and a plain BitsAndBytesConfig load afterwards is plain."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    before = dict(vars(Bnb4BitHfQuantizer))
    model, report = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16")
    assert type(model.hf_quantizer).__name__ == "MoetoolBnb4BitQuantizer" and report["experts"] == "nf4"
    assert dict(vars(Bnb4BitHfQuantizer)) == before
    assert json.loads(model.config.to_json_string())["quantization_config"]["quant_method"] == "moetool_bnb_4bit"
    _, plain = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16", quantize_experts=False)
    assert plain["quantization"] == "bnb-nf4, experts bfloat16"


def test_int8_layers_take_inputs_of_any_rank():
    """bitsandbytes' int8 matmul flattens 3-D inputs only; moetool.runtime.quant.bnb's hooks give a 4-D
    input (DeepSeek's kv_b_proj) the same rows, so the result is the 3-D one, reshaped."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(16, 24, bias=True, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(24, 16), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu").eval()
    x = torch.randn(2, 1, 9, 16, dtype=torch.float16)
    model = torch.nn.Sequential(layer)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            model(x)
    assert quant.flatten_int8_inputs(model) == 1 and quant.flatten_int8_inputs(model) == 0  # once per layer
    with torch.no_grad():
        y4 = model(x)
        y3 = model(x.reshape(2, 9, 16))
    assert y4.shape == (2, 1, 9, 24) and torch.equal(y4.reshape(2, 9, 24), y3)


# -- GPU (same code path; skipped without CUDA) -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_in_4bit(mixtral_checkpoint):
    ref = _load_plain(mixtral_checkpoint).cuda()
    model, report = quant.load_in_4bit(mixtral_checkpoint, dtype="bfloat16")
    assert report["device"].startswith("cuda") and report["quantization"] == "bnb-nf4"
    assert report["experts_quantized_while_loading"] == 4 and report["expert_ratio_vs_bf16"] <= RATIO_MAX
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert w.device.type == "cuda" and w[0].device.type == "cuda"
    ids = tokens().cuda()
    assert max(experts_errors(ref, model, ids)) < EXPERTS_REL_ERR_4BIT


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_codes_kept_on_cpu_are_dequantized_on_the_gpu():
    w = torch.randn(4, 32, 64, dtype=torch.bfloat16)
    q = quant._quantize_tensor(w, 4, "nf4", 64, torch.bfloat16, torch.device("cpu"))
    on_gpu = q[torch.tensor(1, device="cuda")]
    assert on_gpu.device.type == "cuda" and torch.allclose(on_gpu.cpu().float(), q[1].float(), atol=1e-2)
    gpu_q = quant._quantize_tensor(w.cuda(), 4, "nf4", 64, torch.bfloat16, torch.device("cuda"))
    assert rel(w.cuda(), gpu_q.dequantize()) < 0.12


# -- measurement (python tests/test_quant.py --measure) ------------------------------------------------------------
def _corpus_bytes(name: str) -> torch.Tensor:
    data = (FIXTURES / "corpus" / name).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _train(model, steps: int, seq: int = 128, batch: int = 8, lr: float = 3e-3) -> float:
    """A few hundred AdamW steps of byte-level language modelling on fixtures/corpus."""
    data = torch.cat([_corpus_bytes("train-prose.txt"), _corpus_bytes("train-code.txt")])
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        ids = torch.stack([data[s:s + seq] for s in starts.tolist()])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def measure(steps: int = 200, families=FAMILIES, repeats: int = 3, cache: str | None = None) -> dict:
    """Train tiny models, save them in bf16, then compare loads: bf16, plain bitsandbytes 4-bit
    (the trap), bf16 + quantize_experts_4bit (experts alone), moetool 4-bit, moetool int8.
    Held-out text: fixtures/corpus/heldout-*.txt. ``cache``: a folder keeping the trained
    checkpoints (reused when present)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    heldout = torch.cat([_corpus_bytes("heldout-prose.txt")[:4096], _corpus_bytes("heldout-code.txt")[:4096]])
    eval_ids = heldout.reshape(16, 512)
    results = {}
    for family in families:
        saved = Path(cache) / family if cache else None
        with tempfile.TemporaryDirectory() as tmp:
            if saved is not None and (saved / "train.json").is_file():
                tmp = str(saved)
                out = json.loads((saved / "train.json").read_text())
            else:
                model = tiny_model(family, dtype=torch.float32)
                t0 = time.perf_counter()
                final_loss = _train(model, steps)
                train_s = time.perf_counter() - t0
                if saved is not None:
                    tmp = str(saved)
                model.to(torch.bfloat16).save_pretrained(tmp)
                del model
                out = {"train_steps": steps, "train_loss": round(final_loss, 4), "train_seconds": round(train_s, 1)}
                (Path(tmp) / "train.json").write_text(json.dumps(out))

            def experts_only(path=tmp):
                m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
                return m, quant.quantize_experts_4bit(m)

            loaders = {
                "bf16": lambda: (AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16), None),
                "bnb-4bit-plain": lambda: (AutoModelForCausalLM.from_pretrained(
                    tmp, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
                        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)), None),
                "experts-only-4bit": experts_only,
                "moetool-4bit": lambda: quant.load_in_4bit(tmp, dtype="bfloat16"),
                "moetool-int8": lambda: quant.load_in_8bit(tmp, dtype="bfloat16"),
            }
            ref_logits = None
            for name, load in loaders.items():
                try:
                    times = []
                    for _ in range(repeats):
                        with _quiet():
                            t0 = time.perf_counter()
                            m, _report = load()
                            times.append(time.perf_counter() - t0)
                    m.eval()
                    with torch.no_grad():
                        lg = m(eval_ids).logits.float()
                except Exception as exc:  # e.g. bitsandbytes int8 on CPU with a 4-D input
                    out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                    continue
                loss = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                                         eval_ids[:, 1:].reshape(-1))
                sizes = quant.expert_weight_bytes(m)
                row = {"quantization": sizes["quantization"], "weight_bytes": sizes["weight_bytes"],
                       "expert_weight_bytes": sizes["expert_weight_bytes"],
                       "expert_ratio_vs_bf16": sizes["expert_ratio_vs_bf16"],
                       "load_seconds_median": round(sorted(times)[len(times) // 2], 3),
                       "heldout_loss": round(float(loss), 4)}
                if ref_logits is None:
                    ref_logits = lg
                else:
                    row.update(logits_rel_err=round(rel(ref_logits, lg), 4), kl_vs_bf16=round(kl(ref_logits, lg), 5),
                               top1_agreement=round(float((lg.argmax(-1) == ref_logits.argmax(-1)).float().mean()), 4))
                out[name] = row
                del m
            results[family] = out
    return results


def measure_memory() -> list[dict]:
    """Peak memory of each way of loading a ~700 MB bf16 Mixtral-shaped checkpoint: the
    measurement lives in bench/bench_quant.py (also a `make bench` row)."""
    from bench.bench_quant import measure

    return measure()


def _print_table(results: dict) -> None:
    for family, out in results.items():
        print(f"\n{family}: {out['train_steps']} steps, train loss {out['train_loss']}, {out['train_seconds']} s")
        print(f"  {'load':18s} {'quantization':28s} {'weights':>9s} {'experts':>9s} {'vs bf16':>7s} "
              f"{'load s':>7s} {'loss':>7s} {'rel err':>8s} {'KL':>8s} {'top-1':>6s}")
        for name, row in out.items():
            if not isinstance(row, dict):
                continue
            if "error" in row:
                print(f"  {name:18s} {row['error']}")
                continue
            print(f"  {name:18s} {row['quantization']:28s} {row['weight_bytes']:9d} {row['expert_weight_bytes']:9d} "
                  f"{row['expert_ratio_vs_bf16']:7.4f} {row['load_seconds_median']:7.3f} {row['heldout_loss']:7.4f} "
                  f"{row.get('logits_rel_err', 0):8.4f} {row.get('kl_vs_bf16', 0):8.5f} "
                  f"{row.get('top1_agreement', 1):6.4f}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="train tiny models, compare loads")
    parser.add_argument("--memory", action="store_true", help="peak memory of each load, ~700 MB checkpoint")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cache", help="keep the trained checkpoints here (reused when present)")
    args = parser.parse_args()
    if args.memory:
        for row in measure_memory():
            print(json.dumps(row))
        sys.exit(0)
    if not args.measure:
        parser.error("give --measure or --memory")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*MatMul8bitLt.*")  # bitsandbytes int8 on CPU, per call
        res = measure(args.steps, tuple(args.families.split(",")), cache=args.cache)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _print_table(res)
