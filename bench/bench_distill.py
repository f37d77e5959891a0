"""`moetool distill` training throughput on fixtures/trained-mixtral: two data-parallel CPU
processes (torchrun, gloo, one thread each) against one process (two threads) at the same
global batch, and the teacher's top-64 log-probabilities cached on disk against running the
teacher every step (the cache built in the same run, then reused by a second run). tokens/s
counts the optimizer steps' tokens over the training loop's wall time (loading, calibration,
cache building and evaluation excluded; the end-to-end row includes everything). Each
comparison alternates its two sides three times and reports medians."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "fixtures/trained-mixtral"
STEPS = 30
BASE = ["distill", TEACHER, "--file", "fixtures/corpus/train-prose.txt", "--file", "fixtures/corpus/train-code.txt",
        "--steps", str(STEPS), "--seq-len", "128", "--init", "topk", "--calib-tokens", "2048", "--json"]


def _run(args: list[str], procs: int = 1, threads: int | None = None) -> tuple[dict, float]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "moetool.cli", *args]
    else:
        cmd = [sys.executable, "-m", "moetool.cli", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout), wall


def _median(xs):
    return statistics.median(xs)


def _spread(xs, fmt="{:,.0f}") -> str:
    return f"median of {len(xs)}: " + ", ".join(fmt.format(x) for x in sorted(xs))


def run(repeats: int = 3) -> list[dict]:
    """Each comparison alternates its two sides REPEATS times (the machine may be shared:
    interleaving exposes both sides to the same background load) and reports medians."""
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moetool-bench-distill-") as tmp:
        one_tps, two_tps = [], []
        for i in range(repeats):
            one, _ = _run([*BASE, "--batch-size", "8", "--grad-accum", "2", "--out", f"{tmp}/one{i}"], threads=cores)
            two, _ = _run([*BASE, "--batch-size", "8", "--out", f"{tmp}/two{i}"], procs=2, threads=half)
            assert two["training"]["processes"] == 2
            one_tps.append(one["training"]["tokens_per_second"])
            two_tps.append(two["training"]["tokens_per_second"])
        a, b = _median(two_tps), _median(one_tps)
        rows.append({
            "name": f"distill training, 2 processes x {half} thread vs 1 process x {cores} threads, same global batch "
                    f"({STEPS} steps of {one['training']['tokens_per_step']:,} tokens, teacher every step)",
            "measured": f"{a:,.0f} tokens/s ({_spread(two_tps)})",
            "alternative": f"1 process, --grad-accum 2: {b:,.0f} tokens/s ({_spread(one_tps)})",
            "ratio": f"{a / b:.2f}x",
            "command": f"torchrun --standalone --nproc_per_node 2 -m moetool.cli {' '.join(BASE)} --batch-size 8 --out OUT",
        })
        args = [*BASE, "--batch-size", "16"]
        plain_tps, warm_tps, plain_wall, cold_wall, warm_wall, build = [], [], [], [], [], []
        for i in range(repeats):
            plain, w0 = _run([*args, "--out", f"{tmp}/plain{i}"], threads=cores)
            cold, w1 = _run([*args, "--out", f"{tmp}/cold{i}", "--cache-teacher", f"{tmp}/cache{i}"], threads=cores)
            warm, w2 = _run([*args, "--out", f"{tmp}/warm{i}", "--cache-teacher", f"{tmp}/cache{i}"], threads=cores)
            plain_tps.append(plain["training"]["tokens_per_second"])
            warm_tps.append(warm["training"]["tokens_per_second"])
            plain_wall.append(w0)
            cold_wall.append(w1)
            warm_wall.append(w2)
            build.append(cold["timings"]["cache_s"])
        c, p = _median(warm_tps), _median(plain_tps)
        rows.append({
            "name": f"distill training loop, teacher's top-64 read from the cache vs teacher run every step "
                    f"({STEPS} steps of {plain['training']['tokens_per_step']:,} tokens, 1 process)",
            "measured": f"{c:,.0f} tokens/s ({_spread(warm_tps)})",
            "alternative": f"teacher every step: {p:,.0f} tokens/s ({_spread(plain_tps)})",
            "ratio": f"{c / p:.2f}x",
            "command": f"moetool {' '.join(args)} --out OUT --cache-teacher DIR",
        })
        cw, ww, pw = _median(cold_wall), _median(warm_wall), _median(plain_wall)
        rows.append({
            "name": "the same, whole process: a first run that builds the cache plus a second run that reuses it, "
                    "vs two runs that run the teacher every step",
            "measured": f"{cw:.1f} s + {ww:.1f} s (building the cache: {_median(build):.1f} s)",
            "alternative": f"2 x {pw:.1f} s",
            "ratio": f"{2 * pw / (cw + ww):.2f}x",
            "command": f"moetool {' '.join(args)} --out OUT --cache-teacher DIR  (twice)",
        })
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
