"""moetool heal: the least-squares fit, the layer-by-layer driver against the model's own
forward, healing every fixture family, provenance checks, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, assert_one_line_error, run_cli

CALIB = FIXTURES / "corpus" / "train-prose.txt"
FAST = dict(router_steps=3, experts_steps=3, holdout=0.0)  # 200 tokens of a random model: no held-out check
# fixtures whose family heal refuses, with the words of its one-line refusal
NOT_HEALED = {"tiny-llama4": "takes only hidden states"}  # experts get every token, pre-scaled by routing
# (tiny-gemma4: its MoE block is the decoder layer itself, refused by its family's runtime.heal_unsupported)


def _calib(tmp_path: Path, chars: int = 6000) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(CALIB.read_text()[:chars])
    return path


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# -- the math -------------------------------------------------------------------------------------------
def _routed_problem(seed=0, T=400, H=12, I=6, E=5, k=2, bias=True):
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    acts = torch.randn(T * k, I, generator=g)
    tok = torch.arange(T)[:, None].expand(T, k).reshape(-1)
    ex, wt = idx.reshape(-1), w.reshape(-1)
    true_m, true_b = torch.randn(E, H, I, generator=g), torch.randn(E, H, generator=g)
    target = torch.zeros(T, H)
    contrib = torch.einsum("nhi,ni->nh", true_m[ex], acts) + (true_b[ex] if bias else 0)
    target.index_add_(0, tok, wt[:, None] * contrib)
    return acts, wt, ex, tok, target, true_m, true_b


def test_fit_down_proj_recovers_the_map_and_both_solvers_agree():
    import torch

    from moetool.compression.heal import fit_down_proj

    acts, wt, ex, tok, target, true_m, true_b = _routed_problem()
    start_m, start_b = torch.zeros_like(true_m), torch.zeros_like(true_b)
    joint = fit_down_proj(acts, wt, ex, tok, target, start_m, start_b, ridge=1e-8)
    swept = fit_down_proj(acts, wt, ex, tok, target, start_m, start_b, ridge=1e-8, joint_limit=0, sweeps=400, tol=0)
    assert joint["loss_after"] < 1e-9 * joint["loss_before"]
    assert torch.allclose(joint["down"], true_m, atol=1e-4) and torch.allclose(joint["bias"], true_b, atol=1e-4)
    assert torch.allclose(swept["down"], joint["down"], atol=1e-4)


def test_fit_down_proj_ridge_pulls_towards_the_current_weights():
    import torch

    from moetool.compression.heal import fit_down_proj

    acts, wt, ex, tok, target, true_m, _ = _routed_problem(bias=False)
    start = torch.zeros_like(true_m)
    dist = [float((fit_down_proj(acts, wt, ex, tok, target, start, ridge=r)["down"] - start).norm())
            for r in (1e-6, 1.0, 100.0)]
    assert dist[0] > dist[1] > dist[2] > 0
    # an expert with no tokens keeps its matrix exactly
    keep = ex != 0
    res = fit_down_proj(acts[keep], wt[keep], ex[keep], tok[keep], target, true_m + 1, ridge=0.1)
    assert torch.equal(res["down"][0], true_m[0] + 1) and res["fitted"] == 4


def test_fit_router_restores_rows_when_it_cannot_gain():
    import torch

    from moetool.compression.heal import fit_router

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def zero_loss():  # already perfect: nothing to do
        (p * 0).sum().backward()
        return 0.0

    assert fit_router(zero_loss, [p], 5, 0.1)["kept"] is False
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0]))

    def quad():
        loss = ((p - torch.tensor([3.0, -1.0])) ** 2).sum()
        loss.backward()
        return float(loss.detach())

    info = fit_router(quad, [p], 20, 0.0)
    assert info["kept"] and info["loss_after"] < 1e-8
    assert torch.allclose(p.detach(), torch.tensor([3.0, -1.0]), atol=1e-4)


# -- the model-facing pieces --------------------------------------------------------------------------------
def test_expert_activations_reproduce_every_familys_experts(tiny_fixture):
    """experts(x, e, weight 1) == D_e a_e(x) + b_e, with a_e from the selector probe and D_e, b_e
    read from the module: the linear model the down-projection fit relies on is exact."""
    import torch

    from moetool.compression.heal import DOWN, DOWN_BIAS, _call_expert, _intermediate, down_orientation, expert_activations
    from moetool.runtime.loading import load_model, moe_blocks

    loaded = load_model(str(tiny_fixture), dtype="float32")
    H = int(loaded.rc.fields["hidden_size"])
    torch.manual_seed(0)
    if NOT_HEALED.get(tiny_fixture.name) == "takes only hidden states":
        from moetool.compression.heal import check_experts_take_routing
        from moetool.errors import MoetoolError

        with pytest.raises(MoetoolError, match="takes only hidden states"):
            check_experts_take_routing(moe_blocks(loaded)[0][3], loaded.family.name)
        return
    for _L, _block, _router, experts in moe_blocks(loaded):
        inter = _intermediate(experts, H)
        x = torch.randn(37, H)
        orient = down_orientation(experts, H, inter, x)
        for e in (0, int(getattr(experts, DOWN).shape[0]) - 1):
            a = expert_activations(experts, x, e, H, inter, orient)
            m = getattr(experts, DOWN).detach()[e]
            m = m if orient == "out_in" else m.T
            b = getattr(experts, DOWN_BIAS, None)
            want = a @ m.T + (b.detach()[e] if b is not None else 0)
            with torch.no_grad():
                got = _call_expert(experts, x, e)
            assert torch.allclose(got, want, atol=1e-5), (tiny_fixture.name, e)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_down_orientation_when_hidden_equals_intermediate(family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetool.compression.heal import DOWN, down_orientation, expert_activations
    from moetool.runtime.loading import loaded_from_model, moe_blocks

    src = FIXTURES / ("tiny-mixtral" if family == "mixtral" else "tiny-gpt-oss")
    config = AutoConfig.from_pretrained(src)
    config.intermediate_size = config.hidden_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    experts = moe_blocks(loaded_from_model(model))[0][3]
    H = config.hidden_size
    x = torch.randn(9, H)
    orient = down_orientation(experts, H, H, x)
    assert orient == ("out_in" if family == "mixtral" else "in_out")
    a = expert_activations(experts, x, 1, H, H, orient)
    m = getattr(experts, DOWN).detach()[1]
    bias = getattr(experts, "down_proj_bias", None)
    want = (a @ (m.T if orient == "out_in" else m)) + (bias.detach()[1] if bias is not None else 0)
    with torch.no_grad():
        got = experts(x, torch.ones(9, 1, dtype=torch.long), torch.ones(9, 1))
    assert torch.allclose(got, want, atol=1e-5)


def test_heal_observer_sees_what_each_block_gets_in_the_models_own_forward(tiny_fixture):
    """The executor-driven heal collects, for every MoE layer, exactly the inputs the block gets
    in the model's own forward (real tokens only, padding dropped; every family: per-layer masks,
    position embeddings)."""
    import torch

    from moetool.runtime.executor import Executor
    from moetool.compression.heal import HealObserver, HealOptions
    from moetool.runtime.loading import load_model, moe_blocks

    loaded = load_model(str(tiny_fixture), dtype="float32")
    torch.manual_seed(0)
    seqs = [torch.randint(4, 200, (n,)).tolist() for n in (5, 17, 11, 30)]
    obs = HealObserver(loaded, loaded, HealOptions())
    got = {}
    obs.heal = lambda L, x, opts=None: got.__setitem__(L, x)  # collect only: heal nothing
    Executor(loaded, batch_size=3, mode="layerwise").run(seqs, [obs])
    want = {}
    def keep(L):
        return lambda m, a: want.setdefault(L, []).append(a[0].reshape(-1, a[0].shape[-1]))

    handles = [blk.register_forward_pre_hook(keep(L)) for L, blk, _r, _e in moe_blocks(loaded)]
    try:
        with torch.no_grad():
            for s in sorted(seqs, key=len):  # one sequence at a time: no padding at all
                loaded.model(input_ids=torch.tensor([s]))
    finally:
        for h in handles:
            h.remove()
    assert sorted(got) == sorted(want)
    for L in got:
        a, b = got[L], torch.cat(want[L])
        assert a.shape == b.shape, (tiny_fixture.name, L)
        assert torch.allclose(a, b, atol=1e-5), (tiny_fixture.name, L)


# -- checkpoints ------------------------------------------------------------------------------------------
def _unpruned_copy(src: Path, dst: Path) -> Path:
    """SRC copied with a provenance saying it was made from SRC (a compression that removed
    nothing)."""
    from moetool.checkpoint.outdir import MARKER, marker
    from moetool.compression.surgery import Checkpoint, lineage

    shutil.copytree(src, dst)
    (dst / MARKER).write_text(json.dumps(marker("prune", lineage=lineage(Checkpoint(str(src))))))
    return dst


def test_healing_a_model_with_nothing_removed_changes_nothing(tmp_path):
    import torch

    from moetool.compression.heal import HealOptions, heal_checkpoint

    src = FIXTURES / "tiny-qwen2-moe"  # shared expert and its gate: the fit must see through them
    same = _unpruned_copy(src, tmp_path / "same")
    out = tmp_path / "healed"
    result = heal_checkpoint(str(same), str(src), str(_calib(tmp_path)), str(out), max_tokens=300,
                             options=HealOptions(**FAST), progress=False)
    for row in result["layers"]:
        assert row["relative_before"] < 1e-10
    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def _prune_for(src: Path, out: Path) -> None:
    from moetool.compression.prune import prune_checkpoint

    prune_checkpoint(str(src), str(out), keep=4, by="random", seed=3, regroup=True, progress=False)


def test_heal_works_on_every_family(tiny_fixture, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from moetool.compression.heal import HealOptions, heal_checkpoint
    from moetool.compression.surgery import Checkpoint, classify, read_provenance
    from moetool.errors import MoetoolError
    from moetool.families import family_for_config

    pruned = tmp_path / "pruned"
    family = family_for_config(json.loads((tiny_fixture / "config.json").read_text()))
    refusal = (family.spec.get("surgery") or {}).get("unsupported")
    if refusal:  # DeepSeek-V4's token-id routing table: nothing to heal, the prune before it is refused
        with pytest.raises(MoetoolError, match="cannot cut experts") as exc:
            _prune_for(tiny_fixture, pruned)
        assert refusal in str(exc.value) and not pruned.exists()
        return
    _prune_for(tiny_fixture, pruned)
    why = family.layerwise_unsupported or family.heal_unsupported
    if why:  # Gemma 4: the MoE block is the decoder layer; heal says so in one line
        with pytest.raises(MoetoolError, match="cannot heal") as exc:
            heal_checkpoint(str(pruned), str(tiny_fixture), str(_calib(tmp_path)), str(tmp_path / "healed"),
                            max_tokens=200, options=HealOptions(**FAST), progress=False)
        assert "\n" not in str(exc.value) and why in str(exc.value) and not (tmp_path / "healed").exists()
        return
    before = _tensors(pruned)
    stamp = {p.name: p.stat().st_mtime_ns for p in pruned.iterdir()}
    out = tmp_path / "healed"
    if tiny_fixture.name in NOT_HEALED:
        from moetool.errors import MoetoolError

        with pytest.raises(MoetoolError, match=NOT_HEALED[tiny_fixture.name]) as exc:
            heal_checkpoint(str(pruned), str(tiny_fixture), str(_calib(tmp_path)), str(out), max_tokens=200,
                            options=HealOptions(**FAST), progress=False)
        assert "\n" not in str(exc.value) and not out.exists()
        return
    result = heal_checkpoint(str(pruned), str(tiny_fixture), str(_calib(tmp_path)), str(out), max_tokens=200,
                             options=HealOptions(**FAST), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in pruned.iterdir()} == stamp  # input untouched
    assert not list(tmp_path.glob(".healed*"))
    for row in result["layers"]:
        assert row["relative_after"] <= row["relative_before"]
    assert any(row["relative_after"] < 0.9 * row["relative_before"] for row in result["layers"])
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    after = _tensors(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing was healed"
    ckpt = Checkpoint(str(pruned))
    for n in changed:  # router rows, routed experts, the shared expert's down projection: never attention, norms
        kind = classify(ckpt, n).kind
        if kind == "plain":
            assert ckpt.family.classify(n).role == "shared_experts" and "down" in n, n
        else:
            assert kind in ("rows", "expert", "fused"), n
    assert json.loads((out / "config.json").read_text()) == json.loads((pruned / "config.json").read_text())
    prov = read_provenance(out)
    assert prov["command"] == "heal" and prov["lineage"] == read_provenance(pruned)["lineage"]
    card = (out / "README.md").read_text()
    assert "healed" in card and "calib.txt" in card and "How the compressed model was made" in card


def test_a_healed_block_worse_on_held_out_tokens_is_reverted():
    """The keep / revert decision is made on calibration tokens the fit never saw: held-out
    targets equal to what the block already outputs make any change worse there, so the block
    (parameters and buffers) is restored, however much the fitted tokens improved."""
    import torch

    from moetool.compression.heal import HealOptions, _intermediate, heal_block, holdout_mask, run_block
    from moetool.runtime.loading import load_model, moe_blocks

    loaded = load_model(str(FIXTURES / "tiny-deepseek-v3"), dtype="float32")
    H = int(loaded.rc.fields["hidden_size"])
    _L, block, router, experts = moe_blocks(loaded)[0]
    torch.manual_seed(0)
    x = torch.randn(400, H)
    y = run_block(block, x)
    hold = holdout_mask(400, 0.1)
    assert int(hold.sum()) == 40 and bool(hold[9]) and not bool(hold[8])
    y[~hold] = 1.5 * y[~hold] + 0.1  # the fitted tokens ask for a change, the held-out ones for none
    saved = {n: t.detach().clone() for n, t in block.state_dict().items()}
    opts = HealOptions(router_steps=2, experts_steps=2)
    info = heal_block(block, router, experts, x, y, H, _intermediate(experts, H), opts)
    assert info["reverted"] and info["holdout_tokens"] == 40 and info["holdout_relative_before"] < 1e-10
    assert all(torch.equal(saved[n], t) for n, t in block.state_dict().items())
    y[hold] = 1.5 * y[hold] + 0.1  # now the held-out tokens agree with the fitted ones: kept
    info = heal_block(block, router, experts, x, y, H, _intermediate(experts, H), opts)
    assert not info["reverted"] and info["holdout_relative_after"] < info["holdout_relative_before"]


def test_fit_selection_moves_a_choice_only_buffer_downhill():
    import torch

    from moetool.compression.heal import fit_selection

    buf = torch.zeros(4)
    best = torch.tensor([0.1, -0.05, 0.0, 0.2])
    info = fit_selection(lambda: float(((buf - best) ** 2).sum()), buf, rounds=6, step=0.1)
    assert info["loss_after"] < 0.01 * info["loss_before"] and info["moved"] > 0
    assert torch.allclose(buf, best, atol=0.01)


def test_heal_refuses_a_ref_that_is_not_the_origin(tmp_path):
    pruned = tmp_path / "pruned"
    _prune_for(FIXTURES / "tiny-mixtral", pruned)
    calib = _calib(tmp_path)
    other = tmp_path / "other"  # same shapes, one router row changed
    shutil.copytree(FIXTURES / "tiny-mixtral", other)
    from safetensors.torch import load_file, save_file

    for f in sorted(other.glob("*.safetensors")):
        t = load_file(f)
        hit = [n for n in t if n.endswith("gate.weight")]
        if hit:
            t[hit[0]][0, 0] += 1.0
            save_file(t, f, metadata={"format": "pt"})
            break
    res = run_cli("heal", pruned, "--ref", other, "--file", calib, "--out", tmp_path / "o")
    assert_one_line_error(res, "is not the model")
    assert res.returncode == 2 and not (tmp_path / "o").exists()
    res = run_cli("heal", FIXTURES / "tiny-mixtral", "--ref", FIXTURES / "tiny-mixtral", "--file", calib,
                  "--out", tmp_path / "o")
    assert_one_line_error(res, "records no source")


def test_heal_cli(tmp_path):
    pruned = tmp_path / "pruned"
    _prune_for(FIXTURES / "tiny-olmoe", pruned)
    out = tmp_path / "healed"
    res = run_cli("heal", pruned, "--ref", FIXTURES / "tiny-olmoe", "--file", _calib(tmp_path), "--max-tokens", "200",
                  "--router-steps", "2", "--experts-steps", "2", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["calibration"]["tokens"] == 200 and len(data["layers"]) == 2 and out.is_dir()
    res = run_cli("heal", pruned, "--ref", FIXTURES / "tiny-olmoe", "--file", _calib(tmp_path), "--out", out)
    assert_one_line_error(res, "already exists")


def test_prune_and_merge_heal_flag(tmp_path):
    from moetool.compression.surgery import read_provenance

    calib = _calib(tmp_path)
    src = FIXTURES / "tiny-mixtral"
    res = run_cli("prune", src, "--keep", "4", "--by", "frequency", "--file", calib, "--max-tokens", "200", "--heal",
                  "--out", tmp_path / "p", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["out"] == str(tmp_path / "p") and len(data["heal"]["layers"]) == 2
    prov = read_provenance(tmp_path / "p")
    assert prov["command"] == "heal" and prov["lineage"]["source"]["name"] == str(src)
    assert "pruned experts" in (tmp_path / "p" / "README.md").read_text()  # the pruning card, inside the heal card
    from moetool.compression.heal import HealOptions
    from moetool.compression.merge import merge_checkpoint

    result = merge_checkpoint(str(src), str(tmp_path / "m"), 4, file=str(calib), max_tokens=100, heal=True,
                              heal_options=HealOptions(**FAST), progress=False)
    assert result["heal"]["calibration"]["tokens"] == 100
    assert read_provenance(tmp_path / "m")["command"] == "heal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "m", "p"]  # no temporary directories left
    res = run_cli("prune", src, "--keep", "4", "--by", "random", "--heal", "--out", tmp_path / "r")
    assert_one_line_error(res, "--heal needs calibration text")


@pytest.mark.parametrize("fixture", ["tiny-deepseek-v3", "tiny-mixtral", "tiny-nemotron-h", "tiny-kimi-linear"])
def test_streamed_heal_equals_resident_heal(fixture, tmp_path):
    """heal --stream (both models read from disk one decoder layer at a time, healed layers kept on
    disk until the checkpoint is written) gives the resident heal's checkpoint, up to float
    rounding."""
    import torch

    from moetool.compression.heal import HealOptions, heal_checkpoint

    src = FIXTURES / fixture
    pruned = tmp_path / "pruned"
    _prune_for(src, pruned)
    calib = _calib(tmp_path)
    res = {}
    for stream in (False, True):
        out = tmp_path / f"healed-{stream}"
        res[stream] = heal_checkpoint(str(pruned), str(src), str(calib), str(out), max_tokens=200,
                                      options=HealOptions(**FAST), load_options={"stream": stream}, progress=False)
    assert res[True]["streamed"] and not res[False]["streamed"]
    assert res[True]["tensors_rewritten"] == res[False]["tensors_rewritten"] > 0
    a, b = _tensors(tmp_path / "healed-False"), _tensors(tmp_path / "healed-True")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
    for ra, rb in zip(res[False]["layers"], res[True]["layers"]):
        assert ra["relative_after"] == pytest.approx(rb["relative_after"], rel=1e-4, abs=1e-9)
    assert not list(tmp_path.glob(".healed-*"))  # the per-layer store is gone
