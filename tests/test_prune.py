"""`moetool prune`: exactness (a pruned model computes what the original computes with the
dropped experts masked out of routing), selection by each method, config updates, group-limited
routing, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, assert_one_line_error, run_cli
from oracles import routing_mask
from moetool.errors import MoetoolError
from moetool.compression.prune import calibrate, choose_experts, prune_checkpoint, stats_from_trace

MIXTRAL = FIXTURES / "tiny-mixtral"
TEXT = ("def route(tokens):\n    return sorted(tokens, key=len)\n"
        "The router sends each token to two experts; their outputs are mixed by weight.")


@pytest.fixture(scope="module")
def dsv3_16(tmp_path_factory) -> Path:
    """DeepSeek-V3 with 16 experts in 4 groups (4 per group), so that pruning to 8 keeps 2 per
    group, which its router needs (a group scores by its top-2 experts); the tiny fixture has 2
    per group and cannot be pruned without --regroup."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(FIXTURES / "tiny-deepseek-v3")
    cfg.n_routed_experts = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("dsv3") / "dsv3-16"
    model.save_pretrained(out, max_shard_size="60KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tiny-deepseek-v3" / f, out / f)
    return out


EXACT_CASES = [("tiny-mixtral", 4), ("tiny-qwen3-moe", 5), ("tiny-qwen2-moe", 3), ("tiny-olmoe", 4),
               ("tiny-deepseek-v2", 4), ("tiny-gpt-oss", 4), ("dsv3-16", 8),
               ("tiny-glm4-moe", 5), ("tiny-minimax-m2", 4), ("tiny-qwen3-next", 5),
               ("derived-granitemoehybrid", 4)]


