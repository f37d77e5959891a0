"""`moetool prune` and `moetool merge-experts` on a Mixtral-8x7B-shaped checkpoint (hidden 4096,
expert intermediate 14336, 8 experts, bf16; 2 layers and a small vocabulary, about 5.8 GB, in
1 GiB shards), generated on the fly into bench/work/ shard by shard without building the model.
Throughput (input checkpoint bytes per second of wall time, whole process) is compared with
copying the same files (shutil.copyfile + fsync per file: the surgery fsyncs its shards too),
and peak RSS of each process (getrusage of a fresh wrapper's children) with the largest shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "surgery"
SHARD = 1 << 30
LAYERS = int(os.environ.get("MOETOOL_BENCH_SURGERY_LAYERS", "2"))

CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": LAYERS,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 384, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
    "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None,
}

# each measurement runs in a fresh interpreter whose children's peak RSS is exactly the command's
WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t0
if p.returncode:
    sys.stderr.write(p.stderr); sys.exit(p.returncode)
print(json.dumps({"seconds": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

COPY = """
import os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for p in sorted(src.iterdir()):
    shutil.copyfile(p, dst / p.name)
    fd = os.open(dst / p.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def write_checkpoint(path: Path, config: dict, tensor_of) -> dict:
    """The on-disk Mixtral layout of ``config`` (per-expert w1/w2/w3) in 1 GiB shards with an
    index, each tensor made by ``tensor_of(info)`` (bf16) as its shard is written; the tokenizer
    of tiny-mixtral."""
    from moetool.compression.surgery import OutTensor, write_safetensors, write_tensor_bytes

    shards = shard_layout(config)
    path.mkdir(parents=True)
    weight_map = {}
    for i, infos in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

        def writer(info):
            def write(fd):
                write_tensor_bytes(fd, tensor_of(info))
            return write

        write_safetensors(path / fname, [OutTensor(t.name, "BF16", t.shape, t.numel * 2, writer(t)) for t in infos])
        weight_map.update({t.name: fname for t in infos})
    total = sum(t.numel * 2 for s in shards for t in s)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(ROOT / "fixtures" / "tiny-mixtral" / f, path / f)
    return {"bytes": total, "largest_shard": max(p.stat().st_size for p in path.glob("*.safetensors")),
            "shards": len(shards)}


def shard_layout(config: dict) -> list[list]:
    """The family's tensors of ``config`` grouped into shards of at most SHARD bf16 bytes."""
    from moetool.families import family_for_config

    fam = family_for_config(config)
    shards: list[list] = [[]]
    size = 0
    for t in fam.tensors(fam.resolve(config)):
        nbytes = t.numel * 2
        if shards[-1] and size + nbytes > SHARD:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def generate(path: Path) -> dict:
    """Random bf16 weights written tensor by tensor, in 1 GiB shards, with an index."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return write_checkpoint(path, CONFIG,
                            lambda info: (torch.randn(info.shape, generator=gen) * 0.02).to(torch.bfloat16))


def synthetic_trace(path: Path, tokens: int = 4096) -> None:
    """A routing trace with skewed random usage (what merge needs for its usage weights)."""
    import numpy as np

    from moetool.analysis.trace import Trace

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(8) * 0.7)
    experts, weights = {}, {}
    for L in range(LAYERS):
        ids = np.stack([rng.choice(8, size=2, replace=False, p=p) for _ in range(tokens)]).astype(np.uint8)
        experts[L] = ids
        weights[L] = np.full((tokens, 2), 0.5, np.float16)
    meta = {"model": str(WORK / "model"), "family": "mixtral", "num_experts": 8, "top_k": 2, "num_layers": LAYERS,
            "moe_layers": list(range(LAYERS)), "texts": [], "quantization": "none", "weight_bytes": 0,
            "expert_weight_bytes": 0, "dtype": "bfloat16"}
    z = np.zeros(tokens, np.int32)
    Trace(z, z, np.arange(tokens, dtype=np.int32), z.astype(np.uint8), experts, weights, {}, meta).save(path)


def _measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> list[dict]:
    per_layer = 8 * 3 * 4096 * 14336 * 2
    need = int(LAYERS * per_layer * 2.6)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    free = shutil.disk_usage(WORK).free
    if free < need:
        raise SystemExit(f"bench_surgery needs about {need / 1e9:.1f} GB free in {WORK}, {free / 1e9:.1f} GB free")
    try:
        src = WORK / "model"
        t0 = time.perf_counter()
        info = generate(src)
        gen_s = time.perf_counter() - t0
        print(f"  generated {info['bytes'] / 1e9:.2f} GB in {info['shards']} shards ({gen_s:.0f} s)", flush=True)
        synthetic_trace(WORK / "usage.trace")
        moetool = [sys.executable, "-m", "moetool.cli"]
        runs = {
            "copy": [sys.executable, "-c", COPY, str(src), str(WORK / "copy")],
            "prune": moetool + ["prune", str(src), "--out", str(WORK / "pruned"), "--keep", "4", "--by", "random",
                                "--json"],
            "merge": moetool + ["merge-experts", str(src), "--out", str(WORK / "merged"), "--to", "4",
                                "--similarity", "weight", "--trace", str(WORK / "usage.trace"), "--json"],
        }
        results = {}
        for name, cmd in runs.items():
            results[name] = _measure(cmd)
            for d in ("copy", "pruned", "merged"):
                shutil.rmtree(WORK / d, ignore_errors=True)  # keep the disk footprint to one extra checkpoint
            print(f"  {name}: {results[name]}", flush=True)
        gb = info["bytes"] / 1e9
        copy_tp = gb / results["copy"]["seconds"]
        shard_gib = info["largest_shard"] / 2**30
        rows = []
        for name, what in (("prune", "prune --keep 4 --by random (8 -> 4 experts)"),
                           ("merge", "merge-experts --to 4 --similarity weight (usage from a trace)")):
            r = results[name]
            tp = gb / r["seconds"]
            rss = r["maxrss_kib"] * 1024
            rows.append({
                "name": f"{what}: throughput on {gb:.1f} GB bf16 Mixtral-shaped checkpoint",
                "measured": f"{tp:.2f} GB/s ({r['seconds']:.1f} s)",
                "alternative": f"copying the files: {copy_tp:.2f} GB/s ({results['copy']['seconds']:.1f} s)",
                "ratio": f"{tp / copy_tp:.2f}x copy speed",
                "command": " ".join(["moetool"] + runs[name][3:]).replace(str(ROOT) + "/", ""),
            })
            rows.append({
                "name": f"{what}: peak RSS",
                "measured": f"{rss / 2**30:.2f} GiB",
                "alternative": f"largest shard {shard_gib:.2f} GiB",
                "ratio": f"{rss / info['largest_shard']:.2f}x the largest shard",
                "command": "getrusage(RUSAGE_CHILDREN).ru_maxrss of a fresh wrapper process",
            })
        return rows
    finally:
        if not os.environ.get("MOETOOL_BENCH_KEEP"):
            shutil.rmtree(WORK, ignore_errors=True)
