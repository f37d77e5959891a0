"""`moetool heal COMPRESSED --ref ORIGINAL --file TEXT --out DIR`: repair a pruned or merged
checkpoint against its original, layer by layer."""

from __future__ import annotations

import click

from moetool.commands._loading_options import loading_options
from moetool.compression.heal import (DEFAULT_EXPERTS_STEPS, DEFAULT_HOLDOUT, DEFAULT_RIDGE, DEFAULT_ROUTER_REG,
                                      DEFAULT_ROUTER_STEPS)


@click.command("heal")
@click.argument("compressed")
@click.option("--ref", required=True, help="The checkpoint COMPRESSED was pruned or merged from.")
@click.option("--file", "file", required=True, type=click.Path(dir_okay=False),
              help="Calibration text (one text per line, or JSONL with a 'text' field).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the healed checkpoint to.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Calibrate on at most this many tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Texts per forward pass.")
@click.option("--router-steps", type=click.IntRange(min=0), default=DEFAULT_ROUTER_STEPS, show_default=True,
              help="L-BFGS iterations on each layer's router rows (0: down projections only).")
@click.option("--experts-steps", type=click.IntRange(min=0), default=DEFAULT_EXPERTS_STEPS, show_default=True,
              help="L-BFGS iterations on all of each layer's routed-expert weights with the routing fixed, "
                   "before the final down-projection solve (0: closed-form down projections only).")
@click.option("--ridge", type=click.FloatRange(min=0), default=DEFAULT_RIDGE, show_default=True,
              help="Down projections: ridge towards the current weights (relative to each expert's Gram matrix).")
@click.option("--router-reg", type=click.FloatRange(min=0), default=DEFAULT_ROUTER_REG, show_default=True,
              help="Router rows: ridge towards the current rows (relative to the initial error).")
@click.option("--holdout", type=click.FloatRange(min=0, max=0.5), default=DEFAULT_HOLDOUT, show_default=True,
              help="Fraction of the calibration tokens kept out of the fit: a layer whose healed block is worse on "
                   "them than before is restored (0: decide on the fitted tokens).")
@click.option("--selection-rounds", type=click.IntRange(min=0), default=0, show_default=True,
              help="Rounds of a coordinate search on router buffers that only choose experts "
                   "(DeepSeek's e_score_correction_bias); 0: kept as they are.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@loading_options
def command(compressed, ref, file, out, max_tokens, batch_size, router_steps, experts_steps, ridge, router_reg, holdout,
            selection_rounds, force, as_json, load_options) -> None:
    """Heal COMPRESSED (a `moetool prune` or `merge-experts` output) against --ref, the model it
    was made from: for each MoE layer in order, refit the router rows and the routed experts
    (down projections, the shared expert's too, in closed form) so that the block's output
    matches the original's on the calibration text. --stream reads both models one decoder
    layer at a time; --run-dir DIR checkpoints after every layer and --resume continues a
    killed run from its first unfinished layer, with the same result.
    Writes an ordinary checkpoint of the same shape (--out appears only when complete).
    """
    from moetool.compression.heal import HealOptions, heal_checkpoint

    opts = HealOptions(router_steps=router_steps, experts_steps=experts_steps, ridge=ridge, router_reg=router_reg,
                       holdout=holdout, selection_rounds=selection_rounds)
    result = heal_checkpoint(compressed, ref, file, out, max_tokens=max_tokens, batch_size=batch_size, options=opts,
                             force=force, load_options=load_options, progress=not as_json)
    if as_json:
        from moetool.render import print_json

        print_json(result)
    else:
        from moetool.render.heal import render_heal

        render_heal(result)
