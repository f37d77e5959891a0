"""`moetool plan`: placement arithmetic against `params`, placements chosen from measured
routing, expert-parallel loads and capacity drops against direct counts, and device maps that
load and give the same outputs as a plain load."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest

from conftest import FIXTURES, assert_one_line_error, run_cli
from moetool.analysis.params import count_params
from moetool.families.resolve import resolve_family
from moetool.analysis.plan import PRECISIONS, model_layout, plan
from moetool.analysis.plan_ep import synthetic_trace
from moetool.checkpoint.source import resolve

GiB = 2**30
TRAINED = [FIXTURES / "trained-mixtral", FIXTURES / "trained-deepseek-v3"]


def corpus_paragraphs() -> list[str]:
    """Held-out prose and code of the trained fixtures' corpus, one text per paragraph, alternating."""
    out = []
    for name in ("heldout-prose.txt", "heldout-code.txt"):
        text = (FIXTURES / "corpus" / name).read_text().replace("\f", "")
        out.append([p.strip() for p in text.split("\n\n") if p.strip()])
    return [p for pair in zip(*out) for p in pair]


def _rc(model: str):
    return resolve_family(resolve(model))


@lru_cache(maxsize=None)
def _trace_file(model: str, tokens: int, seq_len: int, skew: float, seed: int, tmpdir: str) -> str:
    path = f"{tmpdir}/{model.replace('/', '_')}-{tokens}-{seq_len}-{skew}-{seed}.safetensors"
    synthetic_trace(_rc(model), tokens, seq_len=seq_len, skew=skew, seed=seed, model=model).save(path)
    return path


@pytest.fixture(scope="module")
def tmpdir_module(tmp_path_factory):
    return str(tmp_path_factory.mktemp("plan"))


# -- arithmetic on real configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["mixtral-8x7b", "deepseek-v3"])
def test_placed_bytes_add_up_to_params_memory(preset):
    memory = count_params(preset)["memory"]
    for gpus in (1, 2, 4, 8):
        r = plan(preset, "80GiB", gpus=gpus).report
        assert r["gpu_bytes"] + r["cpu_bytes"] + r["disk_bytes"] == memory["bf16"] == r["weight_bytes"]
        for p in PRECISIONS:
            d = r["precisions"][p]
            for placed in (d, d["device_map"]):
                assert placed["gpu_bytes"] + placed["cpu_bytes"] + placed["disk_bytes"] == memory[p], (gpus, p)
                assert sum(dev["weights"] for dev in placed["devices"]) == placed["gpu_bytes"]
                assert all(dev["free"] >= 0 for dev in placed["devices"]) or not placed["fits"]
            need = memory[p] + r["kv_cache_bytes"]
            capacity = gpus * 80 * GiB
            # per-expert placement: fits exactly when everything fits (up to one expert of slack per GPU)
            if d["fits"]:
                assert need <= capacity and d["cpu_bytes"] == 0 and d["routed_reads_on_gpu"] == 1.0
            else:
                assert need > capacity - gpus * max(int(b.max()) for b in _expert_bytes(preset, p))
                assert d["routed_reads_on_gpu"] < 1.0 and d["per_token"]["pcie_weights"] > 0
            # a device map places whole modules and stages offloaded ones: never better than per expert
            assert d["device_map"]["routed_reads_on_gpu"] <= d["routed_reads_on_gpu"] + 1e-12
            assert d["device_map"]["gpu_bytes"] <= d["gpu_bytes"]


def _expert_bytes(model, prec):
    lay = model_layout(_rc(model), 0, 1)
    return [lay.expert_bytes[L][prec] for L in lay.expert_bytes]


def test_known_verdicts_for_real_models():
    """Mixtral-8x7B is 87 GiB at bf16 (`moetool params`): not on one 80 GiB GPU, fine on two;
    at fp8 (44 GiB) or 4-bit (25 GiB) on one. DeepSeek-V3 at 4-bit (354 GiB) fits 8 x 80 GiB."""
    one = plan("mixtral-8x7b", "80GiB", gpus=1).report
    assert not one["fits"] and one["precisions"]["fp8"]["fits"] and one["precisions"]["int4"]["fits"]
    assert plan("mixtral-8x7b", "80GiB", gpus=2).report["fits"]
    ds = plan("deepseek-v3", "80GiB", gpus=8).report["precisions"]
    assert not ds["bf16"]["fits"] and not ds["fp8"]["fits"] and ds["int4"]["fits"]


