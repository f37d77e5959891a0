"""`moetool plan`: plan a deployment from exact sizes and, when given a trace, measured routing.

Single machine (the way transformers / accelerate serve a model that does not fit on its GPUs):
what every token needs (embeddings, attention, norms, routers, shared experts, dense MLPs, LM
head, and the KV cache for ``context`` x ``batch`` tokens) goes onto the GPUs first, then routed
experts until the GPUs are full, the rest into CPU RAM (up to ``cpu_memory``), the rest on disk.
With a trace the experts that the measured routing uses most get the GPU slots; without one
they go in layer order. Sizes per precision come from :func:`moetool.analysis.count.weight_memory`, the
same figures as ``moetool params`` (bf16, fp8 with block scales, 4-bit NF4 with absmax), so the
bytes placed always add up to the ``params`` memory figure.

Two placements are computed, because transformers 5 fuses all experts of a layer into ONE
module (``model.layers.N.mlp.experts`` with ``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I]) and a device map places modules:

- ``per_expert``: the ideal, one expert at a time, as engines that place single experts do
  (llama.cpp ``-ot``, ktransformers, vLLM expert parallelism). The top-level ``gpu_bytes`` /
  ``cpu_bytes`` / ``disk_bytes`` / ``fits`` are this placement's.
- ``device_map``: what ``--device-map-out`` writes and ``from_pretrained(device_map=...)`` /
  ``moetool trace --device-map`` load as it is: whole ``mlp.experts`` modules on a GPU or
  offloaded. accelerate runs an offloaded module on the first GPU and copies ALL its weights
  there for every forward pass, so GPU 0 keeps room for the largest offloaded module.

Expert parallelism, capacity factors and held-out validation are in :mod:`moetool.analysis.plan_ep`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moetool.analysis.count import weight_memory
from moetool.errors import MoetoolError

PRECISIONS = ("bf16", "fp8", "int4")
KV_BYTES = 2  # KV cache held in bf16 whatever the weights' precision
ACT_BYTES = 2  # activations cross PCIe in bf16
CPU, DISK = "cpu", "disk"


# -- sizes -------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    """A placeable piece: a model-level module, the non-expert part of a decoder layer (with
    its KV cache), or all routed experts of one MoE layer."""

    kind: str  # "model" | "layer" | "experts"
    name: str  # module path for "model"; "model.layers.L" for a layer; "model.layers.L experts"
    layer: int | None
    bytes: dict[str, int]
    kv: int = 0


@dataclass
class Layout:
    rc: Any
    units: list[Unit]  # forward order
    expert_bytes: dict[int, dict[str, np.ndarray]]  # MoE layer -> precision -> [E] bytes per routed expert
    total: dict[str, int]
    kv_bytes: int


def model_layout(rc, context: int, batch: int) -> Layout:
    """Bytes per unit and per routed expert at each precision, from the family's tensors."""
    zero = lambda: dict.fromkeys(PRECISIONS, 0)  # noqa: E731
    model_units: dict[str, dict[str, int]] = defaultdict(zero)
    rest: dict[int, dict[str, int]] = defaultdict(zero)
    routed: dict[int, dict[str, int]] = defaultdict(zero)
    for t, n in rc.family.tensor_groups(rc):
        mem = weight_memory([(t.shape, t.role, n)])
        if t.layer is None:
            target = model_units[t.name.rsplit(".", 1)[0]]
        elif t.role == "routed_experts":
            target = routed[t.layer]
        else:
            target = rest[t.layer]
        for p in PRECISIONS:
            target[p] += mem[p]
    E = int(rc.num_experts)
    def kv_layer(L: int) -> int:  # a sliding-window layer caches at most its window
        return rc.kv_elements(L) * KV_BYTES * min(context, rc.attention_window(L) or context) * batch

    # hybrids: only softmax-attention layers cache keys and values; Mamba / linear-attention layers keep a
    # fixed state per sequence (counted where the family describes its size)
    attention = set(rc.attention_layers)
    state_layer = (rc.state_elements_per_layer or 0) * KV_BYTES * batch
    state = set(rc.state_layers)
    first = [k for k in model_units if "embed" in k]
    last = [k for k in model_units if k not in first]
    units = [Unit("model", k, None, dict(model_units[k])) for k in first]
    expert_bytes = {}
    for L in range(rc.num_layers):
        cache = (kv_layer(L) if L in attention else 0) + (state_layer if L in state else 0)
        units.append(Unit("layer", f"model.layers.{L}", L, dict(rest[L]), kv=cache))
        if L in routed:
            units.append(Unit("experts", f"model.layers.{L} experts", L, dict(routed[L])))
            per = {}
            for p in PRECISIONS:  # fused tensors (gpt-oss) split evenly; the bytes still add up exactly
                base, extra = divmod(routed[L][p], E)
                per[p] = np.full(E, base, dtype=np.int64) + (np.arange(E) < extra)
            expert_bytes[L] = per
    units += [Unit("model", k, None, dict(model_units[k])) for k in last]
    total = {p: sum(u.bytes[p] for u in units) for p in PRECISIONS}
    return Layout(rc, units, expert_bytes, total, sum(u.kv for u in units))


