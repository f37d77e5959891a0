"""The dense student of a MoE teacher: its config, and its weights before training.

The student is the teacher's *dense sibling*, a model transformers runs without moetool
(Mixtral -> Mistral, Qwen2-MoE -> Qwen2, Qwen3-MoE -> Qwen3, DeepSeek-V2/V3 -> the same
architecture with every layer dense). What the sibling is, which config keys to drop or set,
and where the student's MLP tensors live is data: the ``dense_sibling`` entry of each family
JSON (``model_type``, ``architectures``, ``config_drop``, ``config_set``, ``mlp``,
``shared_gate``, ``zeros_if_missing``, or ``unsupported`` with the reason).

Everything but the MLPs (embeddings, attention, norms, LM head) is copied from the teacher by
tensor name. Each MoE layer's MLP becomes one dense SwiGLU MLP of ``width`` neurons (a neuron
= one gate row, one up row, one down column), filled in this order:

1. the shared experts' neurons as they are (Qwen2-MoE's sigmoid-gated shared expert with its
   down columns scaled by the mean gate value on the calibration tokens);
2. routed-expert neurons, by ``method``:
   - ``topk``: the neurons of the most used experts (by selection frequency), each expert's
     down columns scaled by its mean routing weight when selected, renormalised so that the
     included experts' scales add up to the teacher's mean routed weight per token (for a
     top-k student of k experts that renormalisation is close to 1);
   - ``merge``: the experts dealt by usage rank into ``ceil(routed width / expert width)``
     groups (group g gets the g-th, (g+G)-th, ... most used expert, so every group is led by
     one of the most used experts); each group is one expert-wide MLP whose gate/up/down
     weights are the usage-weighted average of its members after each member's hidden neurons
     are permuted to line up with the group's most used expert (greedy maximum cosine
     similarity of [gate row, up row, down column], ``moetool.compression.merge.greedy_match``: experts
     trained apart number their neurons arbitrarily, and averaging unaligned neurons mostly
     cancels them), its down columns scaled by the group's share of the routed weight per
     token (sum over members of frequency x mean weight), so all groups add up to the
     teacher's mean routed weight per token;
   - ``random``: the student's own random initialisation for the whole MLP of a MoE layer
     (the baseline the other two are measured against);
3. when there are not enough neurons, padding neurons with random gate/up rows and zero
   down columns: they add nothing to the output until training moves them.

When the width is too small for a group of neurons (the last expert, a shared expert wider
than the student), the neurons with the largest ``|down column| x |up row|`` are kept.
Layers that are dense in the teacher (DeepSeek's ``first_k_dense_replace``, Qwen's
``mlp_only_layers``) keep their MLP: copied as is when the widths match, padded with
zero-output neurons when the student is wider (exact), or cut to the student width by the
same magnitude rule when it is narrower (lossy; reported per layer).
"""

from __future__ import annotations

import re

import math
from dataclasses import dataclass

import numpy as np

from moetool.errors import MoetoolError
from moetool.families.expr import evaluate

INIT_METHODS = ("merge", "topk", "random")
# transformers 5 keeps a MoE layer's experts fused in memory: gate_up_proj [E, 2I, H] (gate rows
# first, then up) and down_proj [E, H, I]; shared experts and dense MLPs are gate/up/down Linear
# modules. A family whose layout differs overrides these in dense_sibling.teacher_experts /
# dense_sibling.teacher_shared_mlp.
_FUSED = {"gate_up": "gate_up_proj", "down": "down_proj"}
_SHARED = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_DROP_ALWAYS = ("transformers_version", "auto_map", "quantization_config", "architectures", "model_type",
                "_name_or_path")


# -- the sibling and its config -------------------------------------------------------------------
def _has_sibling(spec: dict) -> bool:
    return bool(spec.get("model_type") and spec.get("mlp") and not spec.get("unsupported"))


def distillable_families() -> list[str]:
    """The families whose spec describes a dense sibling in transformers (what distill can make)."""
    from moetool.families import all_families

    return sorted(name for name, fam in all_families().items() if _has_sibling(fam.spec.get("dense_sibling") or {}))


