"""`moetool distill` for people: the run summary (rich); the model card and curve it writes
are in moetool.compression.distill_card."""

from __future__ import annotations

from moetool.compression.distill_card import eval_rows
from moetool.render import console, human_count


def render_distill(result: dict) -> None:
    from rich.table import Table

    con = console()
    st, tr, data = result["student"], result["training"], result["data"]
    con.print(f"[bold]{result['teacher']}[/] ({result['teacher_family']}"
              + (f", {human_count(result['teacher_params'])} params" if result.get("teacher_params") else "")
              + f") -> [bold]{st['architectures'][0]}[/] ({human_count(st['params'])} params, "
              f"FFN width {st['intermediate_size']:,}) at {result['out']}")
    con.print(f"init: {result['init']['method']}" + (f", usage from {result['init']['usage']}" if result["init"]["usage"] else ""))
    con.print(f"data: {data['tokens']:,} tokens ({data['blocks']} blocks of {tr['seq_len']}) from "
              f"{', '.join(data['files'])}; {tr['steps']} steps x {tr['tokens_per_step']:,} tokens "
              f"({tr['processes']} process{'es' if tr['processes'] > 1 else ''}, {tr['epochs']} epochs)")
    if tr.get("tokens_per_second"):
        con.print(f"training: {tr['tokens_per_second']:,.0f} tokens/s"
                  + (f", teacher top-{tr['teacher_cache']['topk']} cached in {tr['teacher_cache']['dir']}" if tr["teacher_cache"] else ""))
    if result["history"]:
        first, last = result["history"][0], result["history"][-1]
        con.print(f"train KL (T={tr['temperature']}): {first['kl']:.4f} at step {first['step']} -> {last['kl']:.4f} at step {last['step']}")
    rows = eval_rows(result)
    if rows:
        table = Table(title=f"held-out ({data['eval_tokens']:,} tokens of {', '.join(data['eval_files'])})",
                      title_justify="left")
        for col in ("model", "perplexity", "KL to teacher", "top-1 agreement"):
            table.add_column(col, justify="right" if col != "model" else "left")
        table.add_row("teacher", f"{rows[0][1]['teacher_ppl']:.3f}", "0", "100.0%")
        for label, e in rows:
            table.add_row(label, f"{e['ppl']:.3f}", f"{e['kl']:.4f}", f"{e['top1']:.1%}")
        con.print(table)
