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
from moetool.checkpoint.source import presets
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
    return rows + run_families()


DERIVED_SNIPPET = """
import json, sys
from transformers import CONFIG_MAPPING
cfg = CONFIG_MAPPING[sys.argv[1]]().to_dict()
cfg["model_type"] = sys.argv[1]
json.dump(cfg, open(sys.argv[2], "w"))
"""
META_CONFIG_SNIPPET = """
import json, sys, torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
cfg = json.load(open(sys.argv[1]))
kw = {k: v for k, v in cfg.items() if k != "model_type"}
with torch.device("meta"):
    m = AutoModelForCausalLM.from_config(CONFIG_MAPPING[cfg["model_type"]](**kw))
print(sum(p.numel() for p in m.parameters()))
"""


def run_families(repeats: int = 3) -> list[dict]:
    """A curated family (no transformers) vs a derived one (first call: transformers' model on the
    meta device, then the cached spec) vs transformers alone."""
    import os
    import tempfile

    rows = []
    curated = "qwen3-next-80b-a3b"
    ours = _time([sys.executable, "-m", "moetool.cli", "params", curated, "--json"], repeats)
    meta = _time([sys.executable, "-c", META_SNIPPET, curated], repeats)
    rows.append({"name": f"params {curated} (curated qwen3_next, whole process, median of {repeats})",
                 "measured": f"{ours * 1000:.0f} ms",
                 "alternative": f"transformers from_config on torch.device('meta'): {meta * 1000:.0f} ms",
                 "ratio": f"{meta / ours:.1f}x faster", "command": f"moetool params {curated} --json"})
    derived = "nemotron_h"  # no curated JSON: derived from transformers (its default config)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        subprocess.run([sys.executable, "-c", DERIVED_SNIPPET, derived, str(config)], check=True, cwd=ROOT)
        cmd = [sys.executable, "-m", "moetool.cli", "params", str(config), "--json"]
        firsts, cached = [], []
        for i in range(repeats):
            env = dict(os.environ, MOETOOL_CACHE_DIR=str(Path(tmp) / f"cache{i}"))
            for out in (firsts, cached):
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
                out.append(time.perf_counter() - t0)
        meta = _time([sys.executable, "-c", META_CONFIG_SNIPPET, str(config)], repeats)
    first, again = statistics.median(firsts), statistics.median(cached)
    rows.append({"name": f"params {derived} config (derived family, first call: empty cache, median of {repeats})",
                 "measured": f"{first * 1000:.0f} ms",
                 "alternative": f"transformers from_config on torch.device('meta'): {meta * 1000:.0f} ms",
                 "ratio": f"{meta / first:.1f}x (derivation builds the same meta model)",
                 "command": "moetool params nemotron_h-config.json --json (MOETOOL_CACHE_DIR empty)"})
    rows.append({"name": f"params {derived} config (derived family, cached spec, median of {repeats})",
                 "measured": f"{again * 1000:.0f} ms",
                 "alternative": f"transformers from_config on torch.device('meta'): {meta * 1000:.0f} ms",
                 "ratio": f"{meta / again:.1f}x faster", "command": "moetool params nemotron_h-config.json --json (again)"})
    return rows
