"""4-bit experts: loading a bf16 Mixtral-shaped checkpoint (hidden 1024, 4 layers, 8 experts of
width 3584: 367M parameters, experts 96% of them, ~700 MB) with `moetool.runtime.quant.bnb.load_in_4bit`
(bitsandbytes NF4 for the `nn.Linear` layers and for the fused 3-D experts, quantized while
loading) vs a plain bf16 load and vs plain `BitsAndBytesConfig(load_in_4bit=True)` (which leaves
the fused experts in bf16). Each load runs in a fresh process; peak is the highest anonymous
resident memory (RssAnon, sampled every 5 ms: the tensors, not the memory-mapped checkpoint)
above the process's baseline after imports. CPU bitsandbytes: `quantize_4bit` is bitsandbytes'
pure-torch kernel here, so the 4-bit load is slow on CPU (on CUDA it is a native kernel)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (the peak-memory child)
    sys.path.insert(0, str(ROOT))

SEED = 1234
MODES = ("bf16", "bnb-4bit-plain", "moetool-4bit", "moetool-4bit-after-load", "moetool-int8")


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def peak_child(mode: str, path: str) -> dict:
    """One load in this (fresh) process, sampling RssAnon every 5 ms."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from moetool.runtime.quant import bnb as quant

    _quiet()
    quant.require_backend("cpu")

    def anon_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.005)

    base = anon_kib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if mode == "bf16":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif mode == "bnb-4bit-plain":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    elif mode == "moetool-4bit":
        model, _ = quant.load_in_4bit(path, dtype="bfloat16")
    elif mode == "moetool-4bit-after-load":  # plain bnb load, then quantize_experts_4bit
        model, _ = quant.load_in_4bit(path, dtype="bfloat16", quantize_experts=False)
        quant.quantize_experts_4bit(model)
    elif mode == "moetool-int8":
        model, _ = quant.load_in_8bit(path, dtype="bfloat16")
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    sizes = quant.expert_weight_bytes(model)
    mib = 2 ** 20
    return {"mode": mode, "seconds": round(seconds, 2), "peak_anon_mib": round((peak[0] - base) / 1024, 1),
            "end_anon_mib": round((anon_kib() - base) / 1024, 1), "weight_mib": round(sizes["weight_bytes"] / mib, 1),
            "expert_mib": round(sizes["expert_weight_bytes"] / mib, 1), "quantization": sizes["quantization"]}


def measure(modes=MODES) -> list[dict]:
    """Peak memory and time of each way of loading the ~700 MB checkpoint, each in its own process."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moetool.runtime.quant import bnb as quant

    quant.require_backend("cpu")
    _quiet()
    config = MixtralConfig(vocab_size=1024, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(SEED)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, mode, tmp], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise RuntimeError(f"bench_quant {mode} failed: {out.stderr.strip()[-500:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]}", flush=True)
    return rows


def run() -> list[dict]:
    res = {r["mode"]: r for r in measure(("bf16", "bnb-4bit-plain", "moetool-4bit"))}
    bf16, plain, ours = res["bf16"], res["bnb-4bit-plain"], res["moetool-4bit"]
    cmd = "python bench/run.py quant"
    return [
        {"name": "expert weights in memory, moetool load_in_4bit (NF4 experts)",
         "measured": f"{ours['expert_mib']:.0f} MiB",
         "alternative": f"bf16: {bf16['expert_mib']:.0f} MiB; plain BitsAndBytesConfig 4-bit: {plain['expert_mib']:.0f} MiB",
         "ratio": f"{ours['expert_mib'] / bf16['expert_mib']:.3f}x bf16 ({plain['expert_mib'] / bf16['expert_mib']:.2f}x plain bnb)",
         "command": cmd},
        {"name": "whole model weights in memory, moetool load_in_4bit",
         "measured": f"{ours['weight_mib']:.0f} MiB",
         "alternative": f"bf16: {bf16['weight_mib']:.0f} MiB; plain bnb 4-bit: {plain['weight_mib']:.0f} MiB",
         "ratio": f"{ours['weight_mib'] / bf16['weight_mib']:.3f}x bf16",
         "command": cmd},
        {"name": "peak memory while loading (RssAnon above baseline), moetool load_in_4bit",
         "measured": f"{ours['peak_anon_mib']:.0f} MiB",
         "alternative": f"bf16: {bf16['peak_anon_mib']:.0f} MiB; plain bnb 4-bit: {plain['peak_anon_mib']:.0f} MiB",
         "ratio": f"{ours['peak_anon_mib'] / bf16['peak_anon_mib']:.2f}x bf16",
         "command": cmd},
        {"name": "load time, moetool load_in_4bit on CPU",
         "measured": f"{ours['seconds']:.1f} s",
         "alternative": f"bf16: {bf16['seconds']:.1f} s; plain bnb 4-bit: {plain['seconds']:.1f} s",
         "ratio": f"{ours['seconds'] / bf16['seconds']:.1f}x slower than bf16 (CPU quantize_4bit is pure torch)",
         "command": cmd},
    ]


if __name__ == "__main__":  # the child: python bench/bench_quant.py MODE PATH
    print(json.dumps(peak_child(sys.argv[1], sys.argv[2])))