@pytest.mark.parametrize("name,keep", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_pruned_model_equals_original_with_dropped_experts_masked(name, keep, tmp_path, dsv3_16):
    import torch
    from transformers import AutoModelForCausalLM

    src = dsv3_16 if name == "dsv3-16" else FIXTURES / name
    out = tmp_path / "pruned"
    result = prune_checkpoint(str(src), str(out), keep=keep, by="random", seed=7, progress=False)
    kept = {row["layer"]: row["kept"] for row in result["selection"]["layers"]}
    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    original = AutoModelForCausalLM.from_pretrained(src)
    plain = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(0)
    ids = torch.randint(4, original.config.vocab_size, (3, 48))
    with torch.no_grad(), routing_mask(original, kept):
        want = original.eval()(ids).logits
    with torch.no_grad():
        got = pruned.eval()(ids).logits
        unmasked = plain.eval()(ids).logits
        assert torch.equal(original(ids).logits, unmasked)  # the mask is undone on exit
    diff = (want - got).abs().max().item()
    assert diff < 1e-4, diff
    assert (unmasked - got).abs().max().item() > 100 * max(diff, 1e-6)  # masking mattered
    from moetool.runtime.loading import loaded_from_model, moe_blocks

    _, _, router, _ = next(iter(moe_blocks(loaded_from_model(pruned))))  # the family's router module
    rows = next(p for p in router.parameters() if p.dim() == 2).shape[0]
    assert rows == keep == len(next(iter(kept.values())))


def test_frequency_and_weight_keep_the_most_used_experts(tmp_path):
    from moetool.analysis.trace import Trace, trace_model

    trace, _ = trace_model(str(MIXTRAL), [TEXT] * 3)
    path = tmp_path / "t.trace"
    trace.save(path)
    loaded = Trace.load(path)
    for by in ("frequency", "weight"):
        result = prune_checkpoint(str(MIXTRAL), str(tmp_path / by), keep=3, by=by, trace=str(path), progress=False)
        for row in result["selection"]["layers"]:
            L = row["layer"]
            ids = loaded.experts[L].astype(np.int64).ravel()
            w = loaded.weights[L].astype(np.float64).ravel()
            score = np.bincount(ids, minlength=8) if by == "frequency" else np.bincount(ids, weights=w, minlength=8)
            order = sorted(range(8), key=lambda e: (-score[e], e))[:3]
            assert row["kept"] == sorted(order)
            assert row["mass_kept"]["choices"] == pytest.approx(np.bincount(ids, minlength=8)[order].sum() / ids.size)
        card = (tmp_path / by / "README.md").read_text()
        assert str(path) in card and "| 0 | " in card


def test_reap_scores_match_a_direct_computation():
    """REAP from the hooks = mean over routed tokens of weight * ||expert output||, with the
    expert output computed here from the checkpoint's own w1/w2/w3 tensors."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = calibrate(str(MIXTRAL), [TEXT], reap=True)
    model = AutoModelForCausalLM.from_pretrained(MIXTRAL).eval()
    tok = AutoTokenizer.from_pretrained(MIXTRAL)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    captured = {}
    hooks = []
    for L, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, o, L=L: captured.setdefault(L, {}).update(x=a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda m, a, o, L=L: captured.setdefault(L, {}).update(w=o[1], idx=o[2])))
    with torch.no_grad():
        model(ids)
    index = json.loads((MIXTRAL / "model.safetensors.index.json").read_text())["weight_map"]

    def tensor(name):
        with safe_open(str(MIXTRAL / index[name]), "pt") as f:
            return f.get_tensor(name)

    for L in range(model.config.num_hidden_layers):
        x, w, idx = captured[L]["x"], captured[L]["w"], captured[L]["idx"]
        for e in range(8):
            tok_i, slot = (idx == e).nonzero(as_tuple=True)
            p = f"model.layers.{L}.block_sparse_moe.experts.{e}."
            xe = x[tok_i]
            out = (torch.nn.functional.silu(xe @ tensor(p + "w1.weight").T) * (xe @ tensor(p + "w3.weight").T)) \
                @ tensor(p + "w2.weight").T
            want = float((w[tok_i, slot] * out.norm(dim=-1)).mean()) if len(tok_i) else 0.0
            assert stats.reap[L][e] == pytest.approx(want, rel=1e-4, abs=1e-7)
            assert stats.counts[L][e] == len(tok_i)


def test_reap_with_only_a_trace_reruns_its_texts(tmp_path):
    from moetool.analysis.trace import trace_model

    trace, _ = trace_model(str(MIXTRAL), [TEXT])
    path = tmp_path / "t.trace"
    trace.save(path)
    result = prune_checkpoint(str(MIXTRAL), str(tmp_path / "o"), keep=4, by="reap", trace=str(path), progress=False)
    src = result["selection"]["statistics"]
    assert "run again" in src["rerun"] and src["trace"] == str(path)
    direct = calibrate(str(MIXTRAL), [TEXT], reap=True)
    for row in result["selection"]["layers"]:
        assert row["scores"] == pytest.approx(list(direct.reap[row["layer"]]))


def test_global_budget_pads_every_layer_to_the_largest_count():
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    rc = resolve_family(resolve(str(MIXTRAL)))
    from moetool.compression.prune import RoutingStats

    counts = {0: np.array([100, 90, 80, 1, 1, 1, 1, 1]), 1: np.array([30, 30, 30, 30, 30, 30, 2, 2])}
    stats = RoutingStats(8, 2, [0, 1], 100, counts, {L: c * 0.5 for L, c in counts.items()})
    choice = choose_experts(rc, stats, keep=4, by="frequency", global_budget=True)
    info = choice["info"]
    # shares: layer 0 = [.36 .33 .29 ~0...], layer 1 = [.16 x6, .01 x2]: the 8 best are layer 0's
    # three big ones and layer 1's six equal ones minus one (tie: lower layer, lower id first)
    assert info["global_wanted"] == {0: 3, 1: 5} and info["budget"] == 8
    assert choice["keep"] == 5 and info["kept_total"] == 10
    assert choice["kept"][0] == [0, 1, 2, 3, 4] and choice["kept"][1] == [0, 1, 2, 3, 4]


def test_random_is_seeded():
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    rc = resolve_family(resolve(str(FIXTURES / "tiny-olmoe")))
    a = choose_experts(rc, None, 4, "random", seed=1)["kept"]
    assert a == choose_experts(rc, None, 4, "random", seed=1)["kept"]
    assert any(a[L] != choose_experts(rc, None, 4, "random", seed=2)["kept"][L] for L in a)


def test_config_updates_use_the_keys_present(tmp_path):
    src = FIXTURES / "tiny-qwen3-moe"
    assert "num_experts" not in json.loads((src / "config.json").read_text())  # transformers 5 wrote num_local_experts
    prune_checkpoint(str(src), str(tmp_path / "q"), keep=1, by="random", progress=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["num_local_experts"] == 1 and "num_experts" not in cfg
    assert cfg["num_experts_per_tok"] == 1  # top-k clipped to the experts left
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q", output_loading_info=True)
    assert not any(info.values())
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 1


def test_deepseek_v2_keeps_the_same_count_in_every_group(tmp_path):
    result = prune_checkpoint(str(FIXTURES / "tiny-deepseek-v2"), str(tmp_path / "o"), keep=4, by="random",
                              seed=3, progress=False)
    assert result["selection"]["method"]["groups"] == {"n_group": 4, "topk_group": 2, "per_group": 1}
    for row in result["selection"]["layers"]:
        assert sorted(e // 2 for e in row["kept"]) == [0, 1, 2, 3]
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["n_group"] == 4 and cfg["n_routed_experts"] == 4


def test_deepseek_v3_groups_refused_with_a_reason_or_regrouped(tmp_path):
    src = FIXTURES / "tiny-deepseek-v3"
    r = run_cli("prune", src, "--out", tmp_path / "a", "--keep", "4", "--by", "random")
    assert_one_line_error(r, "top 2 experts")
    assert "--regroup" in r.stderr
    with pytest.raises(MoetoolError, match="multiple of 4"):
        prune_checkpoint(str(src), str(tmp_path / "b"), keep=6, by="random", progress=False)
    result = prune_checkpoint(str(src), str(tmp_path / "c"), keep=4, by="random", regroup=True, progress=False)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (cfg["n_group"], cfg["topk_group"], cfg["n_routed_experts"]) == (1, 1, 4)
    assert result["config_changes"]["n_group"] == {"from": 4, "to": 1}
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "c", output_loading_info=True)
    assert not any(info.values())
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.shape == (4,)


def test_cli_json_and_ratio(tmp_path):
    out = tmp_path / "o"
    r = run_cli("prune", MIXTRAL, "--out", out, "--ratio", "0.25", "--by", "random", "--seed", "5", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["num_experts"] == {"before": 8, "after": 6}
    assert data["config_changes"] == {"num_local_experts": {"from": 8, "to": 6}}
    assert sum(f["bytes"] for f in data["files"]) > data["bytes"]["output"]  # headers on top of tensor bytes
    assert (out / "README.md").read_text().count("| 0 | ") == 1


@pytest.mark.parametrize("args,needle", [
    (["--keep", "4", "--ratio", "0.5"], "exactly one of --keep"),
    (["--by", "frequency"], "exactly one of --keep"),
    (["--keep", "8", "--by", "random"], "prunes nothing"),
    (["--keep", "0", "--by", "random"], "at least one expert"),
    (["--ratio", "1.5", "--by", "random"], "between 0 and 1"),
    (["--keep", "4"], "--trace FILE or --file TEXT"),
    (["--keep", "4", "--trace", "nope.trace"], "no such trace file"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    r = run_cli("prune", MIXTRAL, "--out", tmp_path / "o", *args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o").exists()


def test_trace_of_another_model_is_refused(tmp_path):
    from moetool.analysis.trace import trace_model

    trace, _ = trace_model(str(FIXTURES / "tiny-qwen3-moe"), [TEXT])
    trace.save(tmp_path / "q.trace")
    r = run_cli("prune", MIXTRAL, "--out", tmp_path / "o", "--keep", "4", "--trace", tmp_path / "q.trace")
    assert_one_line_error(r, "--trace")


def test_stats_from_trace_counts_every_choice():
    from moetool.analysis.trace import trace_model

    trace, _ = trace_model(str(MIXTRAL), [TEXT])
    stats = stats_from_trace(trace)
    for L in stats.layers:
        assert stats.counts[L].sum() == trace.tokens * trace.top_k
        assert stats.weight[L].sum() == pytest.approx(trace.weights[L].astype(np.float64).sum())


@pytest.mark.slow
def test_informed_pruning_beats_random_on_the_trained_fixture():
    """On held-out text, pruning half the experts of fixtures/trained-mixtral by frequency,
    weight or REAP gives lower perplexity than random pruning (mean of 3 seeds). The full
    experiment (both trained models, 25% and 50%, merging too) is bench/quality_compression.py."""
    import sys

    trained = FIXTURES / "trained-mixtral"
    if not (trained / "config.json").exists():
        pytest.skip("fixtures/trained-mixtral is not built (python fixtures/train_tiny.py)")
    sys.path.insert(0, str(FIXTURES.parent / "bench"))
    import quality_compression as q

    res = q.run_experiment(models=("trained-mixtral",), ratios=(0.5,), seeds=(0, 1, 2), calib_tokens=4096,
                           eval_tokens=4096, with_importance=False, work=FIXTURES.parent / "bench" / "work" / "quality-test")
    rows = {r["method"]: r for r in res["rows"]}
    for method in ("prune frequency", "prune weight", "prune reap"):
        assert rows[method]["ppl"] < rows["prune random"]["ppl"], (method, rows[method]["ppl"], rows["prune random"]["ppl"])
