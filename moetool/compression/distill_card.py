"""The model card and training curve that `moetool distill` writes beside the student."""

from __future__ import annotations

from pathlib import Path


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def eval_rows(result: dict) -> list[tuple[str, dict]]:
    """(label, eval) pairs: the student at init and after training (and in between)."""
    evals = sorted(result.get("eval", []), key=lambda e: e["step"])
    start = result["training"].get("resumed_from_step") or 0
    rows = []
    for e in evals:
        if e["step"] == 0:
            label = "student at init (step 0)"
        elif e["step"] == result["training"]["steps"]:
            label = f"student after training (step {e['step']})"
        else:
            label = f"student at step {e['step']}"
        if e["step"] < start:
            label += " (before resume)"
        rows.append((label, e))
    return rows


def model_card(result: dict, has_plot: bool) -> str:
    st, tr, data, init = result["student"], result["training"], result["data"], result["init"]
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {result['teacher']}",
        "tags:",
        "- moetool",
        "- distillation",
        "- dense",
        "---",
        "",
        f"# Dense distillation of {result['teacher']}",
        "",
        f"A dense `{st['architectures'][0]}` ({st['params']:,} parameters, FFN width {st['intermediate_size']:,}) "
        f"distilled from the mixture-of-experts `{result['teacher']}` ({result['teacher_family']}"
        + (f", {result['teacher_params']:,} parameters" if result.get("teacher_params") else "")
        + ") with `moetool distill`. It loads with `AutoModelForCausalLM.from_pretrained`; no moetool needed.",
        "",
        "## Method",
        "",
        "- Embeddings, attention, norms and LM head: copied from the teacher.",
        f"- MLPs: `--init {init['method']}`"
        + {"merge": " (usage-weighted average of the experts, in groups, scaled by their routing weight)",
           "topk": " (neurons of the most used experts, scaled by their mean routing weight)",
           "random": " (random)"}[init["method"]]
        + (f"; routing usage from {init['usage']}." if init["usage"] else "."),
        f"- Training: knowledge distillation, loss = T^2 KL(teacher_T || student_T) with T = {tr['temperature']}"
        + (f" + {tr['hidden_loss']} x normalised hidden-state MSE" if tr["hidden_loss"] else "")
        + (f"; teacher top-{tr['teacher_cache']['topk']} log-probabilities cached once, KL on that support plus "
           "one bin for the rest of the vocabulary" if tr["teacher_cache"] else "")
        + ".",
        f"- AdamW (betas 0.9/0.95, weight decay {tr['weight_decay']}), learning rate {tr['lr']} with "
        f"{tr['warmup']} warm-up steps then cosine decay to {tr['min_lr_ratio']} x; {tr['steps']} steps of "
        f"{tr['tokens_per_step']:,} tokens (batch {tr['batch_size']} x {tr['seq_len']} tokens x "
        f"{tr['grad_accum']} accumulation x {tr['processes']} process{'es' if tr['processes'] > 1 else ''}), seed {tr['seed']}.",
        "",
        "Per layer:",
        "",
        "| layer | teacher layer | MLP initialised from |",
        "|---|---|---|",
    ]
    for row in init["layers"]:
        lines.append(f"| {row['layer']} | {row['kind']} | {row['from']} |")
    lines += [
        "",
        "## Data",
        "",
        f"- training: {data['tokens']:,} tokens from {', '.join(f'`{f}`' for f in data['files'])} "
        f"({data['blocks']} blocks, {tr['epochs']} epochs)",
    ]
    if data["eval_files"]:
        lines.append(f"- held-out: {data['eval_tokens']:,} tokens from {', '.join(f'`{f}`' for f in data['eval_files'])}")
    rows = eval_rows(result)
    if rows:
        lines += ["", "## Results (held-out)", "",
                  f"Over every position that predicts a token of a {tr['seq_len']}-token window: perplexity, "
                  f"KL(teacher || student) in nats per token at T = 1, {data['eval_kl']}, and top-1 agreement "
                  "(same most likely next token as the teacher).",
                  "",
                  "| model | perplexity | KL to teacher | top-1 agreement |", "|---|---|---|---|",
                  f"| teacher | {rows[0][1]['teacher_ppl']:.3f} | 0 | 100.0% |"]
        for label, e in rows:
            lines.append(f"| {label} | {e['ppl']:.3f} | {e['kl']:.4f} | {e['top1']:.1%} |")
    if result["history"]:
        lines += ["", "## Training curve", ""]
        if has_plot:
            lines += ["![training curve](training_curve.png)", ""]
        lines += ["| step | loss | train KL | lr |", "|---|---|---|---|"]
        hist = result["history"]
        stride = max(1, len(hist) // 20)
        picked = hist[::stride] + ([hist[-1]] if (len(hist) - 1) % stride else [])
        for h in picked:
            lines.append(f"| {h['step']} | {h['loss']:.4f} | {h['kl']:.4f} | {h['lr']:.2e} |")
    lines.append("")
    return "\n".join(lines)


def plot_curve(result: dict, path: Path) -> bool:
    """Training loss/KL per step and held-out KL; False when there is nothing to plot."""
    if not result["history"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps = [h["step"] for h in result["history"]]
    ax.plot(steps, [h["kl"] for h in result["history"]], label="train KL (T=%g)" % result["training"]["temperature"])
    if result["training"]["hidden_loss"]:
        ax.plot(steps, [h["loss"] for h in result["history"]], label="train loss")
    evals = sorted(result.get("eval", []), key=lambda e: e["step"])
    if evals:
        ax.plot([e["step"] for e in evals], [e["kl"] for e in evals], "o-", label="held-out KL (T=1)")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student) per token")
    ax.set_yscale("log")
    ax.set_title(f"distilling {result['teacher']}", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