# -- routing: measured (a trace, split into fit / held-out) or assumed uniform -----------------------------
@dataclass
class Routing:
    source: str  # "trace" | "uniform"
    moe_layers: list[int]
    num_experts: int
    top_k: int
    fit: dict[int, np.ndarray]  # [E] expert counts on the tokens placements are chosen from
    eval_ids: dict[int, np.ndarray] | None  # [k, T] the tokens placements are judged on (choice by row)
    eval_counts: dict[int, np.ndarray]
    eval_tokens: int
    split: dict = field(default_factory=dict)
    seq_counts: Any = None  # moetool.analysis.plan_ep.sequence_counts of the trace, when computed


def split_tokens(trace, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(fit mask, held-out mask, description). By sequence when the trace has enough of them,
    else by token order (the last ``holdout`` share held out). holdout 0 = judge in-sample."""
    T = trace.tokens
    if not 0 <= holdout < 1:
        raise MoetoolError(f"--holdout {holdout}: give a share between 0 and 1 (e.g. 0.2)")
    if holdout == 0 or T < 2:
        mask = np.ones(T, dtype=bool)
        return mask, mask, {"by": "none (in-sample)", "holdout": 0.0, "fit_tokens": T, "heldout_tokens": T}
    seqs = np.unique(trace.sequence)
    n_held = int(round(holdout * len(seqs)))
    if len(seqs) >= 2 and 1 <= n_held < len(seqs):
        held_seqs = np.random.default_rng(seed).permutation(seqs)[:n_held]
        held = np.isin(trace.sequence, held_seqs)
        by = "sequence"
        extra = {"fit_sequences": int(len(seqs) - n_held), "heldout_sequences": int(n_held), "seed": seed}
    else:
        cut = min(T - 1, max(1, int(round(T * (1 - holdout)))))
        held = np.arange(T) >= cut
        by = "token order"
        extra = {}
    return ~held, held, {"by": by, "holdout": holdout, "fit_tokens": int((~held).sum()),
                         "heldout_tokens": int(held.sum()), **extra}


def routing_from_trace(trace, holdout: float, seed: int = 0) -> Routing:
    from moetool.analysis.plan_ep import sequence_counts

    fit_mask, held_mask, info = split_tokens(trace, holdout, seed)
    same = info["by"].startswith("none")
    E = trace.num_experts
    per_seq = sequence_counts(trace.experts, trace.sequence, E, zero=trace.zero_experts)  # shared with capacity
    fit, ev, ev_ids = {}, {}, {}
    held_rows = None
    if per_seq is not None and info["by"] == "sequence":
        held_rows = np.isin(per_seq[0], np.unique(trace.sequence[held_mask]))
    for L in trace.moe_layers:
        ids = trace.experts[L]
        total = per_seq[2][L].sum(axis=0) if per_seq is not None else _expert_counts(ids, E)
        held = ids if same else ids[held_mask]
        ev_ids[L] = np.ascontiguousarray(_real_choices(held, E).T)  # choice by row: contiguous per-choice lookups
        if same:
            ev[L] = total
        elif held_rows is not None:
            ev[L] = per_seq[2][L][held_rows].sum(axis=0)
        else:
            ev[L] = _expert_counts(held, E)
        fit[L] = total if same else total - ev[L]
    return Routing("trace", trace.moe_layers, E, trace.top_k, fit, ev_ids, ev, int(held_mask.sum()), info, per_seq)


def _expert_counts(ids: np.ndarray, E: int) -> np.ndarray:
    """Choices of each of the E routed experts (ids >= E: zero-computation experts, which load nothing)."""
    return np.bincount(ids.ravel(), minlength=E)[:E]


def _real_choices(ids: np.ndarray, E: int) -> np.ndarray:
    """IDS [T, k] as far as dispatch is concerned: a choice of a zero-computation expert (id >= E)
    computes nothing and sends the token nowhere, so it is replaced by one of the token's own
    routed choices (the set of experts, devices and nodes it reaches is unchanged); tokens whose
    every choice is a zero expert go nowhere and are left out."""
    zero = ids >= E
    if not zero.any():
        return ids
    rows = ids[~zero.all(axis=1)]
    z = rows >= E
    first = rows[np.arange(rows.shape[0]), np.argmin(z, axis=1)]
    return np.where(z, first[:, None], rows)


def uniform_routing(rc) -> Routing:
    E, k = int(rc.num_experts), int(rc.top_k)
    counts = {L: np.full(E, float(k) / E) for L in rc.moe_layers}  # per token: k/E of a read per expert
    return Routing("uniform", list(rc.moe_layers), E, k, counts, None, counts, 1,
                   {"by": "none: no trace, every expert assumed equally likely (k/E)"})


# -- hardware and bins -------------------------------------------------------------------------------------
@dataclass
class Hardware:
    gpus: int
    gpu_memory: int | None
    cpu_memory: int | None
    reserve: int = 0

    @property
    def compute(self) -> list:
        return list(range(self.gpus)) if self.gpus else [CPU]

    def budget(self, dev) -> float:
        if dev == DISK:
            return math.inf
        if dev == CPU:
            return math.inf if self.cpu_memory is None else float(self.cpu_memory)
        return float(self.gpu_memory - self.reserve)

    @property
    def offload(self) -> list:
        return [CPU, DISK] if self.gpus else [DISK]

    def describe(self) -> dict:
        return {"gpus": self.gpus, "gpu_memory": self.gpu_memory, "cpu_memory": self.cpu_memory,
                "reserve_per_gpu": self.reserve}


class Bins:
    def __init__(self, hw: Hardware):
        self.hw = hw
        self.used: dict = defaultdict(float)  # weights + KV per device
        self.weights: dict = defaultdict(int)
        self.kv: dict = defaultdict(int)

    def free(self, dev) -> float:
        return self.hw.budget(dev) - self.used[dev]

    def put(self, dev, weights: int, kv: int = 0) -> None:
        self.used[dev] += weights + kv
        self.weights[dev] += weights
        self.kv[dev] += kv

    def take(self, dev, weights: int) -> None:
        self.used[dev] -= weights
        self.weights[dev] -= weights

    def compute_with_room(self, size: int, prefer=None):
        if prefer is not None and prefer in self.hw.compute and self.free(prefer) >= size:
            return prefer
        best = max(self.hw.compute, key=self.free)
        return best if self.free(best) >= size else None

    def offload_with_room(self, size: int):
        for dev in self.hw.offload:
            if self.free(dev) >= size:
                return dev
        return DISK


def _place_resident(units: list[Unit], prec: str, bins: Bins) -> dict[str, Any]:
    """Non-expert units in forward order, spread over the compute devices in contiguous runs of
    layers of about equal size (the way a "balanced" device map splits a model)."""
    compute = bins.hw.compute
    need = [u.bytes[prec] + u.kv for u in units]
    total = sum(need)
    where: dict[str, Any] = {}
    g, acc = 0, 0
    for u, size in zip(units, need):
        while g < len(compute) - 1 and (bins.free(compute[g]) < size or acc >= total * (g + 1) / len(compute)):
            g += 1
        dev = compute[g] if bins.free(compute[g]) >= size else bins.compute_with_room(size)
        if dev is None:  # the part every token needs does not fit: offloaded, its KV stays on the main device
            dev = bins.offload_with_room(u.bytes[prec])
            bins.put(dev, u.bytes[prec])
            bins.put(compute[0], 0, u.kv)
        else:
            bins.put(dev, u.bytes[prec], u.kv)
        where[u.name] = dev
        acc += size
    return where


def _priority(values: np.ndarray) -> np.ndarray:
    """Indices by value, highest first; ties keep their (layer, expert) order."""
    return np.lexsort((np.arange(values.shape[0]), -values))


def _tier(dev) -> str:
    return DISK if dev == DISK else (CPU if dev == CPU else "gpu")


# -- the two placements ------------------------------------------------------------------------------------
def place_per_expert(layout: Layout, routing: Routing, prec: str, hw: Hardware) -> dict:
    bins = Bins(hw)
    resident = [u for u in layout.units if u.kind != "experts"]
    where = _place_resident(resident, prec, bins)
    layers = routing.moe_layers
    E = routing.num_experts
    sizes = np.concatenate([layout.expert_bytes[L][prec] for L in layers])
    value = np.concatenate([routing.fit[L].astype(np.float64) for L in layers]) / np.maximum(sizes, 1)
    order = _priority(value)
    device = np.empty(len(layers) * E, dtype=object)
    for i in order:
        L = layers[i // E]
        size = int(sizes[i])
        dev = bins.compute_with_room(size, prefer=where[f"model.layers.{L}"])
        if dev is None:
            dev = bins.offload_with_room(size)
        bins.put(dev, size)
        device[i] = dev
    grid = {L: device[x * E:(x + 1) * E] for x, L in enumerate(layers)}
    offloaded_units = [u for u in resident if where[u.name] not in hw.compute]
    out = _summary(layout, prec, hw, bins, offloaded_units)
    out.update(_expert_reads(layout, routing, prec, hw, grid))
    per_token = out["per_token"]  # offloaded modules that every token needs are read for every token
    if hw.gpus:
        per_token["pcie_weights"] += sum(u.bytes[prec] for u in offloaded_units)
    per_token["disk"] += sum(u.bytes[prec] for u in offloaded_units if where[u.name] == DISK)
    counts = {t: 0 for t in ("gpu", CPU, DISK)}
    for dev in device:
        counts[_tier(dev)] += 1
    out["experts"] = counts
    out["why"] = _why(layout, prec, hw, out, offloaded_units, "routed experts")
    out["_grid"] = grid
    return out


def place_modules(layout: Layout, routing: Routing, prec: str, hw: Hardware) -> dict:
    """Module granularity: each MoE layer's experts module is on a compute device or offloaded
    whole. Offloaded modules are copied to the main device (GPU 0) when they run, so GPU 0
    keeps room for the largest one."""
    bins = Bins(hw)
    resident = [u for u in layout.units if u.kind != "experts"]
    where = _place_resident(resident, prec, bins)
    experts = [u for u in layout.units if u.kind == "experts"]
    value = np.array([routing.fit[u.layer].sum() / max(u.bytes[prec], 1) for u in experts], dtype=np.float64)
    order = list(_priority(value))
    for i in order:
        u = experts[i]
        size = u.bytes[prec]
        dev = bins.compute_with_room(size, prefer=where[f"model.layers.{u.layer}"])
        if dev is None:
            dev = bins.offload_with_room(size)
        bins.put(dev, size)
        where[u.name] = dev
    staging = 0
    if hw.gpus:
        main = hw.compute[0]
        while True:
            off = [layout_u.bytes[prec] for layout_u in layout.units if where[layout_u.name] in (CPU, DISK)]
            staging = max(off, default=0)
            if bins.free(main) >= staging:
                break
            victims = [experts[i] for i in reversed(order) if where[experts[i].name] == main]
            if not victims:
                break
            v = victims[0]
            bins.take(main, v.bytes[prec])
            where[v.name] = bins.offload_with_room(v.bytes[prec])
            bins.put(where[v.name], v.bytes[prec])
    offloaded_units = [u for u in resident if where[u.name] not in hw.compute]
    out = _summary(layout, prec, hw, bins, offloaded_units, staging=staging)
    total_reads = sum(float(routing.eval_counts[L].sum()) for L in routing.moe_layers) or 1.0
    on = sum(float(routing.eval_counts[u.layer].sum()) for u in experts if where[u.name] in hw.compute)
    streamed = sum(u.bytes[prec] for u in layout.units if where[u.name] in (CPU, DISK)) if hw.gpus else 0
    from_disk = sum(u.bytes[prec] for u in layout.units if where[u.name] == DISK)
    out["routed_reads_on_gpu"] = on / total_reads
    out["per_token"] = {"pcie_weights": int(streamed), "pcie_activations": 0, "disk": int(from_disk)}
    out["expert_modules"] = {
        t: sum(1 for u in experts if (_tier(where[u.name]) if hw.gpus else where[u.name]) == t)
        for t in (("gpu", CPU, DISK) if hw.gpus else (CPU, DISK))
    }
    out["staging_bytes"] = int(staging)
    if hw.gpus and staging and bins.free(hw.compute[0]) < staging:
        out["fits"] = False
    out["why"] = _why(layout, prec, hw, out, offloaded_units, "expert modules")
    out["_where"] = where
    return out


def _summary(layout: Layout, prec: str, hw: Hardware, bins: Bins, offloaded_units, staging: int = 0) -> dict:
    gpu = sum(bins.weights[d] for d in hw.compute) if hw.gpus else 0
    cpu = bins.weights[CPU]
    disk = bins.weights[DISK]
    over = [d for d in hw.compute if bins.used[d] > hw.budget(d) + 1e-6]
    devices = []
    for d in hw.compute:
        devices.append({"device": d, "weights": int(bins.weights[d]), "kv_cache": int(bins.kv[d]),
                        "budget": None if math.isinf(hw.budget(d)) else int(hw.budget(d)),
                        "free": None if math.isinf(hw.budget(d)) else int(hw.budget(d) - bins.used[d])})
    fits = not offloaded_units and not over and (disk == 0) and (cpu == 0 if hw.gpus else True)
    return {"fits": bool(fits), "gpu_bytes": int(gpu), "cpu_bytes": int(cpu), "disk_bytes": int(disk),
            "devices": devices}


def _expert_reads(layout: Layout, routing: Routing, prec: str, hw: Hardware, grid: dict) -> dict:
    """Share of routed-expert reads served from a compute device, and bytes per token (decode,
    batch 1) that cross PCIe or come from disk, from the held-out (or assumed) routing."""
    rc = layout.rc
    k, E = routing.top_k, routing.num_experts
    reads = on = 0.0
    pcie_w = disk = act = 0.0
    for L in routing.moe_layers:
        counts = routing.eval_counts[L].astype(np.float64)
        compute = np.array([d in hw.compute for d in grid[L]])
        on_disk = np.array([d == DISK for d in grid[L]])
        reads += counts.sum()
        on += counts[compute].sum()
        frac = counts / max(routing.eval_tokens, 1)  # share of tokens that read each expert
        b = layout.expert_bytes[L][prec]
        if hw.gpus:
            pcie_w += float((frac * b)[~compute].sum())
        disk += float((frac * b)[on_disk].sum())
        if hw.gpus:
            if routing.eval_ids is not None:
                ids_t = routing.eval_ids[L]
                off = ~compute
                if not off.any() or ids_t.shape[1] == 0:
                    p_any = 0.0
                elif off.all():
                    p_any = 1.0
                else:
                    hit = np.take(off, ids_t[0])
                    for j in range(1, ids_t.shape[0]):
                        hit |= np.take(off, ids_t[j])
                    p_any = float(hit.mean())
            else:
                g = int(compute.sum())
                p_any = 1.0 - (math.comb(g, k) / math.comb(E, k) if g >= k else 0.0)
            act += p_any * 2 * rc.hidden_size * ACT_BYTES
    return {
        "routed_reads_on_gpu": on / reads if reads else 0.0,
        "per_token": {"pcie_weights": int(round(pcie_w)), "pcie_activations": int(round(act)),
                      "disk": int(round(disk))},
    }


def _why(layout: Layout, prec: str, hw: Hardware, out: dict, offloaded_units, what: str) -> str:
    from moetool.units import human_bytes as hb

    where = f"{hw.gpus} x {hb(hw.gpu_memory)} GPU" + ("s" if hw.gpus > 1 else "") if hw.gpus else "CPU RAM"
    cap = (hw.gpu_memory - hw.reserve) * hw.gpus if hw.gpus else hw.cpu_memory
    resident = sum(u.bytes[prec] for u in layout.units if u.kind != "experts")
    weights = layout.total[prec]
    need = weights + layout.kv_bytes
    cap_txt = f"the {hb(cap)} of {where}" if cap is not None else f"{where} (no limit given)"
    if offloaded_units:
        return (f"does not fit: the part every token needs ({hb(resident)} of weights + {hb(layout.kv_bytes)} "
                f"KV cache) is more than {cap_txt}; {len(offloaded_units)} of those modules are offloaded")
    if out["fits"]:
        return f"fits: {hb(weights)} of weights + {hb(layout.kv_bytes)} KV cache = {hb(need)} in {cap_txt}"
    free0 = out["devices"][0]["free"] if hw.gpus else None
    if out.get("staging_bytes") and free0 is not None and free0 < out["staging_bytes"]:
        return f"does not fit: GPU 0 has no room to stage an offloaded module of {hb(out['staging_bytes'])}"
    parts = []
    if out["cpu_bytes"] and hw.gpus:
        parts.append(f"{hb(out['cpu_bytes'])} in CPU RAM")
    if out["disk_bytes"]:
        parts.append(f"{hb(out['disk_bytes'])} on disk")
    return (f"does not fit: {hb(weights)} of weights + {hb(layout.kv_bytes)} KV cache = {hb(need)} for {cap_txt}; "
            f"{what} offloaded: " + ", ".join(parts))


# -- the device map file -----------------------------------------------------------------------------------
def _skeleton(config: dict, family):
    """The model's module tree on the meta device (no weights, no remote code)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model_type = family.transformers_model_type
    if model_type not in CONFIG_MAPPING:
        raise MoetoolError(f"transformers has no '{model_type}' model: cannot write a device map for it")
    kw = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config", "auto_map")}
    from moetool.runtime.hf_compat import register_causal_lm

    register_causal_lm(model_type)
    try:
        cfg = CONFIG_MAPPING[model_type](**kw)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except (ValueError, TypeError, KeyError, ImportError) as exc:
        raise MoetoolError(f"cannot build the {model_type} module tree for a device map ({exc})") from None


def device_map_from_units(skeleton, rc, where: dict) -> dict:
    """A flat module -> device map (no overlapping keys) placing every parameter and buffer of
    SKELETON as WHERE places the planner's units: minimal keys (a module whose tensors all go to
    one device is one key)."""
    modules = dict(skeleton.named_modules())
    experts_path = {}
    for L in rc.moe_layers:
        for layout in rc.family.runtime_layouts:
            path = f"{layout['block'].replace('{L}', str(L))}.{layout['experts']}"
            if path in modules:
                experts_path[L] = path
                break
        else:
            raise MoetoolError(f"cannot find the experts module of MoE layer {L} in the transformers model")
    model_units = sorted((n for n, d in where.items() if not n.startswith("model.layers.")), key=len, reverse=True)
    main = where.get("model.embed_tokens", next(iter(where.values())))

    def device_of(name: str):
        if name.startswith("model.layers."):
            L = int(name.split(".")[2])
            ep = experts_path.get(L)
            if ep and (name == ep or name.startswith(ep + ".")):
                return where[f"model.layers.{L} experts"]
            return where[f"model.layers.{L}"]
        for unit in model_units:
            if name == unit or name.startswith(unit + "."):
                return where[unit]
        return main  # tied LM head, rotary buffers: with the embedding

    tensors = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)]
    tensors += [n for n, _ in skeleton.named_buffers(remove_duplicate=False)]
    placed = {n: device_of(n) for n in tensors}

    out: dict = {}

    def walk(prefix: str, module) -> None:
        inside = [d for n, d in placed.items() if prefix == "" or n.startswith(prefix + ".")]
        if prefix and len(set(map(str, inside))) == 1:
            out[prefix] = inside[0]
            return
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        for name in own:
            full = f"{prefix}.{name}" if prefix else name
            out[full] = placed[full]
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if any(n.startswith(full + ".") for n in placed):
                walk(full, child)

    walk("", skeleton)
    return out


