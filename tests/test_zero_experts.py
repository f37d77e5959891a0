"""Zero-computation (identity) experts, LongCat-Flash's: the router scores them after the routed
experts and a token's choice of one computes nothing. Checked on fixtures/tiny-longcat-flash
(8 routed + 2 zero experts, top-2) against transformers' own model:

- params: the zero experts' gate/up rows that save_pretrained writes are counted as what they
  are (in the total, never active), and active per token is a range whose ends are worked out
  here by hand from the config;
- trace: the share of choices that went to a zero expert equals what the experts modules
  received, read by this test's own hook;
- prune: the output keeps every zero expert, renumbered after the kept routed experts (the
  masked-routing identity itself is in tests/test_every_family.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES

FX = FIXTURES / "tiny-longcat-flash"
TEXT = "The router sends each token to two experts; some of them compute nothing at all."


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((FX / "config.json").read_text())


def test_params_counts_zero_expert_rows_apart_and_active_as_a_range(config):
    from moetool.analysis.params import count_params

    report = count_params(str(FX))
    E, Z, k = config["n_routed_experts"], config["zero_expert_num"], config["moe_topk"]
    H, inter, layers = config["hidden_size"], config["expert_ffn_hidden_size"], config["num_layers"]
    assert Z > 0 and report["warnings"] == []
    assert report["unused_expert_params"] == layers * Z * 2 * inter * H  # gate and up rows of each zero expert
    per_expert = 3 * inter * H
    routed_active = layers * k * per_expert
    assert report["roles"]["routed_experts"]["active"] == routed_active
    assert report["roles"]["routed_experts"]["total"] == layers * E * per_expert + report["unused_expert_params"]
    assert report["active_min"] == report["active"] - routed_active  # every choice a zero expert
    assert report["architecture"]["zero_experts"] == Z
    assert any("zero-computation" in n for n in report["notes"])


def test_trace_zero_expert_share_equals_the_experts_modules_inputs(config):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moetool.analysis.trace import trace_model
    from moetool.analysis.trace_stats import summarize

    trace, _ = trace_model(str(FX), [TEXT])
    E, k = config["n_routed_experts"], config["moe_topk"]
    assert trace.zero_experts == config["zero_expert_num"]
    summary = summarize(trace)

    model = AutoModelForCausalLM.from_pretrained(FX).eval()
    seen = []
    for name, m in model.named_modules():
        if type(m).__name__.endswith("Experts"):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].reshape(-1).clone()))
    ids = AutoTokenizer.from_pretrained(FX)([TEXT], return_tensors="pt")
    with torch.no_grad():
        model(**ids)
    assert len(seen) == len(trace.moe_layers)
    for lay, got in zip(summary["layers"], seen):
        want = float((got >= E).float().mean())
        assert 0 < want < 1  # the fixture's routing picks both kinds, so the figure is tested
        assert lay["zero_expert_share"] == pytest.approx(want, abs=1e-6)
        assert sum(lay["expert_counts"]) == int((got < E).sum())
    share = summary["overall"]["zero_expert_share"]
    assert summary["overall"]["routed_experts_per_token"] == pytest.approx(k * (1 - share), abs=1e-3)


def test_prune_keeps_the_zero_experts_after_the_kept_ones(tmp_path, config):
    from safetensors import safe_open

    from moetool.compression.prune import prune_checkpoint

    out = tmp_path / "pruned"
    prune_checkpoint(str(FX), str(out), keep=5, by="random", seed=3, progress=False)
    new = json.loads((out / "config.json").read_text())
    assert new["n_routed_experts"] == 5 and new["zero_expert_num"] == config["zero_expert_num"]
    E, Z = config["n_routed_experts"], config["zero_expert_num"]
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "np") as s:
            tensors.update({n: s.get_tensor(n) for n in s.keys()})
    original = {}
    for f in sorted(FX.glob("*.safetensors")):
        with safe_open(f, "np") as s:
            original.update({n: s.get_tensor(n) for n in s.keys()})
    for L in range(config["num_layers"]):
        pre = f"model.layers.{L}.mlp."
        router = tensors[pre + "router.classifier.weight"]
        assert router.shape[0] == 5 + Z
        # the zero experts' router rows, correction bias and gate/up rows: the original's last Z, in order
        np.testing.assert_array_equal(router[5:], original[pre + "router.classifier.weight"][E:])
        np.testing.assert_array_equal(tensors[pre + "router.e_score_correction_bias"][5:],
                                      original[pre + "router.e_score_correction_bias"][E:])
        for z in range(Z):
            np.testing.assert_array_equal(tensors[f"{pre}experts.{5 + z}.gate_proj.weight"],
                                          original[f"{pre}experts.{E + z}.gate_proj.weight"])
            assert f"{pre}experts.{5 + z}.down_proj.weight" not in tensors


@pytest.fixture(scope="module")
def published(tmp_path_factory, config):
    """tiny-longcat-flash in the published layout: without the zero experts' gate/up rows."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("longcat") / "published"
    out.mkdir()
    E = config["n_routed_experts"]
    index = json.loads((FX / "model.safetensors.index.json").read_text())
    kept = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(FX / f, "pt") as s:
            tensors = {n: s.get_tensor(n) for n in s.keys()
                       if not (".experts." in n and int(n.split(".experts.")[1].split(".")[0]) >= E)}
        save_file(tensors, str(out / f), metadata={"format": "pt"})
        kept.update({n: f for n in tensors})
    assert len(kept) < len(index["weight_map"])
    index["weight_map"] = kept
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in FX.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())
        elif f.name.startswith("tokenizer"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_published_layout_counts_like_the_published_model(published):
    from moetool.analysis.params import count_params

    report = count_params(str(published))
    assert report["warnings"] == [] and "unused_expert_params" not in report
    assert report["total"] == count_params(str(FX / "config.json"))["total"]


def test_published_layout_is_streamed_and_routes_like_save_pretrained(published):
    from moetool.analysis.trace import record_trace
    from moetool.errors import MoetoolError
    from moetool.runtime.loading import load_model

    with pytest.raises(MoetoolError, match="--stream") as exc:
        load_model(str(published))  # whole: transformers' size mismatch, said in one line
    assert "\n" not in str(exc.value)
    streamed = load_model(str(published), stream=None)  # chosen by itself
    assert streamed.layer_reader is not None
    a = record_trace(streamed, [TEXT])
    b = record_trace(load_model(str(FX)), [TEXT])
    for L in a.moe_layers:
        np.testing.assert_array_equal(a.experts[L], b.experts[L])
        np.testing.assert_allclose(a.weights[L].astype(np.float32), b.weights[L].astype(np.float32), atol=1e-3)
