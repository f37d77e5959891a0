"""Expert pruning: which experts to keep, from routing statistics, and the checkpoint surgery.

Statistics come from a routing trace (``moetool trace --out``) or from calibration text that
is traced here with the same loader and tracer as `moetool trace`. Per MoE layer and expert
(T traced tokens; token t chose expert e with routing weight w_te):

- ``frequency``: how many tokens chose e;
- ``weight``: the sum of w_te over the tokens that chose e;
- ``reap``: REAP (Cerebras, 2025): mean over the tokens that chose e of w_te * ||f_e(x_t)||,
  where f_e(x_t) is the expert's output for the token; it needs a forward pass (hooks on each
  layer's experts module run every expert on the tokens routed to it), so with only a
  ``--trace`` the trace's own texts are run again;
- ``random``: a seeded random choice (the baseline every method should beat).

Each layer keeps its ``keep`` best experts, in their original order, renumbered 0..N-1.
Group-limited routing (DeepSeek ``n_group``/``topk_group``) stays valid by keeping the same
number of experts in every group, so the pruned model's groups are the original groups minus
the dropped experts (see docs/prune.md); where that is impossible the command says why, and
``--regroup`` turns group-limited routing off instead (n_group = topk_group = 1).

``--global`` ranks every expert of every layer together by its share of its layer's total
score and keeps the best ``keep x layers`` of them. transformers configs hold one expert count
for all layers, so every layer then keeps as many experts as the layer the ranking favours
most (each layer's next-best experts fill the difference); the result reports both the counts
the ranking asked for and what was kept.
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moetool.errors import MoetoolError

METHODS = ("frequency", "weight", "reap", "random")
OUTPUT_SAMPLE_TOKENS = 256  # tokens per layer on which every expert runs (output similarity)


# -- statistics -------------------------------------------------------------------------------------------
@dataclass
class RoutingStats:
    """Per MoE layer and expert statistics of routing on some text."""

    num_experts: int
    top_k: int
    layers: list[int]
    tokens: int
    counts: dict[int, np.ndarray]  # [E] tokens that chose each expert
    weight: dict[int, np.ndarray]  # [E] summed routing weight
    reap: dict[int, np.ndarray] | None = None  # [E] mean w * ||f_e(x)|| over routed tokens (0 if never routed)
    logits: dict[int, np.ndarray] | None = None  # [T, E] router logits (router similarity)
    outputs: dict[int, np.ndarray] | None = None  # [E, S*H] each expert's output on the same S tokens
    source: dict = field(default_factory=dict)  # what the card records: trace or file, tokens

    def score(self, by: str, layer: int) -> np.ndarray:
        if by == "frequency":
            return self.counts[layer].astype(np.float64)
        if by == "weight":
            return self.weight[layer].astype(np.float64)
        if by == "reap":
            if self.reap is None:
                raise MoetoolError("internal: REAP scores were not computed")
            return self.reap[layer].astype(np.float64)
        raise MoetoolError(f"unknown --by {by}")


def stats_from_trace(trace) -> RoutingStats:
    E = trace.num_experts
    counts, weight = {}, {}
    for L in trace.moe_layers:
        ids = trace.experts[L].astype(np.int64).ravel()
        w = trace.weights[L].astype(np.float64).ravel()
        counts[L] = np.bincount(ids, minlength=E)[:E]
        weight[L] = np.bincount(ids, weights=w, minlength=E)[:E]
    logits = {L: trace.logits[L].astype(np.float32) for L in trace.logits} or None
    return RoutingStats(E, trace.top_k, list(trace.moe_layers), trace.tokens, counts, weight, logits=logits)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trace_source(path: str, trace) -> dict:
    return {"trace": str(path), "sha256": file_digest(path), "tokens": int(trace.tokens),
            "traced_model": trace.meta.get("model"), "texts": len(trace.texts)}


def load_trace_for(path: str, rc, model: str | None = None, checkpoint=None, accept_foreign: bool = False):
    """Load the trace at PATH and check it fits RC; with CHECKPOINT (a directory), that it was
    recorded on that model (moetool.checkpoint.fingerprint; ACCEPT_FOREIGN: --accept-foreign-trace)."""
    from moetool.analysis.trace import Trace, check_trace_matches

    trace = Trace.load(path)
    try:
        check_trace_matches(trace, rc)
    except MoetoolError as exc:
        raise MoetoolError(f"--trace {path}: {exc}") from None
    if checkpoint is not None:
        from moetool.checkpoint.fingerprint import check_trace_of_model

        check_trace_of_model(trace, path, model or str(checkpoint), rc, checkpoint, accept=accept_foreign)
    return trace


def _ExpertProbe(loaded, reap: bool, outputs: bool, sample_tokens: int = OUTPUT_SAMPLE_TOKENS):
    """The expert probe observer (moetool.runtime.observers.ExpertProbe): REAP sums and expert output samples."""
    from moetool.runtime.observers import ExpertProbe

    return ExpertProbe(loaded, reap=reap, outputs=outputs, sample_tokens=sample_tokens)


def calibrate(model: str, texts: list[str], max_tokens: int | None = None, batch_size: int = 8,
              load_options: dict | None = None, reap: bool = False, outputs: bool = False,
              logits: bool = False, source: dict | None = None, rc=None) -> RoutingStats:
    """Load MODEL, trace TEXTS and (optionally) measure REAP scores, every expert's outputs on
    sample tokens, and the router logits, in the same forward passes. The model is freed
    before returning."""
    from moetool.runtime.loading import load_model
    from moetool.analysis.trace import check_trace_matches, record_trace

    from moetool.runtime.progress import status

    with status(f"loading {model}"):
        loaded = load_model(model, **(load_options or {}))
    try:
        if rc is not None:
            check_trace_matches_rc(loaded.rc, rc)
        probe = _ExpertProbe(loaded, reap=reap, outputs=outputs)
        trace = record_trace(loaded, texts, max_tokens=max_tokens, batch_size=batch_size, logits=logits,
                             observers=[probe] if (reap or outputs) else ())
        check_trace_matches(trace, loaded.rc)
        stats = stats_from_trace(trace)
        if reap:
            stats.reap = probe.reap_scores()
        if outputs:
            stats.outputs = probe.output_features()
        stats.source = {**(source or {}), "tokens": int(trace.tokens), "texts": len(texts)}
        if max_tokens is not None:
            stats.source["max_tokens"] = int(max_tokens)
        return stats
    finally:
        del loaded
        gc.collect()


def check_trace_matches_rc(a, b) -> None:
    if a.num_experts != b.num_experts or list(a.moe_layers) != list(b.moe_layers):
        raise MoetoolError("the loaded model does not match the checkpoint's config")


def gather_stats(model: str, rc, trace: str | None, file: str | None, max_tokens: int | None, batch_size: int,
                 load_options: dict | None, reap: bool = False, outputs: bool = False, logits: bool = False,
                 what: str = "statistics", checkpoint=None, accept_foreign_trace: bool = False) -> RoutingStats | None:
    """Routing statistics from --trace or --file (see the module docstring); None when neither."""
    from moetool.analysis.trace import read_texts

    if trace and file:
        raise MoetoolError("give --trace FILE or --file TEXT, not both")
    if file:
        texts = read_texts((), file)
        return calibrate(model, texts, max_tokens, batch_size, load_options, reap=reap, outputs=outputs,
                         logits=logits, source={"file": str(file), "sha256": file_digest(file)}, rc=rc)
    if not trace:
        return None
    tr = load_trace_for(trace, rc, model, checkpoint, accept_foreign_trace)
    src = trace_source(trace, tr)
    need_run = reap or outputs or (logits and not tr.has_logits)
    if not need_run:
        stats = stats_from_trace(tr)
        stats.source = src
        return stats
    texts = [t for t in tr.texts if t and t.strip()]
    if not texts:
        raise MoetoolError(f"--trace {trace}: {what} need a forward pass and the trace has no texts to run; "
                           "give --file TEXT")
    opts = tr.meta.get("options") or {}
    mt = max_tokens if max_tokens is not None else opts.get("max_tokens")
    stats = calibrate(model, texts, mt, batch_size, load_options, reap=reap, outputs=outputs, logits=logits,
                      source={**src, "rerun": f"{what} need a forward pass: the trace's {len(texts)} texts were run again"},
                      rc=rc)
    stats.source["tokens"] = stats.source.get("tokens")
    return stats


# -- selection ---------------------------------------------------------------------------------------------------
def keep_count(num_experts: int, keep: int | None, ratio: float | None, what: str = "--keep") -> int:
    if (keep is None) == (ratio is None):
        raise MoetoolError("give exactly one of --keep N and --ratio R")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise MoetoolError(f"--ratio {ratio}: give the fraction of experts to remove, between 0 and 1")
        keep = num_experts - int(round(ratio * num_experts))
    if keep < 1:
        raise MoetoolError(f"{what} {keep}: keep at least one expert per layer")
    if keep >= num_experts:
        verb = "merges" if what == "--to" else "prunes"
        raise MoetoolError(f"{what} {keep}: the model has {num_experts} experts per layer, so this {verb} nothing")
    return int(keep)


def _top(scores: np.ndarray, n: int, candidates: np.ndarray | None = None) -> list[int]:
    """The N best of CANDIDATES by SCORES (ties: lower id first), in id order."""
    cand = np.arange(len(scores)) if candidates is None else np.asarray(candidates)
    order = np.lexsort((cand, -scores[cand]))
    return sorted(int(x) for x in cand[order[:n]])


def group_plan(rc, keep: int, regroup: bool) -> tuple[int, int, int] | None:
    """The (n_group, topk_group, per-group keep) to respect, or None (no groups / --regroup);
    a one-line error when KEEP cannot keep group-limited routing valid."""
    from moetool.compression.surgery import grouped_routing

    g = grouped_routing(rc)
    if g is None or regroup:
        return None
    n_group, topk_group, min_per = g
    E, top_k = int(rc.num_experts), int(rc.top_k)
    hint = "; or --regroup to turn group-limited routing off (n_group = topk_group = 1)"
    if keep % n_group:
        raise MoetoolError(f"this model routes in {n_group} groups of {E // n_group} experts (topk_group {topk_group}): "
                           f"keep a multiple of {n_group} experts so every group keeps the same number{hint}")
    per = keep // n_group
    if per < min_per:
        least = (f"keep at least {min_per * n_group}" if min_per * n_group < E
                 else f"with {E} experts no smaller count keeps every group valid")
        raise MoetoolError(f"this model's router scores each of its {n_group} groups by its top {min_per} experts: "
                           f"keeping {keep} leaves {per} per group; {least}{hint}")
    if topk_group * per < min(top_k, keep):
        raise MoetoolError(f"routing picks {top_k} experts from {topk_group} of {n_group} groups: keeping {per} per "
                           f"group leaves {topk_group * per} reachable; keep at least "
                           f"{n_group * -(-top_k // topk_group)}{hint}")
    return n_group, topk_group, per


def select(scores: np.ndarray, keep: int, groups: tuple[int, int, int] | None) -> list[int]:
    if groups is None:
        return _top(scores, keep)
    n_group, _, per = groups
    size = len(scores) // n_group
    kept: list[int] = []
    for g in range(n_group):
        kept += _top(scores, per, np.arange(g * size, (g + 1) * size))
    return sorted(kept)


def choose_experts(rc, stats: RoutingStats | None, keep: int, by: str, seed: int = 0, global_budget: bool = False,
                   regroup: bool = False) -> dict:
    """{layer: kept expert ids} and how the counts were decided."""
    if by not in METHODS:
        raise MoetoolError(f"--by {by}: choose from {', '.join(METHODS)}")
    layers = list(rc.moe_layers)
    E = int(rc.num_experts)
    if by == "random":
        rng = np.random.default_rng(seed)
        scores = {L: rng.random(E) for L in layers}
    else:
        if stats is None:
            raise MoetoolError(f"--by {by} needs routing statistics: give --trace FILE or --file TEXT")
        scores = {L: stats.score(by, L) for L in layers}
    info: dict[str, Any] = {"by": by, "keep": keep, "global": global_budget}
    if by == "random":
        info["seed"] = seed
    final = keep
    if global_budget:
        shares = []
        for L in layers:
            s = scores[L]
            total = s.sum()
            shares.append(s / total if total > 0 else np.full(E, 1.0 / E))
        flat = np.concatenate(shares)
        budget = keep * len(layers)
        order = np.lexsort((np.arange(flat.size), -flat))[:budget]
        wanted = np.bincount(order // E, minlength=len(layers))
        final = int(wanted.max())
        g = group_plan(rc, E, regroup)  # group geometry only
        if g is not None:
            final = -(-final // g[0]) * g[0]
        info["global_wanted"] = {int(L): int(n) for L, n in zip(layers, wanted)}
        if final >= E:
            worst = layers[int(np.argmax(wanted))]
            raise MoetoolError(f"--global: the global ranking keeps all {E} experts of layer {worst}, and configs hold "
                               "one expert count for every layer, so nothing would be pruned; prune per layer instead")
        info["kept_per_layer"] = final
        info["budget"] = int(budget)
        info["kept_total"] = final * len(layers)
    groups = group_plan(rc, final, regroup)
    kept = {L: select(scores[L], final, groups) for L in layers}
    info["groups"] = None if groups is None else {"n_group": groups[0], "topk_group": groups[1], "per_group": groups[2]}
    info["scores"] = {int(L): [float(x) for x in scores[L]] for L in layers} if by != "random" else None
    return {"kept": kept, "info": info, "keep": final}


def mass_kept(stats: RoutingStats | None, kept: dict[int, list[int]]) -> dict[int, dict] | None:
    """Per layer, the share of the calibration routing (token choices, routing weight) that
    went to the kept experts."""
    if stats is None:
        return None
    out = {}
    for L, ids in kept.items():
        c, w = stats.counts[L], stats.weight[L]
        out[L] = {"choices": float(c[ids].sum() / max(c.sum(), 1)),
                  "weight": float(w[ids].sum() / w.sum()) if w.sum() > 0 else None}
    return out


# -- config ----------------------------------------------------------------------------------------------------
def expert_config_updates(ckpt, num_experts: int, groups_off: bool) -> tuple[dict, int]:
    """Config keys to write for NUM_EXPERTS experts per layer (top-k clipped to it; with
    GROUPS_OFF, n_group = topk_group = 1). Keys come from the family spec."""
    from moetool.families.resolve import field_keys_to_write

    fam, rc = ckpt.family, ckpt.rc
    lm = ckpt.lm_config(ckpt.raw_config)
    updates: dict[str, Any] = {}

    def put(field_name: str, value) -> None:
        updates.update(dict.fromkeys(field_keys_to_write(lm, fam, field_name), value))

    put("num_experts", int(num_experts))
    top_k = min(int(rc.top_k), int(num_experts))
    if top_k != rc.top_k:
        put("top_k", top_k)
    if groups_off:
        put("n_group", 1)
        put("topk_group", 1)
    return updates, top_k


# -- the command's library function -----------------------------------------------------------------------------
def prune_checkpoint(model: str, out: str, keep: int | None = None, ratio: float | None = None, by: str = "frequency",
                     trace: str | None = None, file: str | None = None, max_tokens: int | None = None,
                     batch_size: int = 8, seed: int = 0, global_budget: bool = False, regroup: bool = False,
                     force: bool = False, load_options: dict | None = None, progress: bool = True,
                     accept_foreign_trace: bool = False, heal: bool = False, heal_options=None) -> dict:
    """Prune MODEL's routed experts and write the result to OUT. Returns plain data. HEAL: then
    heal the pruned model against MODEL on the same calibration text (moetool.compression.heal)."""
    import time

    from moetool.compression.surgery import Checkpoint, OutExpert, SurgeryPlan, check_output

    started = time.perf_counter()
    ckpt = Checkpoint(model)
    rc = ckpt.rc
    if not rc.moe_layers:
        raise MoetoolError(f"{model}: no MoE layers to prune")
    check_output(out, [ckpt.path], force)  # before any slow calibration
    if heal and not file:
        raise MoetoolError("--heal needs calibration text: give --file TEXT")
    n = keep_count(int(rc.num_experts), keep, ratio)
    if by not in METHODS:
        raise MoetoolError(f"--by {by}: choose from {', '.join(METHODS)}")
    if not global_budget:
        group_plan(rc, n, regroup)  # group-limited routing constraints, before any calibration
    if by == "random" and not (trace or file):
        stats = None
    else:
        stats = gather_stats(model, rc, trace, file, max_tokens, batch_size, load_options,
                             reap=(by == "reap"), what="REAP scores (expert output norms)",
                             checkpoint=ckpt.path, accept_foreign_trace=accept_foreign_trace)
    choice = choose_experts(rc, stats, n, by, seed=seed, global_budget=global_budget, regroup=regroup)
    kept, final = choice["kept"], choice["keep"]
    groups_off = regroup and rc.family.spec.get("grouped_routing") is not None and int(rc.fields.get("n_group") or 1) > 1
    updates, top_k = expert_config_updates(ckpt, final, groups_off)
    plan = SurgeryPlan({L: [OutExpert([e]) for e in ids] for L, ids in kept.items()}, updates, "prune")
    masses = mass_kept(stats, kept)
    layers = []
    E = int(rc.num_experts)
    for L in rc.moe_layers:
        row = {"layer": int(L), "kept": kept[L], "dropped": [e for e in range(E) if e not in kept[L]]}
        if choice["info"]["scores"] is not None:
            row["scores"] = choice["info"]["scores"][L]
        if masses is not None:
            row["mass_kept"] = masses[L]
        layers.append(row)
    info = {k: v for k, v in choice["info"].items() if k != "scores"}
    selection = {"method": info, "top_k": {"before": int(rc.top_k), "after": top_k}, "layers": layers,
                 "statistics": None if stats is None else stats.source}
    if groups_off:
        selection["regrouped"] = True

    def card(result: dict) -> str:
        return _card({**result, "selection": selection})

    from moetool.compression.heal import write_compressed

    result = write_compressed(ckpt, plan, out, card, force, progress, heal, model, file, max_tokens, batch_size,
                              heal_options, load_options)
    result["selection"] = selection
    result["total_seconds"] = round(time.perf_counter() - started, 3)  # with calibration
    return result


def _card(result: dict) -> str:
    from moetool.compression.surgery import card_header, card_statistics

    sel = result["selection"]
    m = sel["method"]
    how = {"frequency": "how often the router chose each expert",
           "weight": "the summed routing weight each expert received",
           "reap": "REAP: mean routing weight x expert output norm over the tokens routed to each expert",
           "random": f"a seeded random choice (seed {m.get('seed')})"}[m["by"]]
    summary = (f"Routed experts pruned from `{result['model']}` by moetool: each MoE layer keeps "
               f"{result['num_experts']['after']} of {result['num_experts']['before']} experts, chosen by {how}. "
               "Router rows (and DeepSeek's `e_score_correction_bias`) follow the kept experts; shared experts, "
               "attention, embeddings and norms are unchanged.")
    lines = card_header(result, f"{Path(result['out']).name}: pruned experts", summary)
    lines.append(f"- Top-k: {sel['top_k']['before']} -> {sel['top_k']['after']}")
    if m.get("global"):
        lines.append(f"- Global budget: the ranking asked for per-layer counts {m['global_wanted']}; configs hold one "
                     f"count, so every layer keeps {m['kept_per_layer']} (next-best experts fill the rest)")
    if m.get("groups"):
        g = m["groups"]
        lines.append(f"- Group-limited routing kept: {g['per_group']} experts kept in each of {g['n_group']} groups "
                     f"(topk_group {g['topk_group']})")
    lines += card_statistics(bool(sel.get("regrouped")), sel.get("statistics"), "None (random choice).")
    lines += ["", "## Kept experts", "",
              "New expert i of a layer is the i-th kept expert (original ids, in order).", "",
              "| layer | kept (original ids) | dropped | routing kept (choices / weight) |", "|---|---|---|---|"]
    for row in sel["layers"]:
        mk = row.get("mass_kept")
        mass = "" if not mk else f"{mk['choices']:.1%} / " + ("-" if mk["weight"] is None else f"{mk['weight']:.1%}")
        lines.append(f"| {row['layer']} | {', '.join(map(str, row['kept']))} | "
                     f"{', '.join(map(str, row['dropped']))} | {mass} |")
    lines += ["", "Loads with `transformers.AutoModelForCausalLM.from_pretrained` (no custom code).", ""]
    return "\n".join(lines)