def write_json(path: str | os.PathLike, data) -> None:
    path = Path(path)
    if not path.parent.exists():
        raise MoetoolError(f"{path}: directory {path.parent} does not exist")
    from moetool.checkpoint.outdir import tmp_file_beside

    tmp = tmp_file_beside(path)
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- expert parallelism ------------------------------------------------------------------------------------
def plan_ep(routing: Routing, layout: Layout, prec: str, devices: int, nodes: int, redundant: int,
            dispatch_dtype: str = "bf16") -> tuple[dict, dict]:
    """Simulate the three EP strategies; returns (report, placements)."""
    from moetool.analysis import plan_ep as ep

    rc = layout.rc
    E = routing.num_experts
    ep.check_ep(E, devices, nodes, redundant)
    if dispatch_dtype not in ep.DTYPE_BYTES:
        raise MoetoolError(f"--dispatch-dtype: choose from {', '.join(ep.DTYPE_BYTES)}")
    layers = routing.moe_layers
    fit = np.stack([routing.fit[L] for L in layers]).astype(np.float64)
    places, hierarchical = ep.placements(fit, devices, nodes, redundant, int(rc.fields.get("n_group") or 1))
    H = int(rc.hidden_size)
    db = ep.DTYPE_BYTES[dispatch_dtype]
    strategies = {}
    loads_for_plot = {}
    for name, pl in places.items():
        held_loads = ep.layer_loads(pl, [routing.eval_counts[L] for L in layers], devices)
        fit_loads = ep.layer_loads(pl, [routing.fit[L] for L in layers], devices)
        held = ep.all_to_all(pl, [routing.eval_ids[L] for L in layers], devices, nodes)
        imb = ep.imbalance(held_loads)
        imb_fit = ep.imbalance(fit_loads)
        worst = int(np.nanargmax(imb)) if np.isfinite(imb).any() else 0
        remote = held["copies"] * (1 - 1 / devices)
        cross = held["node_copies"] * (1 - 1 / nodes) if nodes > 1 else np.zeros_like(remote)
        slots = pl.slots_per_device(devices)
        mem = np.zeros(devices, dtype=np.int64)
        for x, L in enumerate(layers):
            per_expert = layout.expert_bytes[L][prec]
            mem += np.bincount(pl.phys_device[x], weights=per_expert[pl.phys2log[x]],
                               minlength=devices).astype(np.int64)
        strategies[name] = {
            "imbalance": _r(np.nanmean(imb)),
            "imbalance_fit": _r(np.nanmean(imb_fit)),
            "imbalance_worst_layer": {"layer": int(layers[worst]), "value": _r(imb[worst])},
            "devices_per_token_layer": _r(float(held["copies"].mean())),
            "dispatch_bytes_per_token": int(round(float(remote.sum()) * H * db)),
            "combine_bytes_per_token": int(round(float(remote.sum()) * H * 2)),
            "cross_node_dispatch_bytes_per_token": int(round(float(cross.sum()) * H * db)),
            "cross_node_share": _r(float(cross.sum() / remote.sum())) if remote.sum() else 0.0,
            "experts_per_device": int(slots.max()),
            "expert_bytes_per_device_max": int(mem.max()),
            "expert_bytes_per_device": [int(v) for v in mem],
            "per_layer": [{"layer": int(L), "imbalance": _r(imb[x]), "device_load": [int(v) for v in held_loads[x]]}
                          for x, L in enumerate(layers)],
        }
        loads_for_plot[name] = held_loads
    report = {
        "devices": devices,
        "nodes": nodes,
        "devices_per_node": devices // nodes,
        "redundant": redundant,
        "physical_experts": E + redundant,
        "hierarchical": bool(hierarchical and nodes > 1),
        "groups": int(rc.fields.get("n_group") or 1),
        "dispatch_dtype": dispatch_dtype,
        "precision": prec,
        "split": routing.split,
        "strategies": strategies,
    }
    return report, {"placements": places, "loads": loads_for_plot}


