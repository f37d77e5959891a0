"""`moetool merge-experts MODEL --out DIR --to N`: merge similar experts, as checkpoint surgery."""

from __future__ import annotations

import click

from moetool.commands._loading_options import calibration_options, loading_options


@click.command("merge-experts")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the merged checkpoint to.")
@click.option("--to", "to", type=int, required=True, metavar="N", help="Experts per MoE layer after merging.")
@click.option("--similarity", type=click.Choice(["router", "output", "weight"]), default="router", show_default=True,
              help="How experts are grouped: router-logit or expert-output similarity on the calibration data, "
                   "or weight similarity.")
@click.option("--align", is_flag=True, help="Permute each expert's hidden neurons to match its group's dominant "
                                            "expert before averaging.")
@click.option("--router-row", type=click.Choice(["average", "dominant"]), default="average", show_default=True,
              help="The merged expert's router row: the usage-weighted average of the group's rows, or the "
                   "dominant expert's row.")
@calibration_options
@click.option("--regroup", is_flag=True,
              help="Group-limited routing (DeepSeek n_group): turn it off instead of merging within groups.")
@click.option("--heal", is_flag=True,
              help="Then heal the result against MODEL on the same --file text (moetool heal, default settings); "
                   "with --run-dir the heal is checkpointed there too and --resume continues it.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@loading_options
def command(model, out, to, similarity, align, router_row, trace, file, max_tokens, batch_size, accept_foreign_trace,
            regroup, heal, force, as_json, load_options) -> None:
    """Merge MODEL's routed experts down to --to N per layer: group them around the most used
    experts by similarity, average each group weighted by usage, and write a checkpoint that
    loads in transformers (shard by shard; --out appears only when complete).
    """
    from moetool.compression.merge import merge_checkpoint

    result = merge_checkpoint(model, out, to, similarity=similarity, trace=trace, file=file, max_tokens=max_tokens,
                              batch_size=batch_size, align=align, regroup=regroup, force=force,
                              load_options=load_options, progress=not as_json, heal=heal, router_row=router_row,
                              accept_foreign_trace=accept_foreign_trace)
    if as_json:
        from moetool.render import print_json

        print_json(result)
    else:
        from moetool.render.prune import render_merge

        render_merge(result)
        if result.get("heal"):
            from moetool.render.heal import render_heal

            render_heal(result["heal"])
