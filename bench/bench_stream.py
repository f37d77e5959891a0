"""`prune --by reap --file ...` calibration on a Mixtral-shaped bf16 checkpoint larger than this
machine's RAM (hidden 4096, expert intermediate 14336, 8 experts, 10 layers, small vocabulary:
about 29 GB in 1 GiB shards on this 24 GiB machine: as many layers as make it ~10% larger than RAM, generated into bench/work/stream/ shard by shard and deleted at
the end), streamed layer by layer (`--stream`) vs loaded through accelerate's disk offload
(`--no-stream --max-memory cpu=12GiB`), in the same run. Each command runs in a fresh process
under a wall-clock cap; measured: wall time, peak RSS (ru_maxrss from wait4), and bytes the
process read from storage and through read() calls (/proc/PID/io read_bytes and rchar, last
sample before exit; pages served from the page cache count in rchar, not read_bytes; mmap'd
reads count in read_bytes only). MOETOOL_BENCH_STREAM_SCALE=small: a ~1.7 GB version (hidden
2048, width 5632, 3 layers) to validate the harness."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "stream"
SHARD = 1 << 30
SMALL = os.environ.get("MOETOOL_BENCH_STREAM_SCALE") == "small"
_RAM = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
_LAYER = 8 * 3 * 4096 * 14336 * 2 + 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024)  # bf16 bytes per full-size layer
# enough layers that the checkpoint is ~10% larger than this machine's RAM (10 on 24 GiB)
LAYERS = int(os.environ.get("MOETOOL_BENCH_STREAM_LAYERS", "3" if SMALL else str(-(-int(1.1 * _RAM) // _LAYER))))
TOKENS = int(os.environ.get("MOETOOL_BENCH_STREAM_TOKENS", "256"))
CAP_S = int(os.environ.get("MOETOOL_BENCH_STREAM_CAP", "1200"))  # per command
CPU_BUDGET = os.environ.get("MOETOOL_BENCH_STREAM_CPU", "12GiB" if not SMALL else "600MiB")

# the calibration step of `moetool prune --by reap --file F --max-tokens N` (what the command runs
# before its surgery; the surgery itself is benchmarked in bench_surgery.py): moetool.compression.prune.gather_stats
CALIBRATE = r"""
import json, sys, time
from moetool.families.resolve import resolve_family
from moetool.compression.prune import gather_stats
from moetool.checkpoint.source import resolve
model, file, tokens, opts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
t0 = time.perf_counter()
stats = gather_stats(model, resolve_family(resolve(model)), None, file, tokens, 8, opts, reap=True)
print(json.dumps({"tokens": stats.source["tokens"], "seconds": time.perf_counter() - t0,
                  "reap_layer0": [round(float(x), 6) for x in stats.reap[0]]}))
"""

CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 2048 if SMALL else 4096,
    "intermediate_size": 5632 if SMALL else 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": LAYERS, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 384,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
    "hidden_act": "silu", "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None,
}

# the process without any decoder layer: Python, torch, transformers, the skeleton with its
# embeddings, norm and head, the tokenizer (what every streamed run holds besides layers)
BASELINE = r"""
import sys
from moetool.runtime.loading import load_model
lm = load_model(sys.argv[1], stream=True)
print('{}')
"""

# run a command in a child, capped; report wall time, peak RSS and the child's I/O counters
WRAPPER = r"""
import json, os, signal, subprocess, sys, time
cap = float(sys.argv[1])
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
io, timed_out = {}, False
import threading
out = {}
def drain(name, stream): out[name] = stream.read()
threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("stdout", p.stdout), ("stderr", p.stderr))]
for t in threads: t.start()
while p.poll() is None:
    try:
        io = dict(line.split(": ") for line in open(f"/proc/{p.pid}/io").read().split("\n") if line)
    except OSError:
        pass
    if time.perf_counter() - t0 > cap:
        timed_out = True
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        break
    time.sleep(0.2)
_, status, ru = os.wait4(p.pid, 0) if p.returncode is None else (0, 0, None)
wall = time.perf_counter() - t0
for t in threads: t.join()
import resource
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": wall, "maxrss_kib": rss, "read_bytes": int(io.get("read_bytes", 0)),
                  "rchar": int(io.get("rchar", 0)), "timed_out": timed_out, "returncode": p.returncode,
                  "stderr": out.get("stderr", "")[-400:], "stdout": out.get("stdout", "")}))
