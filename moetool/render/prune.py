"""Rendering of `moetool prune` and `moetool merge-experts` results (rich)."""

from __future__ import annotations

from moetool.render import console, human_bytes


def _ids(ids: list[int], limit: int = 24) -> str:
    text = ", ".join(map(str, ids[:limit]))
    return text + (f", ... (+{len(ids) - limit})" if len(ids) > limit else "")


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _summary(con, result: dict) -> None:
    b = result["bytes"]
    ne = result["num_experts"]
    con.print(f"[bold]{result['method']}[/bold] {result['model']} ({result['family']}) -> {result['out']}")
    con.print(f"experts per MoE layer: {ne['before']} -> {ne['after']}")
    for key, ch in result["config_changes"].items():
        con.print(f"config {key}: {ch['from']} -> {ch['to']}")
    total = result.get("total_seconds", result["seconds"])
    con.print(f"tensor bytes: {human_bytes(b['input'])} -> {human_bytes(b['output'])} "
              f"({b['output'] / max(b['input'], 1):.1%}) in {len(result['files'])} shards; "
              f"{result['seconds']:.1f} s writing, {total:.1f} s in all")


def _footer(con, result: dict, stats_source: dict | None) -> None:
    if stats_source:
        where = stats_source.get("trace") or stats_source.get("file")
        tokens = stats_source.get("tokens")
        con.print(f"statistics: {where} ({tokens} tokens)" + (f"; {stats_source['rerun']}" if stats_source.get("rerun") else ""))
    if result.get("skipped_files"):
        con.print(f"[yellow]not copied[/yellow] (other weight formats or folders): {', '.join(result['skipped_files'])}")
    con.print(f"model card: {result['out']}/README.md")


def render_prune(result: dict) -> None:
    from rich.table import Table

    con = console()
    _summary(con, result)
    sel = result["selection"]
    m = sel["method"]
    if m.get("global"):
        con.print(f"global ranking asked for per-layer counts {m['global_wanted']}; every layer keeps "
                  f"{m['kept_per_layer']} (configs hold one count)")
    if m.get("groups"):
        g = m["groups"]
        con.print(f"group-limited routing kept: {g['per_group']} experts in each of {g['n_group']} groups")
    table = Table(title=f"kept experts (by {m['by']})")
    table.add_column("layer", justify="right")
    table.add_column("kept (original ids)")
    table.add_column("dropped")
    has_mass = any("mass_kept" in r for r in sel["layers"])
    if has_mass:
        table.add_column("routing kept: choices", justify="right")
        table.add_column("weight", justify="right")
    for row in sel["layers"]:
        cells = [str(row["layer"]), _ids(row["kept"]), _ids(row["dropped"])]
        if has_mass:
            mk = row.get("mass_kept") or {}
            cells += [_pct(mk.get("choices")), _pct(mk.get("weight"))]
        table.add_row(*cells)
    con.print(table)
    _footer(con, result, sel.get("statistics"))


def render_merge(result: dict) -> None:
    from rich.table import Table

    con = console()
    _summary(con, result)
    mg = result["merge"]
    con.print(f"similarity: {mg['similarity']}; merged by usage-weighted averaging"
              + ("; neurons aligned to each group's dominant expert" if mg.get("align") else ""))
    table = Table(title="merged experts (new id: original ids with weights; dominant first)")
    table.add_column("layer", justify="right")
    table.add_column("groups")
    for row in mg["layers"]:
        parts = []
        for j, grp in enumerate(row["groups"]):
            if len(grp["sources"]) == 1:
                parts.append(f"{j}:{grp['sources'][0]}")
            else:
                parts.append(f"{j}:" + "+".join(f"{s}({w:.2f})" for s, w in zip(grp["sources"], grp["weights"])))
        table.add_row(str(row["layer"]), "  ".join(parts))
    con.print(table)
    _footer(con, result, mg.get("statistics"))
