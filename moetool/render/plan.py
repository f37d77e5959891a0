"""Rich report and PNG figures for `moetool plan`."""

from __future__ import annotations

from pathlib import Path

from moetool.errors import MoetoolError
from moetool.render import console, human_bytes

PRECISION_LABELS = {"bf16": "bf16", "fp8": "fp8", "int4": "4-bit"}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _b(n) -> str:
    return "-" if n is None else ("0" if n == 0 else human_bytes(n))


def _hardware(r: dict) -> str:
    hw = r["hardware"]
    if hw["gpus"]:
        where = f"{hw['gpus']} x {human_bytes(hw['gpu_memory'])} GPU" + ("s" if hw["gpus"] > 1 else "")
        if hw["reserve_per_gpu"]:
            where += f" ({human_bytes(hw['reserve_per_gpu'])} reserved on each)"
    else:
        where = "no GPU"
    cpu = "unlimited" if hw["cpu_memory"] is None else human_bytes(hw["cpu_memory"])
    return f"{where}, CPU RAM {cpu}; KV cache for {hw['context']:,} tokens x batch {hw['batch']}"


def _routing(r: dict) -> str:
    ro = r["routing"]
    if ro["source"] != "trace":
        return "routing: no trace, every expert assumed equally likely (top_k / experts)"
    s = ro["judged_on"]
    if s["by"].startswith("none"):
        return f"routing: measured on {ro['tokens']:,} traced tokens (placement chosen and judged on the same tokens)"
    held = f"{s['heldout_tokens']:,} held-out tokens"
    if s["by"] == "sequence":
        held += f" ({s['heldout_sequences']} of {s['heldout_sequences'] + s['fit_sequences']} sequences)"
    return (f"routing: measured; placement chosen on {s['fit_tokens']:,} tokens, judged on {held} "
            f"(split by {s['by']})")


def render_plan(r: dict) -> None:
    from rich.table import Table

    con = console()
    con.print(f"[bold]{r['model']}[/] ({r['family']}) on {_hardware(r)}")
    con.print(_routing(r))
    gpus = r["hardware"]["gpus"]
    fast = "GPU" if gpus else "CPU RAM"

    for title, key in (("placement per expert (the ideal, as engines that place single experts do)", None),
                       ("device map per module (what --device-map-out writes: transformers fuses a layer's experts "
                        "into one module)", "device_map")):
        t = Table(title=title, title_justify="left")
        cols = ["precision", "weights", f"on {fast}"] + (["CPU RAM"] if gpus else []) + ["disk", "fits",
                f"expert reads from {fast}"]
        if gpus:
            cols += ["PCIe/token: weights"] + (["or activations"] if key is None else [])
        cols += ["disk/token"]
        for col in cols:
            t.add_column(col, justify="left" if col == "precision" else "right")
        for p, d in r["precisions"].items():
            row = d if key is None else d[key]
            pt = row["per_token"]
            mark = "[green]yes[/]" if row["fits"] else "[red]no[/]"
            cells = [PRECISION_LABELS[p] + (" *" if p == r["precision"] else ""), _b(d["weight_bytes"]),
                     _b(row["gpu_bytes"] if gpus else row["cpu_bytes"])]
            if gpus:
                cells.append(_b(row["cpu_bytes"]))
            cells += [_b(row["disk_bytes"]), mark, _pct(row["routed_reads_on_gpu"])]
            if gpus:
                cells.append(_b(pt["pcie_weights"]))
                if key is None:
                    cells.append(_b(pt["pcie_activations"]))
            cells.append(_b(pt["disk"]))
            t.add_row(*cells)
        con.print(t)

    top = r["precisions"][r["precision"]]
    con.print(f"[bold]{PRECISION_LABELS[r['precision']]}[/]: {r['why']}")
    if top["device_map"]["fits"] != r["fits"] or not r["fits"]:
        con.print(f"device map: {top['device_map']['why']}")
    if gpus and len(top["devices"]) <= 16:
        t = Table(title=f"per GPU ({PRECISION_LABELS[r['precision']]}, per-expert placement)", title_justify="left")
        for col in ("GPU", "weights", "KV cache", "free"):
            t.add_column(col, justify="right")
        for d in top["devices"]:
            t.add_row(str(d["device"]), _b(d["weights"]), _b(d["kv_cache"]), _b(d["free"]))
        con.print(t)
    if "ep" in r:
        _render_ep(con, r["ep"])
    if "dropped_fraction" in r:
        t = Table(title="capacity factor C: token-expert assignments dropped", title_justify="left")
        for col in ("C", "trace as one batch", "per sequence", "worst layer (batch)"):
            t.add_column(col, justify="right")
        for c, d in r["dropped_fraction"].items():
            worst = next((x for x in d["per_layer"] if x["layer"] == d["worst_layer"]), None)
            t.add_row(c, _pct(d["batch"]), _pct(d["sequence"]),
                      f"layer {worst['layer']}: {_pct(worst['batch'])}" if worst else "-")
        con.print(t)
    notes = [
        "capacity per expert = ceil(C x tokens x top_k / experts), over the whole trace as one batch or over each "
        "sequence's own tokens." if "dropped_fraction" in r else "",
        "PCIe/token: decode at batch 1. 'weights': offloaded weights copied to the GPU when used (accelerate "
        "offload; for the device map whole modules); 'or activations': hidden states sent to and from the CPU "
        "instead, when offloaded experts run there (llama.cpp -ot, ktransformers).",
        "fp8: 1 byte per linear weight + an fp32 scale per 128x128 block; 4-bit: NF4 with an fp32 absmax per 64 "
        "weights; embeddings, LM head, routers and norms stay bf16 (as `moetool params`). KV cache in bf16.",
        "not counted: activations and the CUDA context (use --reserve).",
    ]
    kv = r["kv_cache_bytes_per_token"]
    if "mla_compressed_bf16" in kv:
        notes.append(f"KV cache counted as transformers caches it ({human_bytes(kv['bf16'])} per token); an engine "
                     f"caching MLA latents needs {human_bytes(kv['mla_compressed_bf16'])} per token.")
    for f in ("device_map_file", "ep_map_file"):
        if f in r:
            notes.append(f"wrote {r[f]}")
    for n in notes:
        if n:
            con.print(f"[dim]{n}[/]")