def test_kv_cache_and_reserve_take_gpu_memory():
    rc = _rc("mixtral-8x7b")
    a = plan("mixtral-8x7b", "80GiB", gpus=1, context=0).report
    b = plan("mixtral-8x7b", "80GiB", gpus=1, context=32768, batch=4).report
    c = plan("mixtral-8x7b", "80GiB", gpus=1, context=0, reserve="4GiB").report
    assert b["kv_cache_bytes"] == rc.num_layers * rc.kv_elements_per_layer * 2 * 32768 * 4
    assert b["gpu_bytes"] == a["gpu_bytes"] - b["kv_cache_bytes"] - _slack(a, b)
    assert c["gpu_bytes"] < a["gpu_bytes"] and c["gpu_bytes"] <= 76 * GiB


def _slack(a, b):
    # whole experts: the difference is the KV cache rounded to experts that no longer fit
    diff = a["gpu_bytes"] - b["gpu_bytes"] - b["kv_cache_bytes"]
    per_expert = int(_expert_bytes("mixtral-8x7b", "bf16")[0][0])
    assert 0 <= diff < per_expert
    return diff


def test_cpu_memory_limit_spills_to_disk():
    r = plan("mixtral-8x7b", "24GiB", gpus=1, cpu_memory="32GiB").report
    assert not r["fits"] and r["cpu_bytes"] <= 32 * GiB and r["disk_bytes"] > 0
    assert r["gpu_bytes"] + r["cpu_bytes"] + r["disk_bytes"] == count_params("mixtral-8x7b")["memory"]["bf16"]
    assert r["per_token"]["disk"] > 0