def _r(x, nd: int = 4):
    x = float(x)
    return None if not math.isfinite(x) else round(x, nd)


def ep_map(report: dict, places: dict, layers: list[int], model: str) -> dict:
    """The physical-to-logical expert map of every strategy (EPLB / vLLM layout): physical slot
    p of layer L holds logical expert ``physical_to_logical[L][p]`` and lives on device
    ``device_of_physical[L][p]``."""
    out = {"format": "moetool-ep-map", "version": 1, "model": model, "moe_layers": layers,
           "devices": report["devices"], "nodes": report["nodes"], "redundant": report["redundant"],
           "hierarchical": report["hierarchical"], "strategies": {}}
    for name, pl in places.items():
        out["strategies"][name] = {
            "physical_experts": int(pl.phys2log.shape[1]),
            "physical_to_logical": pl.phys2log.tolist(),
            "device_of_physical": pl.phys_device.tolist(),
            "logical_replica_count": pl.logcnt.tolist(),
            "logical_to_physical": pl.log2phys.tolist(),
        }
    return out


# -- the one entry point -----------------------------------------------------------------------------------
@dataclass
class Plan:
    report: dict  # plain data: what --json prints
    figures: dict  # numpy arrays for --plot


def plan(model: str, gpu_memory=None, gpus: int = 1, cpu_memory=None, reserve=0, context: int = 4096,
         batch: int = 1, precision: str = "bf16", trace=None, holdout: float = 0.2, seed: int = 0,
         ep: int | None = None, nodes: int = 1, redundant: int = 0, dispatch_dtype: str = "bf16",
         capacity_factors=(), device_map_out=None, ep_map_out=None, accept_foreign_trace: bool = False) -> Plan:
    """Plan MODEL (preset, config.json, checkpoint dir, cached Hub id) on the given hardware.
    TRACE is a path or a moetool.analysis.trace.Trace."""
    from moetool.analysis.count import kv_cache_per_token
    from moetool.analysis.params import count_params
    from moetool.checkpoint.checks import check_if_checkpoint
    from moetool.checkpoint.source import resolve
    from moetool.families.resolve import resolve_family

    hw = _check_plan_options(precision, gpus, gpu_memory, cpu_memory, reserve, context, batch, trace, ep,
                             capacity_factors, ep_map_out, device_map_out, holdout)
    source = resolve(model)
    rc = resolve_family(source)
    check_if_checkpoint(model, source, rc)
    if ep is not None:
        from moetool.analysis.plan_ep import check_ep

        check_ep(int(rc.num_experts), ep, nodes, redundant)
    tr = _load_trace(model, trace, rc, source, accept_foreign_trace) if trace is not None else None
    routing = routing_from_trace(tr, holdout, seed) if tr is not None else uniform_routing(rc)
    layout = model_layout(rc, context, batch)
    counted = count_params(model)

    per_prec, grids, wheres = {}, {}, {}
    for p in PRECISIONS:
        ideal = place_per_expert(layout, routing, p, hw)
        mod = place_modules(layout, routing, p, hw)
        grids[p], wheres[p] = ideal.pop("_grid"), mod.pop("_where")
        per_prec[p] = {**ideal, "weight_bytes": layout.total[p], "device_map": mod}
    top = per_prec[precision]
    report: dict[str, Any] = {
        "model": source.name,
        "family": rc.family.name,
        "precision": precision,
        "fits": top["fits"],
        "gpu_bytes": top["gpu_bytes"],
        "cpu_bytes": top["cpu_bytes"],
        "disk_bytes": top["disk_bytes"],
        "weight_bytes": layout.total[precision],
        "kv_cache_bytes": layout.kv_bytes,
        "why": top["why"],
        "routed_reads_on_gpu": top["routed_reads_on_gpu"],
        "per_token": top["per_token"],
        "hardware": {**hw.describe(), "context": context, "batch": batch},
        "routing": {"source": routing.source, **({"trace": str(trace) if not hasattr(trace, "meta") else "in-memory",
                                                  "tokens": tr.tokens} if tr is not None else {}),
                    "judged_on": routing.split},
        "params_memory": counted["memory"],
        "kv_cache_bytes_per_token": kv_cache_per_token(rc),
        "granularity": {
            "placement": "per expert (engines that place single experts: llama.cpp -ot, ktransformers, vLLM EP)",
            "device_map": "per module: all experts of a MoE layer are one transformers module (mlp.experts)",
        },
        "precisions": per_prec,
    }
    figures: dict[str, Any] = {"grid": grids[precision], "moe_layers": routing.moe_layers,
                               "fit": {L: routing.fit[L] for L in routing.moe_layers}, "routing": routing.source}
    if device_map_out:
        dmap = device_map_from_units(_skeleton(source.config, rc.family), rc, wheres[precision])
        write_json(device_map_out, dmap)
        report["device_map_file"] = str(device_map_out)
        report["precisions"][precision]["device_map"]["entries"] = len(dmap)
    if tr is not None and capacity_factors:
        from moetool.analysis.plan_ep import capacity_drops

        report["dropped_fraction"] = capacity_drops(tr.experts, tr.sequence, tr.num_experts, tr.top_k,
                                                    list(capacity_factors), seq_counts=routing.seq_counts,
                                                    zero=tr.zero_experts)
    if ep is not None:
        _add_ep(report, figures, routing, layout, precision, ep, nodes, redundant, dispatch_dtype, ep_map_out,
                source.name)
    return Plan(report, figures)