def _render_ep(con, ep: dict) -> None:
    from rich.table import Table

    split = ep["split"]
    judged = "in-sample" if split["by"].startswith("none") else f"on {split['heldout_tokens']:,} held-out tokens"
    title = (f"expert parallelism: {ep['devices']} devices on {ep['nodes']} node(s), {ep['redundant']} redundant "
             f"replicas ({ep['physical_experts']} physical experts per layer), "
             + ("hierarchical by expert group" if ep["hierarchical"] else "global balancing")
             + f"; load judged {judged}")
    t = Table(title=title, title_justify="left")
    for col in ("strategy", "max/mean", "in-sample", "worst layer", "devices/tok", "dispatch/tok",
                "combine/tok", "cross-node", "experts/dev", "mem/dev"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for name, s in ep["strategies"].items():
        w = s["imbalance_worst_layer"]
        t.add_row(name, f"{s['imbalance']:.3f}", f"{s['imbalance_fit']:.3f}",
                  f"{w['layer']}: {w['value']:.3f}", f"{s['devices_per_token_layer']:.2f}",
                  _b(s["dispatch_bytes_per_token"]), _b(s["combine_bytes_per_token"]),
                  _pct(s["cross_node_share"]) if ep["nodes"] > 1 else "-", str(s["experts_per_device"]),
                  _b(s["expert_bytes_per_device_max"]))
    con.print(t)
    con.print(f"[dim]max/mean: the busiest device's token-expert assignments over the mean, averaged over MoE layers "
              f"(1.0 = even). devices/tok: devices a token is sent to per MoE layer. all-to-all per token over all "
              f"MoE layers, remote copies only (tokens start on devices uniformly; one copy per destination device): "
              f"dispatch in {ep['dispatch_dtype']}, combine in bf16; cross-node: share sent between nodes (one copy "
              f"per destination node). mem/dev: routed experts of all layers on the fullest device "
              f"({ep['precision']}).[/]")


# -- figures -----------------------------------------------------------------------------------------------
def _check_png(path: Path) -> None:
    if not path.parent.exists():
        raise MoetoolError(f"--plot {path}: directory {path.parent} does not exist")


def plot_plan(plan, target: str) -> list[str]:
    """--plot FILE.png: the EP figure with --ep, else the placement figure. --plot PREFIX:
    PREFIX-placement.png and, with --ep, PREFIX-ep.png."""
    r = plan.report
    target_path = Path(target)
    written = []
    if target.lower().endswith(".png"):
        _check_png(target_path)
        (_plot_ep if "ep" in r else _plot_placement)(plan, target_path)
        return [str(target_path)]
    base = Path(str(target_path))
    _check_png(base)
    p = Path(f"{base}-placement.png")
    _plot_placement(plan, p)
    written.append(str(p))
    if "ep" in r:
        p = Path(f"{base}-ep.png")
        _plot_ep(plan, p)
        written.append(str(p))
    return written


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_ep(plan, path: Path) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    r = plan.report
    ep = r["ep"]
    loads = plan.figures["ep"]
    layers = plan.figures["moe_layers"]
    names = [n for n in ("contiguous", "round-robin", "balanced") if n in loads]
    from matplotlib.colors import TwoSlopeNorm

    rel = {n: loads[n] / np.maximum(loads[n].mean(axis=1, keepdims=True), 1e-12) for n in names}
    vmax = max(1.01, max(float(v.max()) for v in rel.values()))
    vmin = min(0.99, min(float(v.min()) for v in rel.values()))
    norm = TwoSlopeNorm(vmin=vmin, vcenter=1.0, vmax=vmax)  # white = the mean load
    N = ep["devices"]
    panel_w = min(max(3.2, 0.09 * N), 7.0)
    fig = _figure(panel_w * len(names) + 1.6, min(3.0 + 0.06 * len(layers), 7.0) + 2.8)
    gs = fig.add_gridspec(2, len(names) + 1, height_ratios=[3, 1.4], width_ratios=[1] * len(names) + [0.06])
    im = None
    for i, n in enumerate(names):
        ax = fig.add_subplot(gs[0, i])
        im = ax.imshow(rel[n], aspect="auto", cmap="coolwarm", norm=norm, interpolation="nearest")
        label = "balanced\n(EPLB-style, %d redundant)" % ep["redundant"] if n == "balanced" else n
        ax.set_title(f"{label}\nmax/mean {ep['strategies'][n]['imbalance']:.2f}", fontsize=9)
        ax.set_xlabel("device")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        if i == 0:
            ax.set_ylabel("MoE layer")
            step = max(1, len(layers) // 12)
            ax.set_yticks(range(0, len(layers), step))
            ax.set_yticklabels([str(layers[j]) for j in range(0, len(layers), step)], fontsize=7)
        else:
            ax.set_yticks([])
    cb = fig.colorbar(im, cax=fig.add_subplot(gs[0, -1]))
    cb.set_label("device load / mean (1 = even)", fontsize=8)
    ax = fig.add_subplot(gs[1, :-1])
    for n in names:
        ax.plot(layers, [x["imbalance"] for x in ep["strategies"][n]["per_layer"]], marker="o", ms=3, label=n)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("max / mean")
    ax.legend(fontsize=8, ncol=3)
    split = ep["split"]
    judged = "in-sample" if split["by"].startswith("none") else f"{split['heldout_tokens']:,} held-out tokens"
    fig.suptitle(f"{r['model']}: EP over {N} devices ({ep['nodes']} node(s)); per-device load on {judged}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _plot_placement(plan, path: Path) -> None:
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    r = plan.report
    grid = plan.figures["grid"]
    layers = plan.figures["moe_layers"]
    fit = plan.figures["fit"]
    gpus = r["hardware"]["gpus"]
    fast = "GPU" if gpus else "CPU RAM"
    code = {"cpu": 1, "disk": 2}
    tiers = np.array([[0 if not isinstance(d, str) else code[d] for d in grid[L]] for L in layers])
    if not gpus:
        tiers = np.where(tiers == 1, 0, tiers)
    load = np.array([fit[L] / max(fit[L].sum(), 1e-12) * len(fit[L]) for L in layers])
    fig = _figure(12, min(3.0 + 0.1 * len(layers), 9))
    ax1 = fig.add_subplot(1, 2, 1)
    im = ax1.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    what = "(trace, tokens the placement was chosen on)" if plan.figures["routing"] == "trace" else "(no trace: uniform)"
    ax1.set_title("expert load / mean\n" + what, fontsize=9)
    fig.colorbar(im, ax=ax1, shrink=0.85)
    ax2 = fig.add_subplot(1, 2, 2)
    colors = ["#2ca02c", "#ff7f0e", "#7f7f7f"]
    ax2.imshow(tiers, aspect="auto", cmap=ListedColormap(colors), vmin=-0.5, vmax=2.5, interpolation="nearest")
    ax2.set_title(f"where each expert goes ({r['precision']}, per-expert placement)", fontsize=9)
    ax2.legend(handles=[Patch(color=c, label=t) for c, t in zip(colors, [fast, "CPU RAM", "disk"])
                        if not (t == "CPU RAM" and not gpus)],
               loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("expert")
        step = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), step))
        ax.set_yticklabels([str(layers[j]) for j in range(0, len(layers), step)], fontsize=7)
    ax1.set_ylabel("MoE layer")
    fig.suptitle(f"{r['model']}: {_pct(r['routed_reads_on_gpu'])} of routed-expert reads from {fast}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