def test_cli_json_contract():
    res = run_cli("plan", "mixtral", "--gpu-memory", "80GiB", "--gpus", "2", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    for key in ("fits", "gpu_bytes", "cpu_bytes", "disk_bytes", "precisions", "kv_cache_bytes", "per_token",
                "routed_reads_on_gpu"):
        assert key in r
    assert r["fits"] is True and r["cpu_bytes"] == r["disk_bytes"] == 0
    human = run_cli("plan", "mixtral", "--gpu-memory", "24GiB")
    assert human.returncode == 0 and "does not fit" in human.stdout and "device map per module" in human.stdout


# -- placement from a trace --------------------------------------------------------------------------------
def test_hottest_experts_get_the_gpu_and_hit_rate_is_a_direct_count(tmpdir_module):
    model = str(FIXTURES / "tiny-mixtral")
    path = _trace_file(model, 3000, 50, 0.3, 1, tmpdir_module)
    lay = model_layout(_rc(model), 0, 1)
    resident = sum(u.bytes["bf16"] for u in lay.units if u.kind != "experts")
    per_expert = int(lay.expert_bytes[0]["bf16"][0])
    budget = resident + 5 * per_expert  # 5 of the 16 experts fit
    traced = plan(model, budget, context=0, trace=path, holdout=0.25)
    blind = plan(model, budget, context=0)
    from moetool.analysis.plan import split_tokens
    from moetool.analysis.trace import Trace

    tr = Trace.load(path)
    fit_mask, held_mask, _ = split_tokens(tr, 0.25)
    grid = traced.figures["grid"]
    on = {(L, e) for L in tr.moe_layers for e in range(8) if not isinstance(grid[L][e], str)}
    assert len(on) == 5
    fit_counts = {(L, e): int((tr.experts[L][fit_mask] == e).sum()) for L in tr.moe_layers for e in range(8)}
    assert min(fit_counts[x] for x in on) >= max(fit_counts[x] for x in fit_counts if x not in on)

    def share(placed):  # direct count on the held-out tokens
        hits = sum(int((tr.experts[L][held_mask] == e).sum()) for L, e in placed)
        return hits / (int(held_mask.sum()) * tr.top_k * len(tr.moe_layers))

    assert traced.report["routed_reads_on_gpu"] == pytest.approx(share(on))
    blind_on = {(L, e) for L in tr.moe_layers for e in range(8) if not isinstance(blind.figures["grid"][L][e], str)}
    assert blind_on == {(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)}  # layer order without a trace
    assert blind.report["routed_reads_on_gpu"] == pytest.approx(5 / 16)  # assumed uniform
    assert share(on) > share(blind_on)
    # bytes per token that cross PCIe: offloaded experts weighted by the share of tokens that read them
    held = int(held_mask.sum())
    expected = sum(int((tr.experts[L][held_mask] == e).sum()) / held * per_expert
                   for L in tr.moe_layers for e in range(8) if (L, e) not in on)
    assert traced.report["per_token"]["pcie_weights"] == round(expected)


# -- expert parallelism ------------------------------------------------------------------------------------
def test_balanced_placement_beats_contiguous_on_held_out_tokens(tmpdir_module):
    model = str(FIXTURES / "tiny-deepseek-v3")
    path = _trace_file(model, 6000, 60, 0.3, 2, tmpdir_module)
    r = plan(model, "1GiB", trace=path, ep=4, nodes=2, redundant=4, holdout=0.2).report
    imb = r["imbalance"]
    assert set(imb) == {"contiguous", "round-robin", "balanced"}
    assert imb["balanced"] < imb["contiguous"] and imb["balanced"] < imb["round-robin"]
    assert r["ep"]["hierarchical"] is True and r["ep"]["split"]["by"] == "sequence"
    assert r["ep"]["split"]["heldout_tokens"] == 1200
    for s in r["ep"]["strategies"].values():
        for row in s["per_layer"]:
            load = np.array(row["device_load"])
            assert load.sum() == 1200 * 2
            assert row["imbalance"] == pytest.approx(load.max() / load.mean(), abs=1e-4)


def test_ep_map_and_loads_match_a_per_token_replay(tmpdir_module, tmp_path):
    """The written EP map, replayed token by token in plain Python (the i-th assignment to an
    expert goes to its replica i mod replicas), gives the same per-device loads; EPLB
    invariants hold."""
    model = str(FIXTURES / "tiny-deepseek-v3")
    path = _trace_file(model, 2000, 40, 0.3, 3, tmpdir_module)
    out = tmp_path / "ep.json"
    r = plan(model, "1GiB", trace=path, ep=4, nodes=2, redundant=4, holdout=0, ep_map_out=str(out)).report
    m = json.loads(out.read_text())
    from moetool.analysis.trace import Trace

    tr = Trace.load(path)
    E, P, N = 8, 12, 4
    groups = _rc(model).fields["n_group"]
    copies = dict.fromkeys(m["strategies"], 0)
    node_copies = dict.fromkeys(m["strategies"], 0)
    for name, s in m["strategies"].items():
        for x, L in enumerate(m["moe_layers"]):
            p2l = s["physical_to_logical"][x]
            dev = s["device_of_physical"][x]
            reps = {e: [p for p in range(len(p2l)) if p2l[p] == e] for e in range(E)}
            assert all(reps[e] for e in range(E))
            assert [len(reps[e]) for e in range(E)] == s["logical_replica_count"][x]
            if name == "balanced":
                assert len(p2l) == P and sorted(dev) == sorted([d for d in range(N) for _ in range(P // N)])
                for g in range(groups):  # hierarchical: each expert group on one node
                    group = range(g * E // groups, (g + 1) * E // groups)
                    assert len({dev[p] // 2 for e in group for p in reps[e]}) == 1
            load = [0] * N
            seen = [0] * E
            for row in tr.experts[L].tolist():
                sent = set()
                for e in row:
                    d = dev[reps[e][seen[e] % len(reps[e])]]
                    load[d] += 1
                    sent.add(d)
                    seen[e] += 1
                copies[name] += len(sent)
                node_copies[name] += len({d // 2 for d in sent})
            assert load == r["ep"]["strategies"][name]["per_layer"][x]["device_load"]
        # all-to-all: devices (nodes) a token is sent to, remote shares with tokens starting anywhere
        s = r["ep"]["strategies"][name]
        per_token_layer = copies[name] / (tr.tokens * len(m["moe_layers"]))
        assert s["devices_per_token_layer"] == pytest.approx(per_token_layer, abs=1e-4)
        H = _rc(model).hidden_size
        assert s["dispatch_bytes_per_token"] == round(copies[name] / tr.tokens * (1 - 1 / N) * H * 2)
        assert s["cross_node_dispatch_bytes_per_token"] == round(node_copies[name] / tr.tokens * (1 - 1 / 2) * H * 2)


def test_dropped_fraction_matches_a_direct_count(tmpdir_module):
    model = str(FIXTURES / "tiny-mixtral")
    path = _trace_file(model, 1500, 37, 0.4, 4, tmpdir_module)
    factors = ["1.0", "1.25", "2"]
    r = plan(model, "1GiB", trace=path, capacity_factors=factors).report
    from moetool.analysis.trace import Trace

    tr = Trace.load(path)
    E, k = tr.num_experts, tr.top_k
    assert list(r["dropped_fraction"]) == factors
    for c in factors:
        for row in r["dropped_fraction"][c]["per_layer"]:
            ids = tr.experts[row["layer"]].tolist()
            seq = tr.sequence.tolist()
            # whole trace as one batch
            cap = math.ceil(Fraction(c) * len(ids) * k / E)
            counts = [sum(e == x for r_ in ids for x in r_) for e in range(E)]
            dropped = sum(max(0, n - cap) for n in counts)
            assert row["batch"] == pytest.approx(dropped / (len(ids) * k))
            # each sequence on its own
            dropped = 0
            for s in sorted(set(seq)):
                rows = [ids[i] for i in range(len(ids)) if seq[i] == s]
                cap = math.ceil(Fraction(c) * len(rows) * k / E)
                dropped += sum(max(0, sum(e in r_ for r_ in rows) - cap) for e in range(E))
            assert row["sequence"] == pytest.approx(dropped / (len(ids) * k))
    batch = [r["dropped_fraction"][c]["batch"] for c in ("2", "1.25", "1.0")]
    assert batch == sorted(batch)


@pytest.mark.parametrize("devices,nodes", [(8, 2), (48, 4), (96, 8)])  # 32-bit, 64-bit and sorted paths
def test_distinct_devices_and_nodes_per_token(devices, nodes):
    from moetool.analysis.plan_ep import distinct_counts

    rng = np.random.default_rng(devices)
    dev_t = rng.integers(0, devices, (8, 500))
    n_dev, n_node = distinct_counts(dev_t, np.arange(devices), devices, nodes)
    per = devices // nodes
    assert n_dev.tolist() == [len(set(dev_t[:, t])) for t in range(500)]
    assert n_node.tolist() == [len({d // per for d in dev_t[:, t]}) for t in range(500)]


def test_holdout_splits_by_token_order_for_one_sequence(tmp_path):
    model = str(FIXTURES / "tiny-mixtral")
    tr = synthetic_trace(_rc(model), 500, seq_len=500, seed=5, model=model)
    path = tmp_path / "one.safetensors"
    tr.save(path)
    r = plan(model, "1GiB", trace=str(path), ep=2, holdout=0.2).report
    assert r["ep"]["split"] == {"by": "token order", "holdout": 0.2, "fit_tokens": 400, "heldout_tokens": 100}


# -- device maps that load ---------------------------------------------------------------------------------
def _outputs(lm, ids):
    import torch

    from moetool.analysis.trace import record_token_ids

    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits.float()
    return logits, record_token_ids(lm, [ids])


@lru_cache(maxsize=None)
def _plain(model: str):
    from moetool.runtime.loading import load_model

    return load_model(model)


@pytest.mark.parametrize("fixture", ["tiny-deepseek-v3"])  # dense first layer, shared experts, router buffer
def test_device_map_loads_and_gives_the_same_outputs(fixture, tmp_path):
    import torch

    from moetool.runtime.loading import load_model

    model = str(FIXTURES / fixture)
    lay = model_layout(_rc(model), 0, 1)
    resident = sum(u.bytes["bf16"] for u in lay.units if u.kind != "experts")
    module = max(u.bytes["bf16"] for u in lay.units if u.kind == "experts")
    ids = [1, 17, 42, 99, 250, 7, 3, 300, 12]
    ref_logits, ref_trace = _outputs(_plain(model), ids)

    # no GPU: CPU RAM for what every token needs and one experts module, the rest on disk
    cpu_map = tmp_path / "cpu.json"
    r = plan(model, gpus=0, cpu_memory=resident + module, context=0, device_map_out=str(cpu_map)).report
    dm = json.loads(cpu_map.read_text())
    assert set(dm.values()) == {"cpu", "disk"} and r["disk_bytes"] > 0
    assert any(k.endswith("mlp.experts") and v == "disk" for k, v in dm.items())

    # two GPUs (stood in for by the CPU): find budgets where experts are split between GPUs and offload
    gpu_map = None
    for step in range(4, 40):
        budget = resident // 2 + step * module // 4
        path = tmp_path / f"gpu{step}.json"
        r2 = plan(model, budget, gpus=2, cpu_memory=0, context=0, device_map_out=str(path)).report
        m = json.loads(path.read_text())
        if any(isinstance(v, int) for k, v in m.items() if k.endswith("mlp.experts")) and \
                any(v in ("cpu", "disk") for k, v in m.items() if k.endswith("mlp.experts")):
            gpu_map = m
            break
    assert gpu_map is not None, "no budget gave a mixed GPU / offload device map"
    assert r2["precisions"]["bf16"]["device_map"]["staging_bytes"] == module
    as_cpu = {k: ("cpu" if isinstance(v, int) else v) for k, v in gpu_map.items()}
    (tmp_path / "gpu_as_cpu.json").write_text(json.dumps(as_cpu))

    for mp in (cpu_map, tmp_path / "gpu_as_cpu.json"):
        lm = load_model(model, device_map=str(mp))
        assert lm.load_info()["offloaded"]
        logits, trace = _outputs(lm, ids)
        assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
        for L in ref_trace.moe_layers:
            assert np.array_equal(trace.experts[L], ref_trace.experts[L])


def test_device_map_from_a_preset_covers_every_module(tmp_path):
    """A map for a real model (built on the meta device): flat, no overlapping keys, whole
    mlp.experts modules as units, as many on the GPUs as the plan says."""
    out = tmp_path / "mixtral.json"
    r = plan("mixtral-8x7b", "24GiB", gpus=2, device_map_out=str(out)).report
    dm = json.loads(out.read_text())
    keys = list(dm)
    assert not any(a != b and b.startswith(a + ".") for a in keys for b in keys)

    def device(name):  # the key that covers NAME
        return next(dm[k] for k in sorted(keys, key=len, reverse=True) if name == k or name.startswith(k + "."))

    on_gpu = sum(isinstance(device(f"model.layers.{L}.mlp.experts.gate_up_proj"), int) for L in range(32))
    assert r["precisions"]["bf16"]["device_map"]["expert_modules"]["gpu"] == on_gpu
    assert r["precisions"]["bf16"]["device_map"]["routed_reads_on_gpu"] == pytest.approx(on_gpu / 32)
    assert set(dm.values()) <= {0, 1, "cpu", "disk"} and 0 < on_gpu < 32
    assert device("model.embed_tokens.weight") == 0 and isinstance(device("lm_head.weight"), int)


# -- errors and figures ------------------------------------------------------------------------------------
def test_bad_input_is_one_line(tmpdir_module, tmp_path):
    mixtral_trace = _trace_file(str(FIXTURES / "tiny-mixtral"), 200, 20, 0.5, 0, tmpdir_module)
    ds = str(FIXTURES / "tiny-deepseek-v3")
    tiny = str(FIXTURES / "tiny-mixtral")
    cli = [
        (("mixtral",), "--gpu-memory"),
        ((ds, "--gpu-memory", "1GiB", "--trace", mixtral_trace), "layers"),
        ((tiny, "--gpu-memory", "1GiB", "--trace", mixtral_trace, "--ep", "3"), "do not split evenly"),
        (("mixtral", "--gpu-memory", "1GiB", "--plot", str(tmp_path / "no" / "dir.png")), "does not exist"),
    ]
    for args, needle in cli:
        assert_one_line_error(run_cli("plan", *args), needle)
    from moetool.errors import MoetoolError

    lib = [
        (dict(model="mixtral", gpu_memory="lots"), "cannot read 'lots'"),
        (dict(model="mixtral", gpu_memory="24GiB", ep=4), "--trace"),
        (dict(model="mixtral", gpu_memory="24GiB", capacity_factors=["1"]), "--trace"),
        (dict(model=ds, gpu_memory="1GiB", trace=str(tmp_path / "none.safetensors")), "no such trace"),
        (dict(model=tiny, gpu_memory="1GiB", trace=mixtral_trace, ep=4, nodes=3), "--nodes"),
        (dict(model=tiny, gpu_memory="1GiB", trace=mixtral_trace, ep=9, redundant=0), "more devices"),
        (dict(model=tiny, gpu_memory="1GiB", trace=mixtral_trace, capacity_factors=["x"]), "not a number"),
        (dict(model=tiny, gpu_memory="1GiB", trace=mixtral_trace, capacity_factors=["0"]), "more than 0"),
        (dict(model=tiny, gpu_memory="1GiB", trace=mixtral_trace, holdout=1.5), "--holdout"),
        (dict(model=tiny, gpu_memory="1GiB", reserve="2GiB"), "--reserve"),
        (dict(model=tiny, gpu_memory="1GiB", ep_map_out=str(tmp_path / "x.json")), "--ep"),
        (dict(model="nosuchmodel", gpu_memory="1GiB"), "unknown preset"),
    ]
    for kwargs, needle in lib:
        with pytest.raises(MoetoolError, match=None) as err:
            plan(**kwargs)
        assert needle.lower() in str(err.value).lower() and "\n" not in str(err.value)


def test_plots_are_written(tmpdir_module, tmp_path):
    model = str(FIXTURES / "tiny-deepseek-v3")
    path = _trace_file(model, 1000, 50, 0.3, 6, tmpdir_module)
    res = run_cli("plan", model, "--gpu-memory", "120KiB", "--context", "0", "--trace", path, "--ep", "4",
                  "--redundant", "4", "--plot", str(tmp_path / "p"), "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["plots"] == [str(tmp_path / "p-placement.png"), str(tmp_path / "p-ep.png")]
    for p in r["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- the trained fixtures (real routing) -------------------------------------------------------------------
@pytest.mark.parametrize("fixture", TRAINED, ids=[p.name for p in TRAINED])
def test_trained_fixture_routing(fixture, tmp_path):
    """Real routing (trained fixtures, held-out corpus text): balanced placement with redundant
    experts beats contiguous placement on held-out sequences, dropped fractions equal a direct
    count, and a planned device map loads and routes exactly like a plain load."""
    if not (fixture / "config.json").is_file():
        pytest.skip(f"{fixture.name} not built (make trained-fixtures)")
    import torch

    from moetool.runtime.loading import load_model
    from moetool.analysis.trace import record_token_ids, record_trace

    lm = load_model(str(fixture))
    trace = record_trace(lm, corpus_paragraphs()[:200], max_tokens=3000, batch_size=64)
    path = tmp_path / "trace.safetensors"
    trace.save(path)
    rc = _rc(str(fixture))
    E = rc.num_experts
    r = plan(str(fixture), "1GiB", trace=str(path), ep=4, redundant=4, holdout=0.2,
             capacity_factors=["1.0", "1.25"]).report
    assert r["ep"]["split"]["by"] == "sequence"
    assert r["imbalance"]["balanced"] < r["imbalance"]["contiguous"]
    for c in ("1.0", "1.25"):
        for row in r["dropped_fraction"][c]["per_layer"]:
            ids = trace.experts[row["layer"]]
            cap = math.ceil(Fraction(c) * ids.shape[0] * rc.top_k / E)
            direct = sum(max(0, int((ids == e).sum()) - cap) for e in range(E)) / ids.size
            assert row["batch"] == pytest.approx(direct)

    lay = model_layout(rc, 0, 1)
    resident = sum(u.bytes["bf16"] for u in lay.units if u.kind != "experts")
    module = max(u.bytes["bf16"] for u in lay.units if u.kind == "experts")
    dmap = tmp_path / "map.json"
    plan(str(fixture), gpus=0, cpu_memory=resident + 2 * module, context=0, device_map_out=str(dmap))
    assert {"cpu", "disk"} <= set(json.loads(dmap.read_text()).values())
    seqs = [trace.token_ids[trace.sequence == s].tolist() for s in range(3)]
    offloaded = load_model(str(fixture), device_map=str(dmap))
    a, b = record_token_ids(lm, seqs), record_token_ids(offloaded, seqs)
    for L in a.moe_layers:
        assert np.array_equal(a.experts[L], b.experts[L])
        assert torch.allclose(torch.from_numpy(a.weights[L].astype(np.float32)),
                              torch.from_numpy(b.weights[L].astype(np.float32)), atol=1e-3)
