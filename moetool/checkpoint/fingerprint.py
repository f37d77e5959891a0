"""Which model a trace was recorded on: a fingerprint of the routing config and router weights.

``model_fingerprint(rc, path)`` is the sha256 of

- the config fields that shape routing (family, decoder layers, MoE layers, routed experts,
  top-k, scoring, routing groups), and
- every router tensor of the main model's MoE layers (the family's ``router`` role: router
  weights, biases, DeepSeek's ``e_score_correction_bias``), name suffix, dtype, shape and
  bytes, read from the safetensors files by their header ranges (no torch, no model load).

Two checkpoints share it only if they route the same way. `moetool trace` stores it in the
trace metadata (``model_fingerprint``, docs/trace-format.md); prune, merge-experts, distill and
plan recompute it for the model they are given and refuse a trace of another model unless told
``--accept-foreign-trace``. A trace without one (an older moetool, or a model traced in memory)
is accepted with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moetool.errors import MoetoolError, warn

ROUTING_FIELDS = ("num_layers", "num_experts", "top_k", "scoring", "n_group", "topk_group")
META_KEY = "model_fingerprint"
ACCEPT_FLAG = "--accept-foreign-trace"


def _routing_config(rc) -> dict:
    out = {f: rc.fields.get(f) for f in ROUTING_FIELDS}
    out["moe_layers"] = [int(x) for x in rc.moe_layers]
    return {k: (int(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in out.items()}


def model_fingerprint(rc, path: str | Path, entries: dict | None = None) -> str | None:
    """The fingerprint of the checkpoint at PATH (None when it has no safetensors files)."""
    from moetool.checkpoint.checks import read_entries
    from moetool.checkpoint.safetensors_header import checkpoint_files

    path = Path(path)
    if entries is None:
        files = checkpoint_files(path)
        if not files:
            return None
        entries = read_entries(str(path), files)
    moe = set(int(x) for x in rc.moe_layers)
    routers = []
    for name, ent in entries.items():
        m = rc.family.classify(name)
        if m is not None and m.role == "router" and m.layer in moe:
            routers.append((int(m.layer), name.rsplit(".", 1)[-1], ent))
    h = hashlib.sha256()
    h.update(json.dumps({"family": rc.family.name, **_routing_config(rc)}, sort_keys=True, default=str).encode())
    for layer, leaf, ent in sorted(routers, key=lambda r: (r[0], r[1])):
        h.update(json.dumps([layer, leaf, ent.dtype, list(ent.shape)]).encode())
        fd = os.open(path / ent.file, os.O_RDONLY)
        try:
            left, pos = ent.nbytes, ent.offset
            while left:
                chunk = os.pread(fd, min(left, 16 * 2**20), pos)
                if not chunk:
                    raise MoetoolError(f"{path / ent.file}: truncated while reading {ent.name}")
                h.update(chunk)
                left -= len(chunk)
                pos += len(chunk)
        finally:
            os.close(fd)
    return h.hexdigest()


def check_trace_of_model(trace, trace_path, model: str, rc, path: str | Path | None, accept: bool = False,
                         flag: str = "--trace") -> None:
    """Refuse TRACE unless it was recorded on the model at PATH (same fingerprint); ACCEPT
    (--accept-foreign-trace) turns the refusal into a warning. A trace without a fingerprint,
    or a model without weights here (a preset, a config.json), is accepted with a warning."""
    recorded = trace.meta.get(META_KEY)
    if not recorded:
        warn(f"{flag} {trace_path} has no model fingerprint (recorded by an older moetool or on an in-memory "
             f"model): cannot check that it was recorded on {model}")
        return
    if path is None:
        return  # no weights to compare with (plan on a preset or config.json): shapes were checked
    now = model_fingerprint(rc, path)
    if now is None or now == recorded:
        return
    traced = trace.meta.get("model", "?")
    if accept:
        warn(f"{flag} {trace_path} was recorded on another model ({traced}); using it anyway ({ACCEPT_FLAG})")
        return
    raise MoetoolError(f"{flag} {trace_path} was recorded on another model ({traced}: its router weights or routing "
                       f"config differ from {model}'s); trace this model, or pass {ACCEPT_FLAG} to use it anyway")