def sibling_spec(family) -> dict:
    """The family's ``dense_sibling`` entry, or a one-line MoetoolError saying why there is none
    and which families can be distilled."""
    spec = family.spec.get("dense_sibling") or {}
    if _has_sibling(spec):
        return spec
    why = spec.get("unsupported") or "its family spec names no dense sibling"
    raise MoetoolError(f"cannot distill {family.name} into a dense model: {why}; "
                       f"families that can be distilled: {', '.join(distillable_families())}")


def default_width(rc) -> int:
    """The teacher's activated FFN width per token: top_k x expert width + shared experts."""
    return int(rc.top_k) * int(rc.expert_intermediate) + int(rc.shared_intermediate or 0)


def student_config(teacher_config: dict, rc, width: int) -> dict:
    """The student's config.json content: the teacher's, renamed by the family's dense_sibling."""
    spec = sibling_spec(rc.family)
    if width < 1:
        raise MoetoolError(f"--intermediate-size must be at least 1 (got {width})")
    names = {**rc.names, "student_intermediate": int(width)}
    cfg = {k: v for k, v in teacher_config.items() if k not in _DROP_ALWAYS}
    for key in _with_fallbacks(rc.family, spec.get("config_drop", [])):
        cfg.pop(key, None)
    for key, expr in spec.get("config_set", {}).items():
        cfg[key] = evaluate(expr, names)
    cfg["model_type"] = spec["model_type"]
    cfg["architectures"] = list(spec["architectures"])
    return cfg


def _with_fallbacks(family, keys: list[str]) -> list[str]:
    """KEYS and every key they fall back to through the family's defaults (Qwen3-MoE's
    ``num_experts`` defaults to ``num_local_experts``: dropping one drops both)."""
    defaults = family.spec.get("defaults", {})
    out = list(keys)
    for key in out:  # grows while iterating: follows chains
        fallback = defaults.get(key)
        if isinstance(fallback, str) and fallback.isidentifier() and fallback not in out:
            out.append(fallback)
    return out