def _check_plan_options(precision, gpus, gpu_memory, cpu_memory, reserve, context, batch, trace, ep,
                        capacity_factors, ep_map_out, device_map_out, holdout) -> Hardware:
    """Every option check that needs no model; returns the hardware described."""
    from moetool.analysis.plan_ep import parse_factor
    from moetool.units import parse_size

    if precision not in PRECISIONS:
        raise MoetoolError(f"--precision: choose from {', '.join(PRECISIONS)}")
    if gpus < 0:
        raise MoetoolError("--gpus must be 0 or more")
    if gpus and gpu_memory is None:
        raise MoetoolError("give --gpu-memory (e.g. 24GiB), or --gpus 0 to plan for CPU RAM and disk only")
    gpu_b = parse_size(gpu_memory, "--gpu-memory") if gpus else None
    cpu_b = parse_size(cpu_memory, "--cpu-memory") if cpu_memory is not None else None
    reserve_b = parse_size(reserve, "--reserve") if reserve else 0
    if gpus and gpu_b <= reserve_b:
        raise MoetoolError("--gpu-memory must be more than --reserve")
    if context < 0 or batch < 1:
        raise MoetoolError("--context must be 0 or more and --batch at least 1")
    if ep is not None and trace is None:
        raise MoetoolError("--ep simulates expert parallelism from measured routing: give --trace FILE")
    if capacity_factors and trace is None:
        raise MoetoolError("--capacity-factor counts dropped tokens in measured routing: give --trace FILE")
    if ep_map_out and ep is None:
        raise MoetoolError("--ep-map-out needs --ep N")
    for flag, out in (("--device-map-out", device_map_out), ("--ep-map-out", ep_map_out)):
        if out and not Path(out).expanduser().parent.exists():
            raise MoetoolError(f"{flag} {out}: directory {Path(out).parent} does not exist")
    if not 0 <= holdout < 1:
        raise MoetoolError(f"--holdout {holdout}: give a share between 0 and 1 (e.g. 0.2)")
    for c in capacity_factors:
        parse_factor(c)
    return Hardware(gpus, gpu_b, cpu_b, reserve_b)


