"""`moetool trace`: recorded routing is exactly what each MoE block used, for every family."""

from __future__ import annotations

import inspect
import json
import struct
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT, TINY, assert_one_line_error, run_cli
from moetool.errors import MoetoolError
from moetool.runtime.loading import load_model, moe_blocks
from moetool.analysis.trace import Trace, check_trace_matches, read_texts, record_token_ids, record_trace
from moetool.analysis.trace_stats import layer_stats, summarize

IDS = [p.name for p in TINY]
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def forward(self, hidden_states):",
    "Mixture-of-experts models route every token to a few experts.",
]


@lru_cache(maxsize=None)
def loaded(path: str):
    torch.manual_seed(0)
    return load_model(path)


def _close(a, b, tol=2e-3):
    return np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


# -- the proof: routing recorded = routing used --------------------------------------------------------
def _recompute_block(block, layout: dict, experts, x: torch.Tensor, ids: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """A block's output from the recorded expert ids and weights, with the experts' fused
    weights used directly (gate_up_proj [E, 2I, H], down_proj [E, H, I]); shared experts added
    as the family's block does."""
    ids_t = torch.as_tensor(ids.astype(np.int64))
    w_t = torch.as_tensor(w.astype(np.float32))
    if hasattr(experts, "gate_up_proj_bias"):
        # gpt-oss: interleaved gate/up, biases, clamped SwiGLU: transformers' own expert math, fed
        # the recorded routing (what this test checks)
        return experts(x, ids_t, w_t.to(x.dtype))
    out = torch.zeros_like(x)
    if len(inspect.signature(experts.forward).parameters) == 1:
        # Llama 4: every expert takes every token, scaled by its routing weight (0 where not
        # chosen), through transformers' own expert math ([E, H, 2I] weights, batched)
        E = experts.gate_up_proj.shape[0]
        scores = torch.zeros(x.shape[0], E, dtype=x.dtype).scatter_(1, ids_t, w_t.to(x.dtype))
        out = experts(x.repeat(E, 1) * scores.T.reshape(-1, 1)).reshape(E, x.shape[0], -1).sum(0)
    else:
        E = experts.down_proj.shape[0]  # ids from E on: zero-computation experts (LongCat), the identity
        for j in range(ids_t.shape[1]):
            real = ids_t[:, j].clamp(max=E - 1)
            gu = torch.einsum("th,tih->ti", x, experts.gate_up_proj[real])
            gate, up = gu.chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            y = torch.einsum("ti,thi->th", h, experts.down_proj[real])
            y = torch.where((ids_t[:, j] >= E)[:, None], x, y)
            out += y * w_t[:, j:j + 1]
    if layout.get("shared"):
        shared = block.get_submodule(layout["shared"])(x)
        gate_mod = getattr(block, "shared_expert_gate", None)
        if gate_mod is not None:
            shared = torch.sigmoid(gate_mod(x)) * shared
        out += shared
    return out


def _recomputable(block, layout: dict, experts) -> bool:
    """The block is router + experts (+ shared expert) around gated experts, so its output can be recomputed
    from the recorded routing. Not so for Gemma 4 (the block is the decoder layer) and Nemotron-H (non-gated
    experts inside latent projections): there the experts module's own inputs are compared instead."""
    parts = {name for name, child in block.named_children() if any(True for _ in child.parameters())}
    return hasattr(experts, "gate_up_proj") and parts <= {layout["router"], layout["experts"], layout.get("shared")}


def _block_output(out) -> torch.Tensor:
    """A MoE block's hidden states (gpt-oss's block also returns its router scores)."""
    return (out[0] if isinstance(out, tuple) else out).detach()


@pytest.mark.parametrize("fixture", TINY, ids=IDS)
def test_recorded_routing_reproduces_block_output(fixture):
    lm = loaded(str(fixture))
    blocks = moe_blocks(lm)
    layout = next(lay for lay in lm.family.runtime_layouts
                  if lm.model.get_submodule(lay["block"].replace("{L}", str(blocks[0][0]))) is blocks[0][1])
    seen: dict[int, tuple] = {}
    inputs: dict[int, tuple] = {}  # what each experts module was called with (hidden, top_k_index, top_k_weights)
    handles = [block.register_forward_hook(
        lambda mod, args, out, L=L: seen.__setitem__(L, (args[0].detach().reshape(-1, args[0].shape[-1]).clone(),
                                                         _block_output(out).reshape(-1, args[0].shape[-1]).clone())))
        for L, block, _router, _experts in blocks]
    handles += [experts.register_forward_pre_hook(
        lambda mod, args, kwargs, L=L: inputs.__setitem__(L, tuple(a.detach().clone() for a in (
            list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs])[:3])),
        with_kwargs=True) for L, _block, _router, experts in blocks]
    try:
        trace = record_trace(lm, [PROMPTS[0]], batch_size=1)
    finally:
        for h in handles:
            h.remove()
    assert trace.moe_layers == [L for L, *_ in blocks] == list(lm.rc.moe_layers)
    assert trace.tokens == seen[blocks[0][0]][0].shape[0]
    for L, block, _router, experts in blocks:
        if not _recomputable(block, layout, experts):
            assert layout["routing"] == "experts_input" and L in inputs
            _, idx, w = inputs[L]
            np.testing.assert_array_equal(trace.experts[L].astype(np.int64), idx.reshape(trace.experts[L].shape).numpy())
            np.testing.assert_allclose(trace.weights[L].astype(np.float32), w.float().reshape(trace.weights[L].shape)
                                       .numpy(), atol=1e-3)
            assert len(np.unique(trace.experts[L])) > 1
            continue
        x, real = seen[L]
        with torch.no_grad():
            ours = _recompute_block(block, layout, experts, x, trace.experts[L], trace.weights[L])
        scale = real.abs().max().item()
        # weights are stored as float16: agreement to float16 rounding, not bit-exact
        torch.testing.assert_close(ours, real, atol=8e-4 * scale, rtol=0), f"layer {L}"
        assert len(np.unique(trace.experts[L])) > 1


