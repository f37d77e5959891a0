"""Every command on every fixture (issue #13's proof): each tiny checkpoint under fixtures/
(`tiny-*` for the curated families, `derived-*` for families moetool reads off transformers) is
counted, traced, pruned, merged, evaluated and planned as a user would (the library functions
the commands call), and each result is checked against an independent truth:

- params: the count from the safetensors headers equals transformers' model on the meta device;
- trace: the per-layer expert counts equal what each experts module received, captured here by a
  forward pre-hook of this test's own on the experts modules of a model loaded with transformers;
- prune: the pruned checkpoint's logits equal the original's with the dropped experts masked out
  of routing (tests/oracles.py), with the config changes the prune made (other than the expert
  count) applied to the original;
- merge-experts: the output loads with from_pretrained, no missing or unexpected keys, and runs;
- eval: runs, finite loss; plan: runs on the trace;
- distill: a family without a dense sibling is refused in one line naming those that have one.

Fixtures are found by globbing, so a new fixture is covered by adding it to fixtures/make_tiny.py.
Where a family cannot be done safely the command refuses in one line: REFUSED lists those, and
the test asserts exactly that refusal."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from oracles import routing_mask

ALL = sorted(p for pattern in ("tiny-*", "derived-*") for p in FIXTURES.glob(pattern) if p.is_dir())
IDS = [p.name for p in ALL]
TEXT = ("def route(tokens):\n    return sorted(tokens, key=len)\n"
        "The router sends each token to two experts; their outputs are mixed by weight.")
# fixture -> command -> the words its one-line refusal must contain (a deliberate, documented refusal)
_SEVERAL = "a layer has several experts modules"  # JetMoE: mixture of attention heads beside the MoE MLP
_HASHED = "fixed token-id -> expert table"  # DeepSeek-V4's first layers route by token id (tid2eid)
REFUSED: dict[str, dict[str, str]] = {"derived-jetmoe": {"prune": _SEVERAL, "merge-experts": _SEVERAL},
                                      "tiny-deepseek-v4": {"prune": _HASHED, "merge-experts": _HASHED}}


def _refusal(fixture: Path, command: str):
    return REFUSED.get(fixture.name, {}).get(command)


@lru_cache(maxsize=None)
def _config(path: str) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _resolved(path: str):
    from moetool.families import family_for_config

    config = _config(path)
    return family_for_config(config).resolve(config)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """fixture -> (trace, its file, experts per layer): one trace per fixture (with router logits,
    for merge's router similarity), made and saved the first time a test asks for it."""
    from moetool.analysis.trace import trace_model

    done: dict[str, tuple] = {}

    def get(fixture: Path):
        if fixture.name not in done:
            trace, loaded = trace_model(str(fixture), [TEXT], logits=True)
            file = tmp_path_factory.mktemp(fixture.name) / "t.trace"
            trace.save(file)
            done[fixture.name] = (trace, str(file), loaded.rc.num_experts)
        return done[fixture.name]

    return get


def _experts_modules(model) -> dict[int, list]:
    """transformers' experts modules, found without moetool, by decoder layer: a module whose
    class name ends in "Experts" and that holds 3-D (fused, one slice per expert) parameters."""
    import re

    out: dict[int, list] = {}
    for name, m in model.named_modules():
        if type(m).__name__.endswith("Experts") and any(p.dim() == 3 for p in m.parameters(recurse=False)):
            out.setdefault(int(re.search(r"layers\.(\d+)\.", name).group(1)), []).append(m)
    return out


def _counts_from_experts_inputs(args, E: int) -> np.ndarray:
    """Tokens each expert received, read off the experts module's own inputs: the top-k index
    tensor where the module takes one; the tokens per expert where it takes its inputs grouped
    by expert (JetMoE's parallel experts: a list of E sizes); else (Llama 4: every expert gets
    every token, scaled by its routing score, 0 for experts not chosen) the non-zero rows of each
    expert's slice."""
    import torch

    index = next((a for a in args[1:] if isinstance(a, torch.Tensor) and not a.is_floating_point()), None)
    if index is not None:
        return np.bincount(index.reshape(-1).numpy().astype(np.int64), minlength=E)
    sizes = next((a for a in args[1:] if isinstance(a, (list, tuple)) and len(a) == E), None)
    if sizes is not None:
        return np.asarray(sizes, dtype=np.int64)
    rows = args[0].reshape(E, -1, args[0].shape[-1])
    return (rows != 0).any(dim=-1).sum(dim=1).numpy()


@pytest.mark.parametrize("fixture", ALL, ids=IDS)
def test_params_from_headers_equals_transformers(fixture):
    from moetool.families.derive import build_meta_model, hf_config_for, meta_count
    from moetool.analysis.params import count_params

    report = count_params(str(fixture))
    assert report["source"] == "checkpoint" and report["warnings"] == []  # every tensor on disk classified
    assert report["total"] == meta_count(build_meta_model(hf_config_for(_config(str(fixture)))))
    assert sum(r["total"] for r in report["roles"].values()) == report["total"]


@pytest.mark.parametrize("fixture", ALL, ids=IDS)
def test_trace_counts_equal_the_experts_modules_inputs(fixture, traced):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trace, _file, E = traced(fixture)
    model = AutoModelForCausalLM.from_pretrained(fixture).eval()
    experts = _experts_modules(model)
    seen: dict[int, list] = {L: [] for L in experts}
    hooks = [m.register_forward_pre_hook(lambda mod, args, L=L: seen[L].append(_counts_from_experts_inputs(args, E)))
             for L, mods in experts.items() for m in mods]
    ids = AutoTokenizer.from_pretrained(fixture)(TEXT, return_tensors="pt")
    try:
        with torch.no_grad():
            model(**ids)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(experts) == trace.moe_layers and trace.moe_layers
    assert trace.tokens == ids["input_ids"].numel()
    for L in trace.moe_layers:
        recorded = np.bincount(trace.experts[L].astype(np.int64).ravel(), minlength=E)
        assert recorded.sum() == trace.tokens * trace.top_k
        # the MoE block's experts module (JetMoE's layers also hold attention experts, routed apart)
        assert any(recorded.tolist() == counts.tolist() for counts in seen[L]), f"layer {L}"


@pytest.mark.parametrize("fixture", ALL, ids=IDS)
def test_pruned_equals_original_with_dropped_experts_masked(fixture, tmp_path, traced):
    import torch
    from transformers import AutoModelForCausalLM

    from moetool.errors import MoetoolError
    from moetool.compression.prune import prune_checkpoint

    E = traced(fixture)[2]
    keep = E // 2
    out = tmp_path / "pruned"
    if (needle := _refusal(fixture, "prune")):
        with pytest.raises(MoetoolError, match=needle) as exc:
            prune_checkpoint(str(fixture), str(out), keep=keep, by="random", seed=7, progress=False)
        assert "\n" not in str(exc.value) and not out.exists()
        return
    try:
        result = prune_checkpoint(str(fixture), str(out), keep=keep, by="random", seed=7, progress=False)
    except MoetoolError as exc:  # routing groups that cannot be cut evenly: refused unless --regroup
        assert "--regroup" in str(exc) and "\n" not in str(exc)
        result = prune_checkpoint(str(fixture), str(out), keep=keep, by="random", seed=7, regroup=True, progress=False)
    kept = {row["layer"]: row["kept"] for row in result["selection"]["layers"]}
    # the original, told what the prune changed besides the expert count (group limits, top-k)
    changes = {k: v["to"] for k, v in result["config_changes"].items() if (v["from"], v["to"]) != (E, keep)}
    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    original = AutoModelForCausalLM.from_pretrained(fixture, **changes).eval()
    torch.manual_seed(0)
    ids = torch.randint(4, pruned.config.vocab_size, (2, 24))
    with torch.no_grad():
        unmasked = original(ids).logits
        with routing_mask(original, kept):
            want = original(ids).logits
        got = pruned.eval()(ids).logits
    diff = (want - got).abs().max().item()
    assert diff < 1e-4, diff
    assert (unmasked - got).abs().max().item() > 100 * max(diff, 1e-6)  # masking mattered
    zero = _resolved(str(fixture)).zero_experts  # LongCat: transformers allocates gate/up for its zero experts too
    for L, mods in _experts_modules(pruned).items():  # every experts module holds KEEP experts
        assert all(p.shape[0] in (keep, keep + zero) for m in mods for p in m.parameters(recurse=False)
                   if p.dim() == 3), L


@pytest.mark.parametrize("fixture", ALL, ids=IDS)
def test_merged_checkpoint_loads_and_runs(fixture, tmp_path, traced):
    import torch
    from transformers import AutoModelForCausalLM

    from moetool.errors import MoetoolError
    from moetool.compression.merge import merge_checkpoint

    _trace_obj, trace_file, E = traced(fixture)
    out = tmp_path / "merged"
    kw = dict(similarity="router", trace=trace_file, progress=False)
    if (needle := _refusal(fixture, "merge-experts")):
        with pytest.raises(MoetoolError, match=needle) as exc:
            merge_checkpoint(str(fixture), str(out), E // 2, **kw)
        assert "\n" not in str(exc.value) and not out.exists()
        return
    try:
        result = merge_checkpoint(str(fixture), str(out), E // 2, **kw)
    except MoetoolError as exc:
        assert "--regroup" in str(exc) and "\n" not in str(exc)
        result = merge_checkpoint(str(fixture), str(out), E // 2, regroup=True, **kw)
    assert result["num_experts"]["after"] == E // 2
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits).all()


@pytest.mark.parametrize("fixture", ALL, ids=IDS)
def test_eval_runs(fixture, tmp_path):
    from moetool.analysis.evaluate import evaluate_models

    text = tmp_path / "t.txt"
    text.write_text(TEXT * 2)
    result = evaluate_models([str(fixture)], str(text), max_tokens=48, progress=False)
    row = result["models"][0]
    assert row["tokens"] == 47 and np.isfinite(row["nll"]) and row["nll"] > 0


@pytest.mark.parametrize("fixture", ALL, ids=IDS)
def test_plan_runs_on_the_trace(fixture, traced):
    from moetool.analysis.plan import plan

    trace, trace_file, _E = traced(fixture)
    report = plan(str(fixture), gpu_memory="1MB", trace=trace_file).report
    assert report["family"] == _config(str(fixture))["model_type"]
    assert report["routing"]["source"] == "trace" and report["routing"]["tokens"] == trace.tokens


# distill makes the dense sibling a family's spec describes; the others are refused, naming these
DISTILLABLE = ["deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("fixture", ALL, ids=IDS)
def test_distill_refusal_names_the_families_that_can_be_distilled(fixture, tmp_path):
    """A family without a dense sibling is refused in one line, before anything is loaded, with
    the families that can be distilled (those are run in tests/test_distill.py)."""
    from moetool.compression.distill import distill
    from moetool.errors import MoetoolError
    from moetool.families import family_for_config

    if family_for_config(_config(str(fixture))).name in DISTILLABLE:
        pytest.skip("distilled in tests/test_distill.py")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "student"
    with pytest.raises(MoetoolError) as exc:
        distill(str(fixture), out, [text], steps=1, progress=False)
    message = str(exc.value)
    assert "\n" not in message and not out.exists()
    assert message.startswith("cannot distill ")
    assert message.endswith("families that can be distilled: " + ", ".join(DISTILLABLE))


def test_distill_refusal_on_the_command_line(tmp_path):
    from conftest import assert_one_line_error, run_cli

    derived = next(p for p in ALL if p.name.startswith("derived-"))
    result = run_cli("distill", derived, "--out", tmp_path / "s", "--file", FIXTURES.parent / "README.md")
    assert result.returncode == 2
    assert_one_line_error(result, "families that can be distilled: " + ", ".join(DISTILLABLE))
