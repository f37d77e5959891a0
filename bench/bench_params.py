"""`moetool params` (safetensors headers / config templates) vs instantiating the model with
transformers on the meta device, the usual way to count a model without its weights."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


META_SNIPPET = """
import json, sys, torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from moetool.source import presets
from moetool.families import family_for_config
cfg = presets()[sys.argv[1]]["config"]
kw = {k: v for k, v in cfg.items() if k not in ("model_type", "quantization_config")}
with torch.device("meta"):
    m = AutoModelForCausalLM.from_config(CONFIG_MAPPING[family_for_config(cfg).transformers_model_type](**kw))
print(sum(p.numel() for p in m.parameters()))
"""


def run(repeats: int = 5) -> list[dict]:
    rows = []
    for preset in ("mixtral-8x7b", "deepseek-v3"):
        ours = _time([sys.executable, "-m", "moetool.cli", "params", preset, "--json"], repeats)
        meta = _time([sys.executable, "-c", META_SNIPPET, preset], repeats)
        rows.append({
            "name": f"params {preset} (whole process, median of {repeats})",
            "measured": f"{ours * 1000:.0f} ms",
            "alternative": f"transformers from_config on torch.device('meta'): {meta * 1000:.0f} ms",
            "ratio": f"{meta / ours:.1f}x faster",
            "command": f"moetool params {preset} --json",
        })
    return rows