def _load_trace(model: str, trace, rc, source, accept_foreign_trace: bool):
    """TRACE (a path or a Trace) checked against the model: shapes, fingerprint, tokens."""
    from moetool.analysis.trace import Trace, check_trace_matches

    tr = trace if isinstance(trace, Trace) else Trace.load(trace)
    try:
        check_trace_matches(tr, rc)
    except MoetoolError as exc:
        raise MoetoolError(f"{model}: {exc}") from None
    if not isinstance(trace, Trace):
        from moetool.checkpoint.fingerprint import check_trace_of_model

        check_trace_of_model(tr, trace, model, rc, source.path if source.kind == "checkpoint" else None,
                             accept=accept_foreign_trace)
    if tr.tokens == 0:
        raise MoetoolError(f"{trace}: the trace has no tokens")
    return tr


def _add_ep(report: dict, figures: dict, routing, layout, precision, ep, nodes, redundant, dispatch_dtype,
            ep_map_out, name: str) -> None:
    """The expert-parallel simulation into REPORT and FIGURES (and --ep-map-out written)."""
    ep_report, ep_data = plan_ep(routing, layout, precision, ep, nodes, redundant, dispatch_dtype)
    report["ep"] = ep_report
    report["imbalance"] = {n: s["imbalance"] for n, s in ep_report["strategies"].items()}
    figures["ep"] = ep_data["loads"]
    if ep_map_out:
        write_json(ep_map_out, ep_map(ep_report, ep_data["placements"], routing.moe_layers, name))
        report["ep_map_file"] = str(ep_map_out)