def build_student(cfg: dict, seed: int, dtype=None):
    """A randomly initialised student (seeded: every process builds the same one)."""
    import torch
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    if cfg["model_type"] not in CONFIG_MAPPING:
        raise MoetoolError(f"this transformers has no '{cfg['model_type']}' model for the student")
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict({k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model


# -- routing usage --------------------------------------------------------------------------------------
@dataclass
class LayerUsage:
    freq: np.ndarray  # [E] share of tokens that select each expert (adds up to top_k)
    mean_weight: np.ndarray  # [E] mean routing weight when selected (0 if never)
    mass: float  # mean total routing weight per token (1 for normalised top-k; 2.5 for DeepSeek-V3's scaling)
    tokens: int
    shared_gate: float | None = None  # mean sigmoid of Qwen2-MoE's shared-expert gate

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "mass": round(float(self.mass), 6),
                "freq": [round(float(x), 6) for x in self.freq],
                "mean_weight": [round(float(x), 6) for x in self.mean_weight],
                "shared_gate": None if self.shared_gate is None else round(float(self.shared_gate), 6)}


def usage_from_trace(trace, rc) -> dict[int, LayerUsage]:
    """Selection frequency and mean weight of every expert of every MoE layer of TRACE."""
    from moetool.analysis.trace import check_trace_matches

    check_trace_matches(trace, rc)
    if trace.tokens == 0:
        raise MoetoolError("the trace has no tokens")
    E = int(rc.num_experts)
    out = {}
    for L in rc.moe_layers:
        ids = np.asarray(trace.experts[L]).astype(np.int64)
        w = np.asarray(trace.weights[L]).astype(np.float64)
        counts = np.bincount(ids.ravel(), minlength=E).astype(np.float64)
        wsum = np.bincount(ids.ravel(), weights=w.ravel(), minlength=E)
        T = ids.shape[0]
        out[L] = LayerUsage(freq=counts / T, mean_weight=np.divide(wsum, counts, out=np.zeros(E), where=counts > 0),
                            mass=float(w.sum(axis=1).mean()), tokens=int(T))
    return out


def _shared_gate_module(loaded, block):
    name = sibling_spec(loaded.family).get("shared_gate")
    if not name:
        return None
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def calibrate(loaded, sequences: list[list[int]], batch_size: int = 8, trace=None) -> dict[int, LayerUsage]:
    """Routing usage of LOADED on token SEQUENCES (moetool's tracer), or from TRACE if given.
    The mean of a sigmoid shared-expert gate (Qwen2-MoE) is always measured on SEQUENCES."""
    from moetool.runtime.executor import Executor
    from moetool.runtime.loading import moe_blocks
    from moetool.runtime.observers import SharedGateMeans
    from moetool.analysis.trace import record_token_ids

    gates = {}
    for L, block, _router, _experts in moe_blocks(loaded):
        g = _shared_gate_module(loaded, block)
        if g is not None:
            gates[L] = g
    gate_obs = SharedGateMeans(gates)
    if trace is None:
        recorded = record_token_ids(loaded, sequences, batch_size=batch_size, observers=[gate_obs] if gates else ())
        usage = usage_from_trace(recorded, loaded.rc)
    else:
        usage = usage_from_trace(trace, loaded.rc)
        if gates:  # the blocks are whole --seq-len windows: no padding, so no attention mask (as training)
            Executor(loaded, batch_size=batch_size, order="input", full_mask=False,
                     description="measuring shared-expert gates").run(sequences, [gate_obs])
    for L, mean in gate_obs.means().items():
        usage[L].shared_gate = mean
    return usage


# -- weights ---------------------------------------------------------------------------------------------
def _importance(gate, up, down):
    """Neuron magnitude proxy: |down column| x |up row| (SiLU(gate) is bounded below, not above)."""
    return down.norm(dim=0) * up.norm(dim=1)


def _neuron_features(gate, up, down):
    """One unit vector per hidden neuron: its gate row, up row and down column."""
    import torch

    f = torch.cat([gate, up, down.T], dim=1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _keep(gate, up, down, n: int):
    """The n most important neurons, in their original order."""
    import torch

    if n >= gate.shape[0]:
        return gate, up, down
    idx = torch.topk(_importance(gate, up, down), n).indices.sort().values
    return gate[idx], up[idx], down[:, idx]


def _float(t):
    import torch

    if not t.dtype.is_floating_point:
        raise MoetoolError("the teacher's MLP weights are quantized; load the teacher without 4-bit/8-bit to distill")
    if t.device.type == "meta":
        raise MoetoolError("the teacher's MLP weights are offloaded (meta); load it fully (no --max-memory) to distill")
    return t.detach().to(device="cpu", dtype=torch.float32)


def _routed_neurons(gu, down, usage: LayerUsage, room: int, method: str):
    """Routed-expert neurons for `room` slots (or fewer): lists of (gate, up, down) pieces and a note."""
    import torch

    E, two_i, _H = gu.shape
    inter = two_i // 2
    freq = torch.tensor(usage.freq, dtype=torch.float64)
    mw = torch.tensor(usage.mean_weight, dtype=torch.float64)
    # most used first; ties broken by mean weight, then expert index (stable)
    order = sorted(range(E), key=lambda e: (-float(freq[e]), -float(mw[e]), e))
    pieces = []
    if method == "topk":
        used = [e for e in order if freq[e] > 0]
        n_full = min(room // inter, len(used))
        chosen = [(e, inter) for e in used[:n_full]]
        if n_full < len(used) and room - n_full * inter > 0:
            chosen.append((used[n_full], room - n_full * inter))
        denom = sum(float(mw[e]) * n / inter for e, n in chosen)
        norm = usage.mass / denom if denom > 0 else 1.0
        for e, n in chosen:
            g, u, d = gu[e, :inter], gu[e, inter:], down[e]
            g, u, d = _keep(g, u, d, n)
            pieces.append((g, u, d * float(mw[e] * norm)))
        note = "experts " + ", ".join(f"{e}" + ("" if n == inter else f" ({n} of {inter} neurons)") for e, n in chosen)
        return pieces, note
    if method == "merge":
        from moetool.compression.merge import greedy_match

        groups_n = min(math.ceil(room / inter), E)
        groups = [order[g::groups_n] for g in range(groups_n)]
        left = room
        notes = []
        for members in groups:
            if left <= 0:
                break
            f = freq[members]
            a = (f / f.sum() if float(f.sum()) > 0 else torch.full_like(f, 1.0 / len(members))).tolist()
            anchor = members[0]  # the group's most used expert
            ref = _neuron_features(gu[anchor, :inter], gu[anchor, inter:], down[anchor])
            g = torch.zeros_like(gu[anchor, :inter])
            u = torch.zeros_like(g)
            d = torch.zeros_like(down[anchor])
            for e, w in zip(members, a):
                ge, ue, de = gu[e, :inter], gu[e, inter:], down[e]
                if e != anchor and w > 0:  # line neuron i of every member up with neuron i of the anchor
                    perm = greedy_match(ref @ _neuron_features(ge, ue, de).T)
                    ge, ue, de = ge[perm], ue[perm], de[:, perm]
                g += w * ge
                u += w * ue
                d += w * de
            mass = float((freq[members] * mw[members]).sum())
            n = min(inter, left)
            g, u, d = _keep(g, u, d, n)
            pieces.append((g, u, d * mass))
            left -= n
            notes.append("+".join(str(e) for e in members))
        return pieces, "merged groups " + ", ".join(notes)
    raise MoetoolError(f"unknown --init '{method}' (choose from {', '.join(INIT_METHODS)})")


def _assemble(pieces, student_gate, student_up, student_down):
    """Write pieces into the student's (already randomly initialised) MLP; the rest becomes
    zero-output padding. Returns the number of neurons taken from the teacher."""
    import torch

    width = student_gate.shape[0]
    at = 0
    with torch.no_grad():
        for g, u, d in pieces:
            n = min(g.shape[0], width - at)
            if n <= 0:
                break
            student_gate[at:at + n].copy_(g[:n])
            student_up[at:at + n].copy_(u[:n])
            student_down[:, at:at + n].copy_(d[:, :n])
            at += n
        student_down[:, at:].zero_()
    return at


def init_student(loaded, student, usage: dict[int, LayerUsage] | None, method: str) -> list[dict]:
    """Copy the teacher's non-MLP tensors into STUDENT by name and initialise every MLP.
    Returns one row per layer describing where its MLP came from."""

    from moetool.runtime.loading import moe_blocks
    from moetool.runtime.streaming import decoder_layers, layer_in_memory

    if method not in INIT_METHODS:
        raise MoetoolError(f"unknown --init '{method}' (choose from {', '.join(INIT_METHODS)})")
    fam, rc = loaded.family, loaded.rc
    spec = sibling_spec(fam)
    fused = {**_FUSED, **spec.get("teacher_experts", {})}
    shared_names = {**_SHARED, **spec.get("teacher_shared_mlp", {})}
    student_sd = student.state_dict()
    mlp_names = set()
    for L in range(rc.num_layers):
        mlp_names.update(spec["mlp"][p].replace("{L}", str(L)) for p in ("gate", "up", "down"))
    zeros_ok = {t.replace("{L}", str(L)) for t in spec.get("zeros_if_missing", []) for L in range(rc.num_layers)}
    by_layer: dict[int | None, list[str]] = {}
    for name in student_sd:
        if name not in mlp_names:
            m = _LAYER_RX.search(name)
            by_layer.setdefault(int(m.group(1)) if m else None, []).append(name)

    # 1. everything outside the decoder layers (embeddings, final norm, head), by name; a tied-
    # embedding student shares the head with the embedding: nothing else to do
    _copy_by_name(loaded.model.state_dict(), student_sd, by_layer.get(None, []), zeros_ok, spec)
    params = dict(student.named_parameters())
    blocks = {L: (block, experts) for L, block, _router, experts in moe_blocks(loaded)} if rc.moe_layers else {}
    prefix, layers = decoder_layers(loaded.model, rc)
    rows = []
    for L in range(rc.num_layers):
        with layer_in_memory(loaded, L):  # a streamed teacher: this layer read from disk, freed after
            teacher_sd = layers[L].state_dict(prefix=f"{prefix}.{L}.")  # this layer's tensors, full names
            _copy_by_name(teacher_sd, student_sd, by_layer.get(L, []), zeros_ok, spec)  # 2. attention, norms
            rows.append(_init_mlp(L, loaded, fam, spec, params, teacher_sd, blocks, usage, method, fused, shared_names))
    return rows


_LAYER_RX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _copy_by_name(teacher_sd: dict, student_sd: dict, names: list[str], zeros_ok: set[str], spec: dict) -> None:
    import torch

    with torch.no_grad():
        for name in names:
            dst = student_sd[name]
            src = teacher_sd.get(name)
            if src is None:
                if name in zeros_ok:
                    dst.zero_()
                    continue
                raise MoetoolError(f"the teacher has no tensor '{name}' for the {spec['model_type']} student")
            if tuple(src.shape) != tuple(dst.shape):
                raise MoetoolError(f"'{name}' is {list(src.shape)} in the teacher, {list(dst.shape)} in the student")
            dst.copy_(_float(src).to(dst.dtype))


def _init_mlp(L: int, loaded, fam, spec, params, teacher_sd, blocks, usage, method, fused, shared_names) -> dict:
    """3. Layer L's dense MLP: the teacher's own where the layer is dense, else built from its
    shared and routed experts by METHOD. Returns the layer's row."""
    sg, su, sd = (params[spec["mlp"][p].replace("{L}", str(L))] for p in ("gate", "up", "down"))
    width = sg.shape[0]
    if L not in blocks:  # dense in the teacher: keep its MLP
        tg, tu, td = (teacher_sd.get(spec["mlp"][p].replace("{L}", str(L))) for p in ("gate", "up", "down"))
        if tg is None or tu is None or td is None:
            raise MoetoolError(f"layer {L} is dense in the teacher but its MLP is not at {spec['mlp']['gate']}")
        tg, tu, td = _float(tg), _float(tu), _float(td)
        tw = tg.shape[0]
        taken = _assemble([_keep(tg, tu, td, width)], sg, su, sd)
        how = "copied" if tw == width else (f"copied, padded {tw} -> {width}" if tw < width
                                               else f"cut {tw} -> {width} (largest neurons)")
        return {"layer": L, "kind": "dense", "from": f"teacher dense MLP, {how}", "teacher_neurons": taken,
                "exact": tw <= width}
    if method == "random":
        return {"layer": L, "kind": "moe", "from": "random", "teacher_neurons": 0, "exact": False}
    block, experts = blocks[L]
    u = usage[L]
    pieces, notes = [], []
    shared_mod = None
    for layout in fam.runtime_layouts:
        if layout.get("shared"):
            try:
                shared_mod = block.get_submodule(layout["shared"])
                break
            except AttributeError:
                continue
    if shared_mod is not None:
        g = _float(shared_mod.get_submodule(shared_names["gate"]).weight)
        up = _float(shared_mod.get_submodule(shared_names["up"]).weight)
        d = _float(shared_mod.get_submodule(shared_names["down"]).weight)
        scale = 1.0 if u.shared_gate is None else float(u.shared_gate)
        g, up, d = _keep(g, up, d, width)
        pieces.append((g, up, d * scale))
        notes.append(f"shared ({g.shape[0]} neurons" + ("" if u.shared_gate is None else f", x{scale:.3f} gate") + ")")
    room = width - sum(p[0].shape[0] for p in pieces)
    if room > 0:
        gu = _float(getattr(experts, fused["gate_up"]))
        dn = _float(getattr(experts, fused["down"]))
        routed, note = _routed_neurons(gu, dn, u, room, method)
        pieces += routed
        notes.append(note)
    taken = _assemble(pieces, sg, su, sd)
    if taken < width:
        notes.append(f"{width - taken} zero-output padding neurons")
    return {"layer": L, "kind": "moe", "from": "; ".join(notes), "teacher_neurons": taken, "exact": False}
