"""`moetool families`: every MoE family of the installed transformers, with its support level."""

from __future__ import annotations

import click


@click.command("families")
@click.option("--refresh", is_flag=True, help="Scan transformers again instead of using the cached scan.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def command(refresh: bool, as_json: bool) -> None:
    """List every MoE family with its level: curated (a family JSON shipped with moetool, no torch
    needed), derived (read off transformers' own model on the meta device, cached), or
    unsupported (with the reason).

    The first run scans transformers' model types (about 10 s); later runs read the cached scan.
    """
    from moetool.families.catalog import families
    from moetool.render import print_json
    from moetool.render.families import render_families

    report = families(use_cache=not refresh)
    print_json(report) if as_json else render_families(report)
