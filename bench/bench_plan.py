"""`moetool plan` on a synthetic 1M-token DeepSeek-V3 routing trace (58 MoE layers, 256
experts, top-8, written in the moetool trace format: skewed per-layer expert popularity,
sequences of 1,000 tokens): the whole planning run (per-expert placement and device map at
three precisions, EP over 32 devices on 4 nodes with 32 redundant experts for three
strategies, held-out validation, all-to-all volume, two capacity factors), and the EP count
itself (per-device loads and devices per token of the contiguous placement) vectorised vs a
per-token Python loop on the same tokens."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 1_000_000
LOOP_LAYERS = 8  # the Python loop takes minutes per 8 layers; both sides count the same layers


def _numpy_count(trace, layers, devices):
    """What the planner runs for one strategy: expert counts -> device loads, and devices per
    token from the transposed ids."""
    from moetool.analysis import plan_ep as ep

    E = trace.num_experts
    pl = ep._static("contiguous", ep.contiguous_devices(E, devices), len(layers))
    counts = [np.bincount(trace.experts[L].ravel(), minlength=E) for L in layers]
    loads = ep.layer_loads(pl, counts, devices)
    ids_t = [np.ascontiguousarray(trace.experts[L].T) for L in layers]
    a2a = ep.all_to_all(pl, ids_t, devices, 1)
    return [list(map(int, row)) for row in loads], [int(round(c * trace.tokens)) for c in a2a["copies"]]


def _python_count(trace, layers, dev, devices):
    dev = dev.tolist()
    loads, copies = [], []
    for L in layers:
        load = [0] * devices
        c = 0
        for row in trace.experts[L].tolist():
            seen = set()
            for e in row:
                d = dev[e]
                load[d] += 1
                seen.add(d)
            c += len(seen)
        loads.append(load)
        copies.append(c)
    return loads, copies


def run() -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from moetool.families.resolve import resolve_family
    from moetool.analysis.plan_ep import contiguous_devices, synthetic_trace
    from moetool.checkpoint.source import resolve
    from moetool.analysis.trace import Trace

    rc = resolve_family(resolve("deepseek-v3"))
    tmp = Path(tempfile.mkdtemp(prefix="moetool-bench-plan-"))
    try:
        path = tmp / "deepseek-v3-1m.safetensors"
        synthetic_trace(rc, TOKENS, seq_len=1000, model="deepseek-v3").save(path)
        cmd = [sys.executable, "-m", "moetool.cli", "plan", "deepseek-v3", "--gpu-memory", "80GiB", "--gpus", "8",
               "--trace", str(path), "--ep", "32", "--nodes", "4", "--redundant", "32",
               "--capacity-factor", "1.0", "--capacity-factor", "1.25", "--json"]
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            runs.append(time.perf_counter() - t0)
        whole = min(runs)

        trace = Trace.load(path)
        layers = trace.moe_layers[:LOOP_LAYERS]
        devices = 32
        t0 = time.perf_counter()
        fast = _numpy_count(trace, layers, devices)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = _python_count(trace, layers, contiguous_devices(rc.num_experts, devices), devices)
        t_slow = time.perf_counter() - t0
        assert fast == slow, "the two counts differ"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        {
            "name": f"plan DeepSeek-V3 from a {TOKENS:,}-token trace, whole process (best of 2)",
            "measured": f"{whole:.1f} s",
            "alternative": f"per-token Python loop, contiguous EP count only, {LOOP_LAYERS} of 58 layers: "
                           f"{t_slow:.1f} s",
            "ratio": f"{t_slow / whole:.1f}x faster (whole plan vs a seventh of one count)",
            "command": "moetool plan deepseek-v3 --gpu-memory 80GiB --gpus 8 --trace T --ep 32 --nodes 4 "
                       "--redundant 32 --capacity-factor 1.0 --capacity-factor 1.25 --json",
        },
        {
            "name": f"EP count (device loads + devices per token), contiguous, {TOKENS:,} tokens x "
                    f"{LOOP_LAYERS} layers",
            "measured": f"{t_fast * 1000:.0f} ms (numpy)",
            "alternative": f"per-token Python loop: {t_slow:.1f} s",
            "ratio": f"{t_slow / t_fast:.0f}x faster",
            "command": ".venv/bin/python bench/run.py plan",
        },
    ]
