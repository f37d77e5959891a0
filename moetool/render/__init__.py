"""Rendering of plain-data results for people (rich) and programs (JSON)."""

from __future__ import annotations

import json
import sys

from moetool.units import human_bytes, human_count  # noqa: F401  (render modules take them from here)


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def console():
    from rich.console import Console

    con = Console()
    if not con.is_terminal:  # pipes and CI: wide enough that tables are not truncated
        con = Console(width=max(con.width, 140))
    return con
