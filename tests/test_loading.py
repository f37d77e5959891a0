"""moetool.runtime.loading: the loader every model-running command shares, and the MoE block finder."""

from __future__ import annotations

import importlib.util
import json
import shutil
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FIXTURES, TINY, assert_one_line_error, run_cli
from oracles import router_weight
from moetool.errors import MoetoolError
from moetool.runtime.loading import (load_model, loaded_from_model, moe_blocks, parse_device_map, parse_max_memory,
                             parse_size)
from moetool.analysis.trace import record_trace

IDS = [p.name for p in TINY]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "for i in range(10): print(i ** 2)"]


@lru_cache(maxsize=None)
def loaded(path: str):
    return load_model(path)


@pytest.mark.parametrize("fixture", TINY, ids=IDS)
def test_load_and_find_moe_blocks(fixture):
    lm = loaded(str(fixture))
    assert lm.tokenizer is not None and lm.family.name == lm.rc.family.name
    blocks = moe_blocks(lm)
    assert [L for L, *_ in blocks] == list(lm.rc.moe_layers) and blocks
    layout = next(lay for lay in lm.family.runtime_layouts if not lay.get("disk"))  # the module tree's names
    for L, block, router, experts in blocks:
        # mlp, feed_forward, Nemotron-H's mixer, Gemma 4's decoder layer itself
        assert block is lm.model.get_submodule(layout["block"].replace("{L}", str(L)))
        # one router row per expert, zero-computation ones (LongCat) after the routed ones
        W, E = lm.rc.router_width, lm.rc.num_experts
        assert router_weight(router, W).shape == (W, lm.rc.hidden_size)
        fused = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
        # gate_up/down, Nemotron-H's up/down; LongCat: gate_up rows for its zero experts too
        assert fused and all(p.shape[0] in (E, W) for p in fused) and any(p.shape[0] == E for p in fused)
    info = lm.load_info()
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    buffers = sum(b.numel() * b.element_size() for n, b in lm.model.named_buffers())
    # plus buffers (rotary, score-correction bias, DeepSeek-V4's token-to-expert table)
    assert params <= info["weight_bytes"] <= params + max(buffers, 4096)
    expert_params = sum(p.numel() for *_, e in blocks for p in e.parameters()) * 4  # gpt-oss: + biases
    assert info["expert_weight_bytes"] == expert_params
    assert info["quantization"] == "none" and info["dtype"] == "float32" and info["devices"] == {"cpu": 1}


def test_dtype_option():
    lm = load_model(str(FIXTURES / "tiny-olmoe"), dtype="bfloat16")
    assert lm.dtype == "bfloat16" and lm.weight_bytes < loaded(str(FIXTURES / "tiny-olmoe")).weight_bytes * 0.6
    assert record_trace(lm, TEXTS[:1]).tokens > 0


class _OldStyleBlock(nn.Module):
    """A transformers-4 style MoE block: the router is a plain nn.Linear returning logits and
    the block does softmax top-k itself, so routing must be re-derived from the logits."""

    def __init__(self, new_block, top_k: int):
        super().__init__()
        E, H = new_block.gate.weight.shape
        self.gate = nn.Linear(H, E, bias=False)
        self.gate.weight = new_block.gate.weight
        self.experts = new_block.experts
        self.top_k = top_k

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        logits = self.gate(x)
        w, idx = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return self.experts(x, idx, w).reshape(b, s, h)


def test_router_returning_only_logits_is_recomputed():
    from transformers import AutoModelForCausalLM

    path = FIXTURES / "tiny-mixtral"
    reference = record_trace(loaded(str(path)), TEXTS)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    for layer in model.model.layers:
        layer.mlp = _OldStyleBlock(layer.mlp, model.config.num_experts_per_tok)
    lm = loaded_from_model(model, loaded(str(path)).tokenizer, name="old-style")
    trace = record_trace(lm, TEXTS)
    assert trace.meta["routing"] == "recomputed-from-logits"
    for L in trace.moe_layers:
        np.testing.assert_array_equal(trace.experts[L], reference.experts[L])
        np.testing.assert_array_equal(trace.weights[L], reference.weights[L])


def test_second_layout_block_sparse_moe_is_found():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-mixtral", local_files_only=True)
    for layer in model.model.layers:  # rename to the 4.x layout: model.layers.{L}.block_sparse_moe
        layer.block_sparse_moe = layer.mlp
        del layer.mlp
    lm = loaded_from_model(model)
    blocks = moe_blocks(lm)
    assert [b[1] for b in blocks] == [layer.block_sparse_moe for layer in model.model.layers]


