"""Rendering of `moetool eval` results (rich)."""

from __future__ import annotations

from moetool.render import console, human_count


def render_eval(result: dict) -> None:
    from rich.table import Table

    con = console()
    con.print(f"{result['file']}: {result['tokens']:,} predicted tokens in {result['windows']} windows of up to "
              f"{result['seq_len']} (tokenizer of {result['tokenizer']})")
    has_ref = result.get("ref") is not None
    table = Table()
    table.add_column("model")
    table.add_column("experts", justify="right")
    table.add_column("params", justify="right")
    table.add_column("perplexity", justify="right")
    if has_ref:
        table.add_column("vs ref", justify="right")
        table.add_column("KL(ref||model)", justify="right")
        table.add_column("top-1 agree", justify="right")
    table.add_column("time", justify="right")
    for r in result["models"]:
        name = r["model"] + (" (ref)" if r.get("is_ref") else "")
        cells = [name, f"{r['num_experts']} (top-{r['top_k']})", human_count(r["params"]), f"{r['perplexity']:.3f}"]
        if has_ref:
            cells += [f"{r['perplexity_ratio']:.3f}x", f"{r['kl']:.4f}", f"{r['top1_agreement']:.1%}"]
        cells.append(f"{r['seconds']:.1f} s")
        table.add_row(*cells)
    con.print(table)
