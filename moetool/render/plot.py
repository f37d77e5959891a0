"""PNG figures with matplotlib's Agg backend (no display needed, pyplot's global state unused)."""

from __future__ import annotations

from pathlib import Path

from moetool.errors import MoetoolError


def load_heatmap(summary: dict, path: str | Path) -> Path:
    """Layer-by-expert heatmap of the fraction of tokens that chose each expert, from a
    ``trace_stats.summarize`` result. Balanced routing is k/E everywhere."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MoetoolError(f"--plot {path}: write a .png file")
    if not path.parent.exists():
        raise MoetoolError(f"--plot {path}: directory {path.parent} does not exist")
    layers = summary["layers"]
    if not layers:
        raise MoetoolError("nothing to plot: the trace has no MoE layers")
    E, k = summary["num_experts"], summary["top_k"]
    data = np.array([lay["expert_fraction"] for lay in layers], dtype=float)
    balanced = k / E

    width = min(4 + 0.28 * E, 24)
    height = min(2.6 + 0.32 * len(layers), 16)
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmax = max(float(data.max()), balanced * 2) if data.size else 1.0
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(lay["layer"]) for lay in layers])
    step = max(1, E // 32)
    ax.set_xticks(range(0, E, step))
    ax.set_xticklabels([str(i) for i in range(0, E, step)], fontsize=7 if E > 16 else 9)
    if len(layers) > 40:
        for label in ax.get_yticklabels():
            label.set_fontsize(6)
    if E <= 16 and len(layers) <= 16:
        for r in range(data.shape[0]):
            for c in range(data.shape[1]):
                v = data[r, c]
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < vmax * 0.6 else "black")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("fraction of tokens")
    title = (f"{summary.get('model')}: expert load over {summary['tokens']:,} tokens\n"
             f"top-{k} of {E} experts; balanced = k/E = {balanced:.3g}")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path
