"""`moetool prune MODEL --out DIR`: remove routed experts, as streaming checkpoint surgery."""

from __future__ import annotations

import click

from moetool.commands._loading_options import calibration_options, loading_options


@click.command("prune")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the pruned checkpoint to.")
@click.option("--keep", type=int, default=None, metavar="N", help="Experts to keep per MoE layer.")
@click.option("--ratio", type=float, default=None, metavar="R", help="Fraction of experts to remove (0 < R < 1).")
@click.option("--global", "global_budget", is_flag=True,
              help="Rank experts of all layers together (see docs/prune.md: configs hold one count per model).")
@click.option("--by", type=click.Choice(["frequency", "weight", "reap", "random"]), default="frequency",
              show_default=True, help="Which experts to keep.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --by random.")
@calibration_options
@click.option("--regroup", is_flag=True,
              help="Group-limited routing (DeepSeek n_group): turn it off (n_group = topk_group = 1) instead of "
                   "keeping the same number of experts per group.")
@click.option("--heal", is_flag=True,
              help="Then heal the result against MODEL on the same --file text (moetool heal, default settings); "
                   "with --run-dir the heal is checkpointed there too and --resume continues it.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@loading_options
def command(model, out, keep, ratio, global_budget, by, seed, trace, file, max_tokens, batch_size, accept_foreign_trace,
            regroup, heal, force, as_json, load_options) -> None:
    """Prune MODEL's routed experts to --keep N per layer (or remove --ratio R of them),
    chosen from routing statistics, and write a checkpoint that loads in transformers.

    The checkpoint is rewritten shard by shard (never the whole model in memory); --out
    appears only when complete.
    """
    from moetool.compression.prune import prune_checkpoint

    result = prune_checkpoint(model, out, keep=keep, ratio=ratio, by=by, trace=trace, file=file,
                              max_tokens=max_tokens, batch_size=batch_size, seed=seed,
                              global_budget=global_budget, regroup=regroup, force=force,
                              load_options=load_options, progress=not as_json, heal=heal,
                              accept_foreign_trace=accept_foreign_trace)
    if as_json:
        from moetool.render import print_json

        print_json(result)
    else:
        from moetool.render.prune import render_prune

        render_prune(result)
        if result.get("heal"):
            from moetool.render.heal import render_heal

            render_heal(result["heal"])
