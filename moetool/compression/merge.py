"""Expert merging (MC-SMoE / HC-SMoE style) as streaming checkpoint surgery.

Per MoE layer, down to ``to`` experts:

1. **Dominant experts**: the ``to`` most used experts (token choices on the calibration data;
   ties: lower id). With group-limited routing (DeepSeek ``n_group``) every routing group keeps
   the same number of dominant experts, and experts merge only within their group, so the
   group structure stays valid (as in `prune`).
2. **Grouping**: every other expert joins the dominant expert it is most similar to
   (``--similarity``):
   - ``router``: cosine similarity of the experts' router-logit columns over the calibration
     tokens (each token's logits centred first: softmax ignores a per-token shift);
   - ``output``: cosine similarity of the experts' outputs on the same calibration tokens
     (every expert run on the first 256 non-padding tokens of each layer);
   - ``weight``: cosine similarity of the experts' flattened weights (gate, up, down).
3. **Merging**: each group becomes one expert whose weights are the usage-weighted average of
   the members' weights (weights proportional to token choices; uniform if the group was never
   chosen). With ``--align`` each member's hidden neurons are first permuted to match the
   dominant expert's (greedy maximum-similarity matching of neurons described by their gate
   row, up row and down column; a member is otherwise averaged neuron i with neuron i).
4. **Router**: the merged expert's router row is the same usage-weighted average of the
   members' rows (likewise DeepSeek's ``e_score_correction_bias`` and gpt-oss's router bias).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moetool.errors import MoetoolError

SIMILARITIES = ("router", "output", "weight")
# --router-row: what a merged expert's router row (and score-correction / router bias) is
ROUTER_ROWS = {"average": "the same usage-weighted average of the members' rows",
               "dominant": "the dominant member's row"}


# -- similarity ------------------------------------------------------------------------------------------------
def _cosine_matrix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    return x @ x.T


def router_similarity(logits: np.ndarray) -> np.ndarray:
    """[T, E] router logits -> [E, E] cosine similarity of the per-token-centred columns."""
    lg = logits.astype(np.float64)
    lg = lg - lg.mean(axis=1, keepdims=True)
    return _cosine_matrix(lg.T)


def output_similarity(outputs: np.ndarray) -> np.ndarray:
    """[E, S*H] expert outputs on the same tokens -> [E, E] cosine similarity."""
    return _cosine_matrix(outputs)


def weight_similarity(ckpt, layer: int, experts: int, chunk_bytes: int = 64 * 2**20) -> np.ndarray:
    """[E, E] cosine similarity of the layer's experts' flattened weights, from the checkpoint:
    a Gram matrix accumulated (float64) over row chunks of each projection: every expert's rows
    a..b at a time in a float32 work buffer of about CHUNK_BYTES, so memory stays far below one
    shard."""
    import torch

    from moetool.compression.surgery import classify

    names: list[list[str]] = []  # per projection: the tensor of each expert (or one fused tensor)
    fused: list[str] = []
    for name in ckpt.entries:
        kind = classify(ckpt, name)
        if kind.kind == "expert" and kind.layer == layer and kind.expert == 0 and kind.proj:
            names.append([kind.template.replace("{E}", str(e)) for e in range(experts)])
        elif kind.kind == "fused" and kind.layer == layer:
            fused.append(name)
    gram = torch.zeros(experts, experts, dtype=torch.float64)
    if names:
        buffer = bytearray(0)
        for group in sorted(names):
            ent = ckpt.entries[group[0]]
            rows, per_row = ent.shape[0], ent.nbytes // ent.shape[0]
            cols = int(np.prod(ent.shape[1:]))
            step = max(1, min(rows, chunk_bytes // (4 * experts * max(cols, 1))))
            work = torch.empty(experts, step * cols, dtype=torch.float32)
            if len(buffer) < step * per_row:
                buffer = bytearray(step * per_row)
            for a in range(0, rows, step):
                b = min(rows, a + step)
                n = (b - a) * cols
                for i, name in enumerate(group):  # converted into the float32 work buffer in place
                    work[i, :n].copy_(ckpt.read(name, rows=(a, b), buffer=buffer).reshape(-1))
                part = work[:, :n].numpy()  # numpy's BLAS: torch's mm is several times slower for [E, huge] shapes
                gram += torch.from_numpy((part @ part.T).astype(np.float64))
    elif fused:
        for name in fused:
            x = ckpt.read(name).reshape(experts, -1)
            step = max(1, chunk_bytes // (4 * experts))
            for a in range(0, x.shape[1], step):
                part = x[:, a:a + step].to(torch.float32).numpy()
                gram += torch.from_numpy((part @ part.T).astype(np.float64))
    else:
        raise MoetoolError(f"layer {layer}: no expert weights found for --similarity weight")
    d = torch.sqrt(torch.clamp(torch.diagonal(gram), min=1e-300))
    return (gram / d[:, None] / d[None, :]).numpy()


# -- grouping -------------------------------------------------------------------------------------------------------
def group_experts(sim: np.ndarray, usage: np.ndarray, to: int, groups: tuple[int, int, int] | None = None) -> list[list[int]]:
    """Groups (dominant expert first, then members by id), ordered by dominant id."""
    E = len(usage)
    usage = np.asarray(usage, dtype=np.float64)
    if groups is None:
        regions = [np.arange(E)]
        per = to
    else:
        n_group, _, per = groups
        size = E // n_group
        regions = [np.arange(g * size, (g + 1) * size) for g in range(n_group)]
    out: list[list[int]] = []
    for region in regions:
        order = np.lexsort((region, -usage[region]))
        dominants = sorted(int(x) for x in region[order[:per]])
        members: dict[int, list[int]] = {d: [] for d in dominants}
        for e in region:
            e = int(e)
            if e in members:
                continue
            dom = np.array(dominants)
            best = np.lexsort((dom, -usage[dom], -sim[e, dom]))[0]  # most similar; ties: more used, lower id
            members[int(dom[best])].append(e)
        out += [[d] + sorted(members[d]) for d in dominants]
    return out


def usage_weights(group: list[int], usage: np.ndarray) -> list[float]:
    u = np.asarray([float(usage[e]) for e in group])
    if u.sum() <= 0:
        return [1.0 / len(group)] * len(group)
    return [float(x) for x in u / u.sum()]


# -- neuron alignment -------------------------------------------------------------------------------------------
def greedy_match(sim) -> Any:
    """perm with perm[i] = the column matched to row i, by greedy maximum similarity: every
    round each unmatched row proposes its best unmatched column and each column takes its best
    proposal (the globally best pair always wins, so every round matches at least one)."""
    import torch

    S = torch.as_tensor(sim, dtype=torch.float32).clone()
    n = S.shape[0]
    perm = torch.full((n,), -1, dtype=torch.long)
    rows_left = torch.ones(n, dtype=torch.bool)
    while bool(rows_left.any()):
        left = rows_left.nonzero().reshape(-1)
        best_val, best_col = S[left].max(dim=1)
        order = torch.argsort(best_val, descending=True, stable=True)
        cols = best_col[order]
        uniq, inv = torch.unique(cols, return_inverse=True)
        first = torch.full((uniq.numel(),), order.numel(), dtype=torch.long)
        first = first.scatter_reduce(0, inv, torch.arange(order.numel()), reduce="amin")
        winners = left[order[first]]
        perm[winners] = uniq
        rows_left[winners] = False
        S[:, uniq] = float("-inf")
    return perm


def _neuron_features(ckpt, templates: dict[str, str], e: int):
    import torch

    parts = []
    for proj in ("gate", "up", "down"):
        t = ckpt.read(templates[proj].replace("{E}", str(e))).to(torch.float32)
        parts.append(t if proj != "down" else t.T)
    f = torch.cat(parts, dim=1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def alignment_perms(ckpt, layer: int, group: list[int]) -> list:
    """Per member of GROUP, the permutation of its hidden neurons onto the dominant's (None
    for the dominant itself)."""
    from moetool.compression.surgery import classify

    templates: dict[str, str] = {}
    for name in ckpt.entries:
        kind = classify(ckpt, name)
        if kind.kind == "expert" and kind.layer == layer and kind.expert == group[0] and kind.proj:
            templates[kind.proj] = kind.template
        elif kind.kind == "fused" and kind.layer == layer:
            raise MoetoolError("--align needs per-expert gate/up/down tensors; this checkpoint stores experts fused")
    if set(templates) != {"gate", "up", "down"}:
        raise MoetoolError(f"--align: layer {layer} lacks per-expert gate/up/down projections in the family spec")
    dom = _neuron_features(ckpt, templates, group[0])
    perms: list = [None]
    for e in group[1:]:
        other = _neuron_features(ckpt, templates, e)
        perms.append(greedy_match(dom @ other.T).numpy())
    return perms


# -- the command's library function -------------------------------------------------------------------------
def merge_checkpoint(model: str, out: str, to: int, similarity: str = "router", trace: str | None = None,
                     file: str | None = None, max_tokens: int | None = None, batch_size: int = 8, align: bool = False,
                     regroup: bool = False, force: bool = False, load_options: dict | None = None,
                     progress: bool = True, router_row: str = "average", accept_foreign_trace: bool = False,
                     heal: bool = False, heal_options=None) -> dict:
    """Merge MODEL's routed experts down to TO per layer and write the result to OUT.

    ROUTER_ROW: the merged expert's router row (and score-correction bias / router bias) is the
    usage-weighted ``average`` of its members' rows, or the ``dominant`` member's row. HEAL: then
    heal the merged model against MODEL on the same calibration text (moetool.compression.heal)."""
    from moetool.compression.prune import expert_config_updates, gather_stats, group_plan, keep_count
    import time

    from moetool.compression.surgery import Checkpoint, OutExpert, SurgeryPlan, check_output

    started = time.perf_counter()
    if similarity not in SIMILARITIES:
        raise MoetoolError(f"--similarity {similarity}: choose from {', '.join(SIMILARITIES)}")
    if router_row not in ROUTER_ROWS:
        raise MoetoolError(f"--router-row {router_row}: choose from {', '.join(ROUTER_ROWS)}")
    ckpt = Checkpoint(model)
    rc = ckpt.rc
    if not rc.moe_layers:
        raise MoetoolError(f"{model}: no MoE layers to merge")
    check_output(out, [ckpt.path], force)
    E = int(rc.num_experts)
    if to is None:
        raise MoetoolError("give --to N, the number of experts per layer after merging")
    to = keep_count(E, to, None, what="--to")
    groups = group_plan(rc, to, regroup)
    if not (trace or file):
        raise MoetoolError("merging needs how often each expert is used (each group is averaged weighted by use): give --trace FILE or --file TEXT")
    if heal and not file:
        raise MoetoolError("--heal needs calibration text: give --file TEXT")
    stats = gather_stats(model, rc, trace, file, max_tokens, batch_size, load_options,
                         outputs=(similarity == "output"), logits=(similarity == "router"),
                         what=f"{similarity} similarity", checkpoint=ckpt.path,
                         accept_foreign_trace=accept_foreign_trace)
    layers_out: dict[int, list] = {}
    report = []
    for L in rc.moe_layers:
        usage = stats.counts[L]
        if similarity == "router":
            if not stats.logits or L not in stats.logits:
                raise MoetoolError("--similarity router needs router logits: a trace recorded with --logits, or --file")
            sim = router_similarity(stats.logits[L])
        elif similarity == "output":
            sim = output_similarity(stats.outputs[L])
        else:
            sim = weight_similarity(ckpt, L, E)
        grouping = group_experts(sim, usage, to, groups)
        outs = []
        rows = []
        for grp in grouping:
            w = usage_weights(grp, usage)
            perms = alignment_perms(ckpt, L, grp) if (align and len(grp) > 1) else None
            row_w = [1.0] + [0.0] * (len(grp) - 1) if router_row == "dominant" else None  # grp[0] is dominant
            outs.append(OutExpert(grp, w, perms, row_w))
            rows.append({"sources": grp, "weights": [round(x, 6) for x in w],
                         "similarity": [round(float(sim[grp[0], e]), 6) for e in grp]})
        layers_out[L] = outs
        report.append({"layer": int(L), "groups": rows,
                       "usage": [int(x) for x in usage]})
    groups_off = regroup and rc.family.spec.get("grouped_routing") is not None and int(rc.fields.get("n_group") or 1) > 1
    updates, top_k = expert_config_updates(ckpt, to, groups_off)
    plan = SurgeryPlan(layers_out, updates, "merge-experts")
    merge_info = {"similarity": similarity, "align": align, "to": to, "layers": report,
                  "top_k": {"before": int(rc.top_k), "after": top_k},
                  "groups": None if groups is None else {"n_group": groups[0], "topk_group": groups[1], "per_group": groups[2]},
                  "regrouped": bool(groups_off), "statistics": stats.source,
                  "router_row": router_row,
                  "rule": "usage-weighted average of member weights; router row (and score-correction bias) "
                          f"= {ROUTER_ROWS[router_row]}"}

    def card(result: dict) -> str:
        return _card({**result, "merge": merge_info})

    from moetool.compression.heal import write_compressed

    result = write_compressed(ckpt, plan, out, card, force, progress, heal, model, file, max_tokens, batch_size,
                              heal_options, load_options)
    result["merge"] = merge_info
    result["total_seconds"] = round(time.perf_counter() - started, 3)  # with calibration and grouping
    return result


def _card(result: dict) -> str:
    from pathlib import Path

    from moetool.compression.surgery import card_header, card_statistics

    mg = result["merge"]
    sim = {"router": "cosine similarity of router logits on calibration tokens",
           "output": "cosine similarity of expert outputs on calibration tokens",
           "weight": "cosine similarity of flattened expert weights"}[mg["similarity"]]
    summary = (f"Routed experts of `{result['model']}` merged by moetool: each MoE layer's "
               f"{result['num_experts']['before']} experts were grouped into {result['num_experts']['after']} "
               f"around the most used (dominant) experts by {sim}, and each group averaged, weighted by how often "
               "the router chose each member"
               + (", after permuting each member's hidden neurons to match the dominant expert" if mg["align"] else "")
               + f". The merged expert's router row (and DeepSeek's `e_score_correction_bias`) is "
                 f"{ROUTER_ROWS[mg['router_row']]}. Shared experts, attention, embeddings and norms are unchanged.")
    lines = card_header(result, f"{Path(result['out']).name}: merged experts", summary)
    lines.append(f"- Top-k: {mg['top_k']['before']} -> {mg['top_k']['after']}")
    lines.append(f"- Similarity: `{mg['similarity']}`; alignment: {'yes' if mg['align'] else 'no'}")
    lines.append(f"- Merge rule: {mg['rule']}")
    if mg.get("groups"):
        g = mg["groups"]
        lines.append(f"- Group-limited routing kept: experts merged within each of {g['n_group']} groups, "
                     f"{g['per_group']} per group")
    lines += card_statistics(bool(mg.get("regrouped")), mg.get("statistics"))
    lines += ["", "## Merged experts", "",
              "New expert i of a layer = the i-th group: original ids (dominant first) with their averaging weights.", "",
              "| layer | groups |", "|---|---|"]
    for row in mg["layers"]:
        parts = []
        for j, grp in enumerate(row["groups"]):
            parts.append(f"{j}: " + " + ".join(f"{s} ({w:.3f})" for s, w in zip(grp["sources"], grp["weights"])))
        lines.append(f"| {row['layer']} | {'; '.join(parts)} |")
    lines += ["", "Loads with `transformers.AutoModelForCausalLM.from_pretrained` (no custom code).", ""]
    return "\n".join(lines)
