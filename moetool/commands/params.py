"""`moetool params`: parse options, count, render."""

from __future__ import annotations

import click

from moetool.errors import MoetoolError


@click.command("params")
@click.argument("model", required=False)
@click.option("--list", "list_presets", is_flag=True, help="List the built-in presets (real configs).")
@click.option("--per-layer", is_flag=True, help="Also show a per-layer breakdown.")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Context length for the attention part of FLOPs per token.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def command(model: str | None, list_presets: bool, per_layer: bool, context: int, as_json: bool) -> None:
    """Count total and activated parameters of MODEL.

    MODEL is a preset name (e.g. mixtral, deepseek-v3), a config.json, a local checkpoint
    directory (counted exactly from its safetensors headers), or a Hub id already in the
    local Hugging Face cache. Never loads tensor data; never imports torch.
    """
    from moetool.analysis import params as lib
    from moetool.render import print_json
    from moetool.render.params import render_params, render_preset_list

    if list_presets:
        rows = lib.list_presets()
        print_json(rows) if as_json else render_preset_list(rows)
        return
    if not model:
        raise MoetoolError("give a MODEL (preset, config.json, checkpoint directory or cached Hub id), or --list")
    report = lib.count_params(model, per_layer=per_layer, context=context)
    print_json(report) if as_json else render_params(report)
