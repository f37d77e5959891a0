"""Rendering of `moetool heal` results (rich)."""

from __future__ import annotations

from moetool.render import console


def render_heal(result: dict) -> None:
    from rich.table import Table

    con = console()
    cal = result["calibration"]
    o = result["options"]
    con.print(f"[bold]heal[/bold] {result['model']} ({result['family']}, {result['num_experts']} experts per MoE layer) "
              f"against {result['ref']} -> {result['out']}")
    con.print(f"calibration: {cal['file']} ({cal['tokens']:,} tokens in {cal['texts']} texts); "
              f"router steps {o['router_steps']}, expert steps {o['experts_steps']}, ridge {o['ridge']}"
              + (f"; {result['streamed'] and 'streamed' or 'in memory'}" if "streamed" in result else ""))
    table = Table(title="block output error vs the target (relative mean square; fitted tokens, held-out "
                        "calibration tokens)")
    for col in ("layer", "before", "after", "held out before", "after ", "router", "down projections", "seconds"):
        table.add_column(col, justify="left" if col in ("router", "down projections") else "right")
    for r in result["layers"]:
        router = r.get("router")
        down = r.get("down")
        rtext = "-" if not router else ("refitted" if router["kept"] else "unchanged (no gain)")
        dtext = "-" if not down else f"{down['fitted']} experts" + (" + shared" if down.get("shared") else "") + " refitted"
        if r["reverted"]:
            rtext, dtext = "reverted (no gain)", ""
        hb, ha = r.get("holdout_relative_before"), r.get("holdout_relative_after")
        table.add_row(str(r["layer"]), f"{r['relative_before']:.4f}", f"{r['relative_after']:.4f}",
                      "-" if hb is None else f"{hb:.4f}", "-" if ha is None else f"{ha:.4f}", rtext, dtext,
                      f"{r['seconds']:.1f}")
    con.print(table)
    con.print(f"{result['tensors_rewritten']} tensors rewritten, {result['tensors_copied']} copied; "
              f"{result['fit_seconds']:.1f} s fitting, {result['seconds']:.1f} s in all")
    if result.get("skipped_files"):
        con.print(f"[yellow]not copied[/yellow]: {', '.join(result['skipped_files'])}")
    con.print(f"model card: {result['out']}/README.md")
