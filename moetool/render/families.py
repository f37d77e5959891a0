"""Rich table for `moetool families`."""

from __future__ import annotations

from moetool.render import console

_STYLE = {"curated": "green", "derived": "cyan", "unsupported": "red"}


def render_families(report: dict) -> None:
    from rich.table import Table

    con = console()
    counts = report["counts"]
    title = (f"MoE families (transformers {report['transformers']}): {counts['curated']} curated, "
             f"{counts['derived']} derived, {counts['unsupported']} unsupported")
    table = Table(title=title, title_justify="left")
    for col in ("model_type", "level", "experts / top-k (scan)", "routing", "notes"):
        table.add_column(col)
    for row in report["families"]:
        level = row["level"]
        shape = f"{row['experts']} / {row['top_k']}" if row.get("experts") else ""
        notes = row.get("reason") or ""
        if row.get("family") and row["family"] != row["model_type"]:
            notes = f"family {row['family']}" + (f"; {notes}" if notes else "")
        if row.get("surgery") not in (None, "ok"):
            notes = (notes + "; " if notes else "") + f"no surgery: {row['surgery']}"
        table.add_row(row["model_type"], f"[{_STYLE[level]}]{level}[/]", shape, ", ".join(row.get("routing") or []),
                      notes)
    con.print(table)
    con.print("curated: a family JSON shipped with moetool (params without torch); derived: read off "
              "transformers' model on the meta device the first time, then cached; `moetool families --json` "
              "for programs")