# -- options -----------------------------------------------------------------------------------------------
def test_parse_sizes_and_max_memory():
    assert parse_size("20GiB") == 20 * 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size("300000") == 300000
    assert parse_size("1.5KiB") == 1536
    assert parse_max_memory("0=20GiB,cpu=64GiB") == {0: 20 * 2**30, "cpu": 64 * 2**30}
    assert parse_max_memory("cuda:1=1GB, disk=2GB") == {1: 10**9, "disk": 2 * 10**9}
    assert parse_max_memory(None) is None
    for bad in ("cpu", "cpu=lots", "tpu=1GB", ","):
        with pytest.raises(MoetoolError):
            parse_max_memory(bad)


def test_parse_device_map(tmp_path):
    assert parse_device_map(None) is None
    assert parse_device_map("auto") == "auto" and parse_device_map("balanced") == "balanced"
    assert parse_device_map("cpu") == {"": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.layers.0": "disk", "": "cpu"}))
    assert parse_device_map(str(path)) == {"model.layers.0": "disk", "": "cpu"}
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    with pytest.raises(MoetoolError, match="no such file"):
        parse_device_map(str(tmp_path / "missing.json"))
    with pytest.raises(MoetoolError, match="unknown device"):
        parse_device_map("quantum")
    if not torch.cuda.is_available():
        for spec in ("cuda:0", "0", {"model.layers.0": 0, "": "cpu"}):
            with pytest.raises(MoetoolError, match="no CUDA device"):
                parse_device_map(spec)


def test_explicit_device_map_is_checked_and_completed():
    path = str(FIXTURES / "tiny-mixtral")
    with pytest.raises(MoetoolError, match="does not place"):
        load_model(path, device_map={"model.layers.0": "cpu"})
    with pytest.raises(MoetoolError, match="not a module"):
        load_model(path, device_map={"model.nope": "cpu", "": "cpu"})
    lm = load_model(path, device_map={"model.layers.1.mlp.experts": "disk", "": "cpu"})
    assert lm.device_map["model.layers.1.mlp.experts"] == "disk"
    ref = record_trace(loaded(path), TEXTS)
    got = record_trace(lm, TEXTS)
    for L in ref.moe_layers:
        np.testing.assert_array_equal(got.experts[L], ref.experts[L])


@pytest.mark.parametrize("fixture", [FIXTURES / "tiny-mixtral", FIXTURES / "tiny-deepseek-v3"], ids=["mixtral", "dsv3"])
def test_offload_under_small_memory_budget_routes_the_same(fixture, tmp_path):
    """A budget too small for the model: layers go to the CPU budget and the rest to disk
    (accelerate), and every token is routed exactly as with a plain load."""
    plain = loaded(str(fixture))
    budget = int(plain.weight_bytes * 0.9)
    lm = load_model(str(fixture), max_memory=f"cpu={budget}", offload_folder=str(tmp_path / "off"))
    devices = lm.load_info()["devices"]
    assert "disk" in devices and lm.load_info()["offloaded"], lm.device_map
    assert any((tmp_path / "off").iterdir())  # weights really were written to the offload folder
    ref = record_trace(plain, TEXTS)
    got = record_trace(lm, TEXTS, generate=2)
    prompt = got.decode == 0
    for L in ref.moe_layers:
        np.testing.assert_array_equal(got.experts[L][prompt], ref.experts[L])
        np.testing.assert_array_equal(got.weights[L][prompt], ref.weights[L])


def test_offload_via_cli_matches_plain_load():
    from click.testing import CliRunner

    from moetool.cli import cli

    fx = FIXTURES / "tiny-qwen2-moe"
    budget = int(loaded(str(fx)).weight_bytes * 0.5)
    runs = []
    for extra in ([], ["--no-stream", "--max-memory", f"cpu={budget}B"]):
        result = CliRunner().invoke(cli, ["trace", str(fx), "--prompt", TEXTS[0], "--json", *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs.append(json.loads(result.stdout))
    assert "disk" in runs[1]["load"]["devices"] and "disk" not in runs[0]["load"]["devices"]
    assert [lay["expert_counts"] for lay in runs[0]["layers"]] == [lay["expert_counts"] for lay in runs[1]["layers"]]
    assert runs[0]["token_view"] == runs[1]["token_view"]


def test_a_budget_smaller_than_the_weights_streams_by_itself_via_cli():
    """Neither --stream nor --no-stream: --max-memory below the checkpoint's size means the model
    does not fit what it is given, so it runs layer by layer, with the same routing."""
    from click.testing import CliRunner

    from moetool.cli import cli

    fx = FIXTURES / "tiny-qwen2-moe"
    budget = int(loaded(str(fx)).weight_bytes * 0.5)
    runs = []
    for extra in ([], ["--max-memory", f"cpu={budget}B"]):
        result = CliRunner().invoke(cli, ["trace", str(fx), "--prompt", TEXTS[0], "--json", *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs.append(json.loads(result.stdout))
    assert runs[1]["load"]["streamed"] and not runs[0]["load"]["streamed"]
    assert "one layer at a time" in result.stderr
    assert [lay["expert_counts"] for lay in runs[0]["layers"]] == [lay["expert_counts"] for lay in runs[1]["layers"]]


# -- quantized loading -----------------------------------------------------------------------------------------
def test_load_in_8bit_reports_quantization():
    lm = load_model(str(FIXTURES / "tiny-mixtral"), load_in_8bit=True)
    full = loaded(str(FIXTURES / "tiny-mixtral"))
    info = lm.load_info()
    assert info["quantization"].startswith("bnb-int8")
    assert info["weight_bytes"] < full.weight_bytes
    if _quant_has_loader(8):  # the quantization helper's int8 covers the fused experts too
        assert info["quantization"] == "bnb-int8" and info["expert_weight_bytes"] < full.expert_weight_bytes / 3
    trace = record_trace(lm, TEXTS[:1])
    assert trace.tokens > 0 and trace.meta["quantization"] == info["quantization"]


def _quant_has_loader(bits: int = 4) -> bool:
    if importlib.util.find_spec("moetool.runtime.quant.bnb") is None:
        return False
    from moetool.runtime.quant import bnb as quant

    return hasattr(quant, f"load_in_{bits}bit")


@pytest.mark.skipif(not _quant_has_loader(), reason="moetool.runtime.quant.bnb.load_in_4bit not available yet")
def test_load_in_4bit_quantizes_experts():
    lm = load_model(str(FIXTURES / "tiny-mixtral"), load_in_4bit=True)
    full = loaded(str(FIXTURES / "tiny-mixtral"))
    info = lm.load_info()
    # hidden size 32: every attention projection is narrower than bitsandbytes' 4-bit CPU kernel
    # takes, so they stay in the compute dtype (named in the report) and only the experts are 4-bit
    kept = lm.quant_report["kept_in_compute_dtype"]
    assert sorted(k["module"].rsplit(".", 1)[1] for k in kept) == sorted(["q_proj", "k_proj", "v_proj", "o_proj"] * 2)
    assert info["quantization"] == "experts-nf4" and lm.quant_report["experts"] == "nf4"
    assert info["expert_weight_bytes"] < full.expert_weight_bytes / 4  # 4-bit codes + scales vs float32
    trace = record_trace(lm, TEXTS)
    assert trace.meta["quantization"] == info["quantization"]
    assert trace.meta["expert_weight_bytes"] == info["expert_weight_bytes"]
    from click.testing import CliRunner

    from moetool.cli import cli

    result = CliRunner().invoke(cli, ["trace", str(FIXTURES / "tiny-mixtral"), "--prompt", TEXTS[0], "--json",
                                      "--load-in-4bit"], catch_exceptions=False)
    load = json.loads(result.stdout)["load"]
    assert load["quantization"] == "experts-nf4" and load["expert_weight_bytes"] == info["expert_weight_bytes"]


ALL_FIXTURES = TINY + sorted(p for p in FIXTURES.glob("trained-*") if p.is_dir())
# mean next-token KL(full precision || quantized) on TEXTS[0]. Measured (4-bit / int8): trained
# fixtures 0.0135 / 0.0017 (DeepSeek-V3), 0.0084 / 0.0001 (Mixtral); the random tiny ones up to
# 0.113 / 0.021 (tiny-deepseek-v3: its group-limited routing flips experts on small changes)
MAX_KL = {"tiny": 0.25, "trained": 0.05}


def _max_kl(fixture) -> float:
    return MAX_KL[fixture.name.split("-")[0]]


@torch.no_grad()
def _next_token_kl(ref_model, model, tokenizer) -> float:
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    lp = ref_model(ids).logits.float().log_softmax(-1)
    lq = model(ids).logits.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.skipif(not _quant_has_loader(), reason="moetool.runtime.quant.bnb.load_in_4bit not available yet")
@pytest.mark.parametrize("path", ["avx512bf16", "generic"])
@pytest.mark.parametrize("fixture", ALL_FIXTURES, ids=[p.name for p in ALL_FIXTURES])
def test_load_in_4bit_runs_every_fixture_on_each_cpu_path(monkeypatch, fixture, path):
    """--load-in-4bit on every fixture, with bitsandbytes' Linear layers forced onto each of its
    two CPU paths (tests/bnb_paths.py): it runs, the layers the AVX512-BF16 kernel cannot take
    stay nn.Linear in the compute dtype and are named in the report, and the output stays
    close to the full-precision model's."""
    from bnb_paths import assert_path_taken, force_cpu_path, linear4bit_layers

    from moetool.runtime.quant import bnb as quant

    force_cpu_path(monkeypatch, path)
    lm = load_model(str(fixture), load_in_4bit=True)
    trace = record_trace(lm, TEXTS[:1])
    assert trace.tokens > 0 and lm.quant_report["experts"] == "nf4"
    assert_path_taken(lm.model, path)
    modules = dict(lm.model.named_modules())
    for name, layer in linear4bit_layers(lm.model):
        assert quant.linear4bit_problem(layer.out_features, layer.in_features, "cpu") is None, name
    for k in lm.quant_report["kept_in_compute_dtype"]:
        kept = modules[k["module"]]  # nn.Linear, or a subclass (routers of Phi-3.5-MoE and Llama 4, DeepSeek-V4's
        # grouped output projection)
        assert isinstance(kept, nn.Linear) and not type(kept).__module__.startswith("bitsandbytes")
        assert quant.linear4bit_problem(*k["shape"], "cpu") == k["reason"]
    assert _next_token_kl(loaded(str(fixture)).model, lm.model, lm.tokenizer) < _max_kl(fixture)


@pytest.mark.parametrize("fixture", ALL_FIXTURES, ids=[p.name for p in ALL_FIXTURES])
def test_load_in_8bit_runs_every_fixture(fixture):
    """--load-in-8bit on every fixture (DeepSeek's kv_b_proj gets a 4-D input)."""
    lm = load_model(str(fixture), load_in_8bit=True)
    assert record_trace(lm, TEXTS[:1]).tokens > 0
    if lm.quant_report is not None:
        assert lm.quant_report["int8_flatten_hooks"] > 0
    assert _next_token_kl(loaded(str(fixture)).model, lm.model, lm.tokenizer) < _max_kl(fixture)


@pytest.mark.skipif(_quant_has_loader(), reason="the 4-bit loader exists")
def test_load_in_4bit_without_quant_helper_is_one_line():
    assert_one_line_error(run_cli("trace", FIXTURES / "tiny-mixtral", "--prompt", "hi", "--load-in-4bit"),
                          "moetool.runtime.quant.bnb")


# -- errors --------------------------------------------------------------------------------------------------------
def test_load_errors():
    with pytest.raises(MoetoolError, match="no weights"):
        load_model("mixtral")  # a preset: config only
    with pytest.raises(MoetoolError, match="choose one"):
        load_model(str(FIXTURES / "tiny-mixtral"), load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(MoetoolError, match="unknown dtype"):
        load_model(str(FIXTURES / "tiny-mixtral"), dtype="float8")
    with pytest.raises(MoetoolError, match="explicit"):
        load_model(str(FIXTURES / "tiny-mixtral"), device_map={"": "cpu"}, max_memory="cpu=1GB")


def test_offline_and_no_remote_code_by_default(monkeypatch):
    import transformers

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(MoetoolError, match="cannot load"):
        load_model(str(FIXTURES / "tiny-olmoe"))
    assert seen["local_files_only"] is True and seen["trust_remote_code"] is False


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-moe"
    shutil.copytree(FIXTURES / "tiny-olmoe", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    lm = load_model("acme/tiny-moe")
    assert lm.family.name == "olmoe" and lm.name == "acme/tiny-moe"
    with pytest.raises(MoetoolError, match="never downloads"):
        load_model("acme/not-cached")


def test_dense_checkpoint_is_refused_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "num_hidden_layers": 2}))
    with pytest.raises(MoetoolError, match="dense"):
        load_model(str(tmp_path))
    assert_one_line_error(run_cli("trace", tmp_path, "--prompt", "hi", "--device-map", "auto"), "dense")
