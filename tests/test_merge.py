"""`moetool merge-experts`: grouping, usage-weighted averaging of weights and router rows,
neuron alignment, group-limited routing, loading, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, assert_one_line_error, run_cli
from moetool.compression.merge import greedy_match, group_experts, merge_checkpoint, usage_weights

MIXTRAL = FIXTURES / "tiny-mixtral"
TEXT = ("def route(tokens):\n    return sorted(tokens, key=len)\n"
        "The router sends each token to two experts; their outputs are mixed by weight.")


def _reader(d: Path):
    from safetensors import safe_open

    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]

    def get(name):
        with safe_open(str(d / index[name]), "pt") as f:
            return f.get_tensor(name)

    return get


@pytest.fixture(scope="module")
def mixtral_trace(tmp_path_factory) -> Path:
    from moetool.analysis.trace import trace_model

    trace, _ = trace_model(str(MIXTRAL), [TEXT] * 2, logits=True)
    path = tmp_path_factory.mktemp("trace") / "mixtral.trace"
    trace.save(path)
    return path


def test_merged_weights_and_router_rows_are_usage_weighted_means(tmp_path, mixtral_trace):
    import torch
    from transformers import AutoModelForCausalLM

    from moetool.analysis.trace import Trace

    out = tmp_path / "m"
    result = merge_checkpoint(str(MIXTRAL), str(out), 3, similarity="router", trace=str(mixtral_trace), progress=False)
    trace = Trace.load(mixtral_trace)
    src, dst = _reader(MIXTRAL), _reader(out)
    for row in result["merge"]["layers"]:
        L = row["layer"]
        counts = np.bincount(trace.experts[L].astype(np.int64).ravel(), minlength=8)
        assert sorted(g["sources"][0] for g in row["groups"]) == sorted(np.lexsort((np.arange(8), -counts))[:3].tolist())
        assert sorted(e for g in row["groups"] for e in g["sources"]) == list(range(8))
        router = dst(f"model.layers.{L}.block_sparse_moe.gate.weight")
        assert router.shape[0] == 3
        for j, g in enumerate(row["groups"]):
            w = counts[g["sources"]] / counts[g["sources"]].sum()
            assert g["weights"] == pytest.approx(w.tolist(), abs=1e-6)
            for proj in ("w1", "w2", "w3"):
                want = sum(float(wi) * src(f"model.layers.{L}.block_sparse_moe.experts.{e}.{proj}.weight")
                           for e, wi in zip(g["sources"], w))
                got = dst(f"model.layers.{L}.block_sparse_moe.experts.{j}.{proj}.weight")
                assert torch.allclose(got, want.to(got.dtype), atol=1e-6)
            rows = src(f"model.layers.{L}.block_sparse_moe.gate.weight")[g["sources"]]
            assert torch.allclose(router[j], (torch.tensor(w, dtype=torch.float32)[:, None] * rows).sum(0), atol=1e-6)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    card = (out / "README.md").read_text()
    assert "usage" in card.lower() and str(mixtral_trace) in card


def test_grouping_takes_the_most_used_as_dominants_and_joins_the_most_similar():
    usage = np.array([50, 5, 40, 1, 30, 2])
    sim = np.eye(6)
    sim[1, 4] = sim[4, 1] = 0.9  # 1 looks like 4
    sim[3, 2] = sim[2, 3] = 0.8  # 3 looks like 2
    sim[5, 0] = sim[0, 5] = 0.7  # 5 looks like 0
    assert group_experts(sim, usage, 3) == [[0, 5], [2, 3], [4, 1]]
    # with 2 routing groups of 3 (ids 0-2 and 3-5), merging stays inside each group
    groups = group_experts(sim, usage, 2, groups=(2, 1, 1))
    assert groups == [[0, 1, 2], [4, 3, 5]]
    assert usage_weights([0, 5], usage) == pytest.approx([50 / 52, 2 / 52])
    assert usage_weights([3], np.zeros(6)) == [1.0]


def test_greedy_match_recovers_a_permutation():
    import torch

    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(64, 20), dim=1)
    p = torch.randperm(64)
    other = feats[p]
    perm = greedy_match(feats @ other.T)
    assert torch.equal(other[perm], feats)


def test_align_merges_a_neuron_permuted_copy_back_into_the_original(tmp_path):
    """Expert 1 := expert 0 with its hidden neurons shuffled (the same function). Averaging
    them neuron by neuron blurs the weights; with alignment the merge gives expert 0 back."""
    import torch
    from safetensors.torch import load_file, save_file

    from moetool.compression.merge import alignment_perms
    from moetool.compression.surgery import Checkpoint, OutExpert, _Combiner

    src = tmp_path / "model"
    shutil.copytree(MIXTRAL, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    torch.manual_seed(1)
    perm = torch.randperm(48)
    get = _reader(MIXTRAL)
    p0, p1 = "model.layers.0.block_sparse_moe.experts.0.", "model.layers.0.block_sparse_moe.experts.1."
    new = {p1 + "w1.weight": get(p0 + "w1.weight")[perm], p1 + "w3.weight": get(p0 + "w3.weight")[perm],
           p1 + "w2.weight": get(p0 + "w2.weight")[:, perm]}
    for name, t in new.items():
        f = src / index[name]
        tensors = load_file(str(f))
        tensors[name] = t.contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    ckpt = Checkpoint(str(src))
    perms = alignment_perms(ckpt, 0, [0, 1])
    combiner = _Combiner(ckpt)
    template = "model.layers.0.block_sparse_moe.experts.{E}."
    for proj, kind in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
        aligned = combiner.expert_tensor(template + proj + ".weight", OutExpert([0, 1], [0.5, 0.5], perms), kind, "F32")
        naive = combiner.expert_tensor(template + proj + ".weight", OutExpert([0, 1], [0.5, 0.5]), kind, "F32")
        original = get(p0 + proj + ".weight")
        assert torch.allclose(aligned, original, atol=1e-6)
        assert not torch.allclose(naive, original, atol=1e-3)


@pytest.mark.parametrize("name,to,regroup", [("tiny-qwen2-moe", 3, False), ("tiny-deepseek-v2", 4, False),
                                             ("tiny-deepseek-v3", 4, True), ("tiny-gpt-oss", 4, False),
                                             ("tiny-glm4-moe", 4, False), ("tiny-minimax-m2", 3, False),
                                             ("tiny-qwen3-next", 4, False), ("derived-granitemoehybrid", 4, False)])
def test_merged_checkpoints_load(tmp_path, name, to, regroup):
    import torch
    from transformers import AutoModelForCausalLM

    src = FIXTURES / name
    out = tmp_path / "m"
    from moetool.analysis.trace import trace_model

    trace, _ = trace_model(str(src), [TEXT], logits=True)
    trace.save(tmp_path / "t.trace")
    result = merge_checkpoint(str(src), str(out), to, similarity="router", trace=str(tmp_path / "t.trace"),
                              regroup=regroup, progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
    if name == "tiny-deepseek-v2":  # 4 routing groups of 2 experts: each group merges into one
        for row in result["merge"]["layers"]:
            assert [sorted(g["sources"]) for g in row["groups"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    if name == "tiny-deepseek-v3":  # the score-correction bias is merged like the router rows
        get = _reader(src)
        L = result["merge"]["layers"][0]["layer"]
        bias = get(f"model.layers.{L}.mlp.gate.e_score_correction_bias")
        merged = model.model.layers[L].mlp.gate.e_score_correction_bias
        for j, g in enumerate(result["merge"]["layers"][0]["groups"]):
            want = sum(w * float(bias[e]) for e, w in zip(g["sources"], g["weights"]))
            assert float(merged[j]) == pytest.approx(want, abs=1e-5)


def test_router_row_dominant_keeps_the_dominant_experts_row(tmp_path):
    """--router-row dominant: each merged expert's router row and score-correction bias are
    exactly its dominant (first, most used) member's, while the expert weights are still the
    usage-weighted average; average (the default) differs wherever a group has several members."""
    import torch

    from moetool.analysis.trace import trace_model

    src = FIXTURES / "tiny-deepseek-v3"
    trace, _ = trace_model(str(src), [TEXT], logits=True)
    trace.save(tmp_path / "t.trace")
    kw = dict(similarity="router", trace=str(tmp_path / "t.trace"), regroup=True, progress=False)
    dom = merge_checkpoint(str(src), str(tmp_path / "dom"), 4, router_row="dominant", **kw)
    avg = merge_checkpoint(str(src), str(tmp_path / "avg"), 4, **kw)
    assert dom["merge"]["router_row"] == "dominant" and avg["merge"]["router_row"] == "average"
    assert "the dominant member's row" in (tmp_path / "dom" / "README.md").read_text()
    get, got, got_avg = _reader(src), _reader(tmp_path / "dom"), _reader(tmp_path / "avg")
    multi = 0
    for row in dom["merge"]["layers"]:
        L = row["layer"]
        w_in, b_in = get(f"model.layers.{L}.mlp.gate.weight"), get(f"model.layers.{L}.mlp.gate.e_score_correction_bias")
        w_out, b_out = got(f"model.layers.{L}.mlp.gate.weight"), got(f"model.layers.{L}.mlp.gate.e_score_correction_bias")
        w_avg = got_avg(f"model.layers.{L}.mlp.gate.weight")
        for j, g in enumerate(row["groups"]):
            assert torch.equal(w_out[j], w_in[g["sources"][0]]) and b_out[j] == b_in[g["sources"][0]]
            if len(g["sources"]) > 1 and min(g["weights"]) > 0:
                multi += 1
                assert not torch.allclose(w_avg[j], w_out[j])
        # expert weights are merged the same way under both rules
        name = f"model.layers.{L}.mlp.experts.0.down_proj.weight"
        assert torch.equal(got(name), got_avg(name))
    assert multi > 0
    r = run_cli("merge-experts", src, "--out", tmp_path / "x", "--to", "4", "--router-row", "first",
                "--trace", tmp_path / "t.trace")
    assert_one_line_error(r, "--router-row")


def test_cli_output_similarity_from_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT + "\n" + TEXT.upper() + "\n")
    out = tmp_path / "m"
    r = run_cli("merge-experts", MIXTRAL, "--out", out, "--to", "4", "--similarity", "output", "--file", text,
                "--align", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["num_experts"] == {"before": 8, "after": 4} and data["merge"]["align"] is True
    assert data["merge"]["statistics"]["file"] == str(text)
    assert all(len(row["groups"]) == 4 for row in data["merge"]["layers"])


def test_weight_similarity_needs_no_forward_pass_beyond_usage(tmp_path, mixtral_trace):
    result = merge_checkpoint(str(MIXTRAL), str(tmp_path / "m"), 6, similarity="weight", trace=str(mixtral_trace),
                              progress=False)
    assert "rerun" not in result["merge"]["statistics"]
    for row in result["merge"]["layers"]:
        sims = [g["similarity"] for g in row["groups"]]
        assert all(abs(s[0] - 1.0) < 1e-9 for s in sims)  # a dominant is itself


@pytest.mark.parametrize("args,needle", [
    (["--to", "8", "--file", "x.txt"], "merges nothing"),
    (["--to", "4"], "--trace FILE or --file TEXT"),
    (["--to", "4", "--file", "missing.txt"], "no such file"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    r = run_cli("merge-experts", MIXTRAL, "--out", tmp_path / "o", *args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o").exists()


def test_weight_similarity_in_chunks_equals_the_direct_cosine():
    """The chunked, streaming Gram matrix equals the cosine similarity of each expert's
    flattened (w1, w2, w3) computed in one go."""
    import torch

    from moetool.compression.merge import weight_similarity
    from moetool.compression.surgery import Checkpoint

    ckpt = Checkpoint(str(MIXTRAL))
    got = weight_similarity(ckpt, 1, 8, chunk_bytes=5000)  # many chunks per projection
    get = _reader(MIXTRAL)
    flat = torch.stack([torch.cat([get(f"model.layers.1.block_sparse_moe.experts.{e}.{p}.weight").reshape(-1)
                                   for p in ("w1", "w2", "w3")]).double() for e in range(8)])
    flat = flat / flat.norm(dim=1, keepdim=True)
    assert np.abs(got - (flat @ flat.T).numpy()).max() < 1e-6