def test_deepseek_v3_routing_is_group_limited_with_bias():
    """The trace holds what DeepSeek-V3's router chose (sigmoid + correction bias, 2 of 4
    groups), which differs from a plain top-k of the scores."""
    lm = loaded(str(FIXTURES / "tiny-deepseek-v3"))
    trace = record_trace(lm, PROMPTS, logits=True)
    rc = lm.rc
    n_group, per = rc.fields["n_group"], rc.num_experts // rc.fields["n_group"]
    differs = 0
    for L, _block, router, _experts in moe_blocks(lm):
        ids = trace.experts[L].astype(np.int64)
        groups = np.unique(ids // per, axis=None)
        assert all(len(set(row // per)) <= rc.fields["topk_group"] for row in ids), "more groups than topk_group"
        assert groups.size <= n_group
        logits = trace.logits[L].astype(np.float32)
        scores = 1 / (1 + np.exp(-logits))
        bias = router.e_score_correction_bias.detach().numpy()
        assert np.abs(bias).max() > 0
        plain = np.sort(np.argsort(-scores, axis=1)[:, :rc.top_k], axis=1)
        differs += int((plain != np.sort(ids, axis=1)).any(axis=1).sum())
        # weights: the chosen experts' sigmoid scores, normalised, times routed_scaling_factor
        chosen = np.take_along_axis(scores, ids, axis=1)
        expect = chosen / chosen.sum(axis=1, keepdims=True) * rc.names["routed_scaling_factor"]
        assert _close(expect, trace.weights[L], tol=1e-2)
    assert differs > 0, "group limit and bias never changed a choice: the test would not catch re-derived routing"


@pytest.mark.parametrize("fixture", TINY, ids=IDS)
def test_padding_and_batching_do_not_change_routing(fixture):
    lm = loaded(str(fixture))
    one_by_one = record_trace(lm, PROMPTS, batch_size=1)
    batched = record_trace(lm, PROMPTS, batch_size=3)
    assert batched.tokens == one_by_one.tokens == sum(len(lm.tokenizer(p)["input_ids"]) for p in PROMPTS)
    np.testing.assert_array_equal(batched.token_ids, one_by_one.token_ids)
    np.testing.assert_array_equal(batched.sequence, one_by_one.sequence)
    np.testing.assert_array_equal(batched.position, one_by_one.position)
    for L in batched.moe_layers:
        np.testing.assert_array_equal(np.sort(batched.experts[L], 1), np.sort(one_by_one.experts[L], 1))
        assert _close(np.sort(batched.weights[L], 1), np.sort(one_by_one.weights[L], 1))


def test_tokenized_as_the_model_tokenizer_does():
    lm = loaded(str(FIXTURES / "tiny-mixtral"))
    trace = record_trace(lm, [PROMPTS[1]])
    expected = lm.tokenizer(PROMPTS[1])["input_ids"]
    assert trace.token_ids.tolist() == expected
    assert expected[0] == lm.tokenizer.bos_token_id  # special tokens included by default
    bare = record_trace(lm, [PROMPTS[1]], add_special_tokens=False)
    assert bare.token_ids.tolist() == lm.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("fixture", [FIXTURES / "tiny-mixtral", FIXTURES / "tiny-deepseek-v3"], ids=["mixtral", "dsv3"])
def test_generate_traces_greedy_decode_steps(fixture):
    lm = loaded(str(fixture))
    n = 4
    trace = record_trace(lm, PROMPTS[:2], generate=n, batch_size=2)
    for s, prompt in enumerate(PROMPTS[:2]):
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = lm.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        generated = ref[0, ids.shape[1]:].tolist()
        rows = trace.sequence == s
        assert trace.decode[rows].tolist() == [0] * ids.shape[1] + [1] * len(generated)
        assert trace.token_ids[rows][trace.decode[rows] == 1].tolist() == generated
        assert trace.position[rows].tolist() == list(range(ids.shape[1] + len(generated)))
        # a decode step (KV cache) routes like the same tokens traced in one prefill pass
        full = record_token_ids(lm, [trace.token_ids[rows].tolist()])
        for L in trace.moe_layers:
            np.testing.assert_array_equal(np.sort(trace.experts[L][rows], 1), np.sort(full.experts[L], 1))
            assert _close(np.sort(trace.weights[L][rows], 1), np.sort(full.weights[L], 1))
    single = record_trace(lm, PROMPTS[:2], generate=n, batch_size=1)
    np.testing.assert_array_equal(single.token_ids, trace.token_ids)


def test_max_tokens_caps_the_trace():
    lm = loaded(str(FIXTURES / "tiny-mixtral"))
    full = record_trace(lm, PROMPTS)
    first = len(lm.tokenizer(PROMPTS[0])["input_ids"])
    capped = record_trace(lm, PROMPTS, max_tokens=first + 3)
    assert capped.tokens == first + 3 and capped.meta["truncated"] is True
    assert capped.sequence.tolist() == [0] * first + [1] * 3
    for L in capped.moe_layers:
        np.testing.assert_array_equal(capped.experts[L], full.experts[L][: first + 3])
    gen = record_trace(lm, PROMPTS[:1], generate=10, max_tokens=first + 2)
    assert gen.tokens == first + 2 and int(gen.decode.sum()) == 2


# -- the file format ----------------------------------------------------------------------------------------
def test_trace_file_roundtrip_and_size(tmp_path):
    lm = loaded(str(FIXTURES / "tiny-deepseek-v3"))
    trace = record_trace(lm, PROMPTS)
    path = tmp_path / "t.safetensors"
    size = trace.save(path)
    back = Trace.load(path)
    for name in ("token_ids", "sequence", "position", "decode"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    for L in trace.moe_layers:
        assert back.experts[L].dtype == np.uint8 and back.weights[L].dtype == np.float16
        np.testing.assert_array_equal(back.experts[L], trace.experts[L])
        np.testing.assert_array_equal(back.weights[L], trace.weights[L])
    assert back.meta["format"] == "moetool-trace" and back.meta["version"] == "1"
    for key in ("model", "family", "num_experts", "top_k", "num_layers", "moe_layers", "texts", "quantization",
                "weight_bytes", "expert_weight_bytes", "dtype"):
        assert back.meta[key] == trace.meta[key], key
    assert back.meta["texts"] == PROMPTS and back.meta["moe_layers"] == [1, 2]

    # the header is plain JSON at the front: check the on-disk layout without our reader
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    T, k, nl = trace.tokens, trace.top_k, len(trace.moe_layers)
    assert header["layers.1.experts"]["dtype"] == "U8" and header["layers.1.experts"]["shape"] == [T, k]
    assert header["layers.2.weights"]["dtype"] == "F16" and header["token_ids"]["dtype"] == "I32"
    assert header["decode"]["dtype"] == "U8" and header["__metadata__"]["format"] == "moetool-trace"
    routing = sum(np.prod(v["shape"]) * {"U8": 1, "F16": 2}[v["dtype"]]
                  for name, v in header.items() if name.startswith("layers."))
    assert routing == T * nl * k * 3  # top_k x 3 bytes per token per layer
    assert len(raw) - 8 - n == routing + T * 13  # plus token id, sequence, position (int32) and decode (u8)

    with_logits = record_trace(lm, PROMPTS, logits=True)
    size_logits = with_logits.save(tmp_path / "l.safetensors")
    assert size_logits - size >= T * nl * trace.num_experts * 2
    assert Trace.load(tmp_path / "l.safetensors").logits[1].shape == (T, trace.num_experts)


def test_int16_expert_ids_above_256_experts(tmp_path):
    T, k, E = 5, 2, 300
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int16)
    meta = {"model": "m", "family": "deepseek_v3", "num_experts": E, "top_k": k, "num_layers": 1, "moe_layers": [0],
            "texts": ["x"], "quantization": "none", "weight_bytes": 0, "expert_weight_bytes": 0, "dtype": "bfloat16"}
    tr = Trace(np.arange(T, dtype=np.int32), np.zeros(T, np.int32), np.arange(T, dtype=np.int32),
               np.zeros(T, np.uint8), {0: ids}, {0: np.full((T, k), 0.5, np.float16)}, {}, meta)
    tr.save(tmp_path / "big.safetensors")
    back = Trace.load(tmp_path / "big.safetensors")
    assert back.experts[0].dtype == np.int16 and back.experts[0].tolist() == ids.tolist()
    assert summarize(back)["layers"][0]["expert_counts"][int(ids[0, 0])] >= 1


# -- statistics ----------------------------------------------------------------------------------------------
def test_stats_definitions_on_known_routing():
    E = 4
    balanced = np.array([[0, 1], [2, 3], [0, 2], [1, 3]], np.uint8)
    w = np.full((4, 2), 0.5, np.float16)
    st = layer_stats(balanced, w, E)
    assert st["expert_counts"] == [2, 2, 2, 2] and st["max_over_mean"] == 1.0 and st["cv"] == 0.0
    assert st["lb_loss"] == 1.0 and st["load_entropy_normalized"] == 1.0 and st["routing_entropy"] == 1.0
    assert st["expert_fraction"] == [0.5] * 4 and abs(sum(st["expert_share"]) - 1) < 1e-9
    skewed = np.array([[0, 1]] * 4, np.uint8)
    st2 = layer_stats(skewed, np.array([[1.0, 0.0]] * 4, np.float16), E)
    assert st2["max_over_mean"] == 2.0 and st2["unused_experts"] == [2, 3]
    assert st2["lb_loss"] == 2.0  # E * (0.5 * 1.0 + 0.5 * 0.0): all probability on expert 0
    assert st2["routing_entropy"] == 0.0
    assert st2["top_pairs"][0] == {"experts": [0, 1], "count": 4, "fraction": 1.0, "lift": 1.0}
    logits = np.zeros((4, E), np.float16)  # uniform router probabilities
    st3 = layer_stats(skewed, np.full((4, 2), 0.5, np.float16), E, logits=logits)
    assert st3["lb_loss_source"] == "logits" and st3["lb_loss"] == 1.0 and st3["router_entropy"] == 2.0


def test_summary_counts_every_token_k_times():
    lm = loaded(str(FIXTURES / "tiny-qwen3-moe"))
    s = summarize(record_trace(lm, PROMPTS, logits=True))
    assert s["moe_layers"] == [0, 2]  # layer 1 is a dense MLP in this fixture
    for lay in s["layers"]:
        assert sum(lay["expert_counts"]) == s["tokens"] * s["top_k"]
        assert lay["lb_loss_source"] == "logits" and lay["lb_loss"] > 0
    assert s["token_view"] is None or len(s["token_view"]) == s["tokens"]


# -- CLI ---------------------------------------------------------------------------------------------------------
def _cli(*args: str):
    from click.testing import CliRunner

    from moetool.cli import cli

    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_cli_json_contract_out_show_and_plot(tmp_path):
    fx = FIXTURES / "tiny-mixtral"
    out, png = tmp_path / "t.safetensors", tmp_path / "heat.png"
    result = _cli("trace", fx, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--json", "--out", out, "--plot", png)
    data = json.loads(result.stdout)
    lm = loaded(str(fx))
    n_tokens = sum(len(lm.tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    assert data["tokens"] == n_tokens
    assert [lay["layer"] for lay in data["layers"]] == [0, 1]
    for lay in data["layers"]:
        assert len(lay["expert_counts"]) == 8 and sum(lay["expert_counts"]) == n_tokens * 2
    load = data["load"]
    assert load["quantization"] == "none" and load["weight_bytes"] == lm.weight_bytes
    assert 0 < load["expert_weight_bytes"] < load["weight_bytes"]
    assert load["expert_weight_bytes"] == 2 * 8 * 3 * 32 * 48 * 4  # 2 layers x 8 experts x 3 matrices, float32
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    shown = json.loads(_cli("trace", "show", out, "--json").stdout)
    assert shown == data
    text = _cli("trace", "show", out).stdout
    assert "routing per MoE layer" in text and "token by token" in text and "LB loss" in text
    png2 = tmp_path / "again.png"
    _cli("trace", "show", out, "--plot", png2)
    assert png2.stat().st_size > 5000


def test_cli_file_input_plain_and_jsonl(tmp_path):
    plain = tmp_path / "texts.txt"
    plain.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PROMPTS[:2])) + "\n")
    assert read_texts(file=str(plain)) == read_texts(file=str(jsonl)) == PROMPTS[:2]
    a = json.loads(_cli("trace", FIXTURES / "tiny-olmoe", "--file", plain, "--json", "--batch-size", "1").stdout)
    b = json.loads(_cli("trace", FIXTURES / "tiny-olmoe", "--file", jsonl, "--json").stdout)
    assert a["tokens"] == b["tokens"] and a["sequences"] == 2
    assert [lay["expert_counts"] for lay in a["layers"]] == [lay["expert_counts"] for lay in b["layers"]]


def test_show_does_not_import_torch(tmp_path):
    lm = loaded(str(FIXTURES / "tiny-mixtral"))
    path = tmp_path / "t.safetensors"
    record_trace(lm, PROMPTS[:1]).save(path)
    code = (
        "import sys, json; from moetool.cli import main; main(['trace', 'show', sys.argv[1], '--json']); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] > 0


# -- bad input: one line, non-zero exit, no traceback ------------------------------------------------------
def test_empty_prompt_is_an_error():
    assert_one_line_error(run_cli("trace", FIXTURES / "tiny-mixtral", "--prompt", "  "), "empty prompt")
    assert_one_line_error(run_cli("trace", FIXTURES / "tiny-mixtral"), "nothing to trace")


def test_empty_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(run_cli("trace", FIXTURES / "tiny-mixtral", "--file", empty), "no text")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    assert_one_line_error(run_cli("trace", FIXTURES / "tiny-mixtral", "--file", bad), "bad.jsonl:2")


def test_dense_model_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    assert_one_line_error(run_cli("trace", tmp_path, "--prompt", "hi"), "dense")


def test_layer_count_mismatch_is_an_error(tmp_path):
    lm = loaded(str(FIXTURES / "tiny-mixtral"))
    trace = record_trace(lm, PROMPTS[:1])
    path = tmp_path / "t.safetensors"
    trace.save(path)
    other = loaded(str(FIXTURES / "tiny-deepseek-v3"))
    with pytest.raises(MoetoolError, match="2 layers"):
        check_trace_matches(trace, other.rc)
    check_trace_matches(trace, lm.rc)  # its own model: fine
    assert_one_line_error(run_cli("trace", "show", path, "--model", FIXTURES / "tiny-deepseek-v3"), "layers")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-trace", "missing-layer", "bad-ids"])
def test_corrupt_trace_file_is_an_error(tmp_path, damage):
    from safetensors.numpy import save_file

    lm = loaded(str(FIXTURES / "tiny-mixtral"))
    trace = record_trace(lm, PROMPTS[:1])
    path = tmp_path / "t.safetensors"
    trace.save(path)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    elif damage == "not-a-trace":
        save_file({"w": np.zeros(3, np.float32)}, str(path), metadata={"format": "pt"})
    elif damage == "missing-layer":
        tensors = {k: v for k, v in trace.tensors().items() if not k.startswith("layers.1.")}
        save_file(tensors, str(path), metadata=trace.metadata())
    elif damage == "bad-ids":
        tensors = trace.tensors()
        tensors["layers.0.experts"] = tensors["layers.0.experts"].copy()
        tensors["layers.0.experts"][0, 0] = 200
        save_file(tensors, str(path), metadata=trace.metadata())
    with pytest.raises(MoetoolError):
        Trace.load(path)
    needle = "not a moetool trace" if damage == "not-a-trace" else "corrupt trace file"
    assert_one_line_error(run_cli("trace", "show", path), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_impossible_device_map_is_an_error(tmp_path):
    assert_one_line_error(run_cli("trace", FIXTURES / "tiny-mixtral", "--prompt", "hi", "--device-map", "cuda:0"),
                          "no CUDA device")
    dmap = tmp_path / "map.json"
    dmap.write_text(json.dumps({"model.embed_tokens": 0, "": "cpu"}))
    with pytest.raises(MoetoolError, match="no CUDA device"):  # same path in-process: a JSON map
        load_model(str(FIXTURES / "tiny-mixtral"), device_map=str(dmap))