"""


def generate(path: Path) -> dict:
    """Random bf16 weights written tensor by tensor, in 1 GiB shards, with an index (the
    on-disk Mixtral layout: per-expert w1/w2/w3)."""
    import torch

    from bench.bench_surgery import shard_layout, write_checkpoint
    from moetool.families import family_for_config

    gen = torch.Generator().manual_seed(0)
    # random weights without drawing 15 billion normals: every tensor is a window of one pool of
    # seeded N(0, 0.02^2) values at its own random offset (disk-bound instead of randn-bound)
    biggest = max(t.numel for s in shard_layout(CONFIG) for t in s)
    pool = (torch.randn(biggest + (1 << 26), generator=gen) * 0.02).to(torch.bfloat16)

    def tensor_of(info):
        if info.role == "router":  # routers with more signal: routing varies
            return (torch.randn(info.shape, generator=gen) * 0.05).to(torch.bfloat16)
        at = int(torch.randint(0, pool.numel() - info.numel + 1, (1,), generator=gen))
        return pool[at:at + info.numel].view(info.shape)

    info = write_checkpoint(path, CONFIG, tensor_of)
    fam = family_for_config(CONFIG)
    info["layer_bytes"] = sum(t.numel * 2 for t in fam.layer_tensors(fam.resolve(CONFIG), 0))
    return info


def _measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, str(CAP_S), *cmd], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"wrapper failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def run() -> list[dict]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model = WORK / "model"
    calib = ROOT / "fixtures" / "corpus" / "train-prose.txt"
    try:
        t0 = time.perf_counter()
        info = generate(model)
        gen_s = time.perf_counter() - t0
        print(f"  generated {_gb(info['bytes'])} in {gen_s:.0f} s", flush=True)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        baseline = _measure([sys.executable, "-c", BASELINE, str(model)])
        print(f"  baseline: {json.dumps(baseline)}", flush=True)
        base = [sys.executable, "-c", CALIBRATE, str(model), str(calib), str(TOKENS)]
        stream = _measure(base + [json.dumps({"stream": True})])
        print(f"  stream: {json.dumps(stream)}", flush=True)
        offload = _measure(base + [json.dumps({"stream": False, "max_memory": f"cpu={CPU_BUDGET}",
                                               "offload_folder": str(WORK / "offload")})])
        print(f"  offload: {json.dumps(offload)}", flush=True)
        same = None
        if not (stream["returncode"] or offload["returncode"] or stream["timed_out"] or offload["timed_out"]):
            a = json.loads(stream["stdout"].strip().splitlines()[-1])["reap_layer0"]
            b = json.loads(offload["stdout"].strip().splitlines()[-1])["reap_layer0"]
            same = max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a, b))
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    hidden = CONFIG["hidden_size"]
    acts = TOKENS * hidden * 2 * 2  # bf16 hidden states in and out of a layer
    bound = baseline["maxrss_kib"] * 1024 + 2 * info["layer_bytes"] + acts
    size = (f"{_gb(info['bytes'])} bf16 Mixtral-shaped ({LAYERS} layers, hidden {hidden}, 8 experts of width "
            f"{CONFIG['intermediate_size']}) on a machine with {ram / 2**30:.0f} GiB RAM, {TOKENS} calibration tokens")

    def res(r: dict) -> str:
        if r["timed_out"]:
            return f"did not finish within the {CAP_S} s cap (stopped by SIGTERM)"
        if r["returncode"]:
            return f"failed (exit {r['returncode']}: {r['stderr'].strip().splitlines()[-1] if r['stderr'].strip() else '?'})"
        return f"{r['seconds']:.0f} s"

    cmd_s = (f"moetool prune MODEL --keep 4 --by reap --file fixtures/corpus/train-prose.txt --max-tokens {TOKENS} "
             "--stream (its calibration step)")
    cmd_o = cmd_s.replace("--stream", f"--no-stream --max-memory cpu={CPU_BUDGET}")
    rows = [
        {"name": f"REAP calibration (prune --by reap), {size}: wall time", "measured": f"--stream: {res(stream)}",
         "alternative": f"accelerate disk offload (--max-memory cpu={CPU_BUDGET}): {res(offload)}",
         "ratio": (f"{offload['seconds'] / stream['seconds']:.2f}x faster" if not offload["timed_out"]
                   and not offload["returncode"] and not stream["returncode"] else "-"),
         "command": f"{cmd_s}  vs  {cmd_o}" + ("" if same is None else
                                                f"  (REAP scores of layer 0 agree to {same:.1e}, relative)")},
        {"name": "peak RSS (ru_maxrss)", "measured": f"--stream: {stream['maxrss_kib'] / 2**20:.1f} GiB",
         "alternative": f"offload: {offload['maxrss_kib'] / 2**20:.1f} GiB; bound: the process without layers "
                        f"({baseline['maxrss_kib'] / 2**20:.1f} GiB: Python, torch, embeddings, head, tokenizer) + two "
                        f"layers' weights ({2 * info['layer_bytes'] / 2**30:.1f} GiB) + activations "
                        f"({acts / 2**30:.2f} GiB) = {bound / 2**30:.1f} GiB",
         "ratio": f"{stream['maxrss_kib'] * 1024 / bound:.2f}x the two-layer bound",
         "command": "python bench/run.py stream"},
        {"name": "bytes read by the process (read_bytes from storage / rchar through read calls)",
         "measured": f"--stream: {_gb(stream['read_bytes'])} / {_gb(stream['rchar'])}",
         "alternative": f"offload: {_gb(offload['read_bytes'])} / {_gb(offload['rchar'])} (checkpoint {_gb(info['bytes'])})",
         "ratio": "-", "command": "/proc/PID/io of the command's process, sampled every 0.2 s"},
    ]
    return rows
