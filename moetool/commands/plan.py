"""`moetool plan`: parse options, plan, render."""

from __future__ import annotations

import click


@click.command("plan")
@click.argument("model")
@click.option("--gpu-memory", default=None, metavar="SIZE", help="Memory of each GPU, e.g. 24GiB, 80GiB.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(min=0),
              help="Number of GPUs (0: plan for CPU RAM and disk only).")
@click.option("--cpu-memory", default=None, metavar="SIZE",
              help="CPU RAM for offloaded weights (default: unlimited); what does not fit goes to disk.")
@click.option("--reserve", default="0", metavar="SIZE", show_default=True,
              help="GPU memory to keep free on each GPU (activations, CUDA context).")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Tokens of KV cache per sequence.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Sequences held at once.")
@click.option("--precision", type=click.Choice(["bf16", "fp8", "int4"]), default="bf16", show_default=True,
              help="Weight precision of the top-level figures and the written maps (all three are reported).")
@click.option("--trace", "trace", default=None, type=click.Path(dir_okay=False),
              help="Routing trace (`moetool trace ... --out`): hottest experts get the GPU; needed for --ep "
                   "and --capacity-factor.")
@click.option("--accept-foreign-trace", "accept_foreign_trace", is_flag=True,
              help="Use a --trace recorded on another checkpoint (router weights or routing config differ); refused "
                   "by default.")
@click.option("--holdout", default=0.2, show_default=True, type=float,
              help="Share of the trace held out to judge placements (by sequence, else by token order; 0 = in-sample).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the held-out split.")
@click.option("--device-map-out", default=None, type=click.Path(dir_okay=False),
              help="Write the placement as a device map JSON (module -> device) for from_pretrained / "
                   "`moetool trace --device-map`.")
@click.option("--ep", default=None, type=click.IntRange(min=1), help="Simulate expert parallelism over N devices.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="Nodes the EP devices are on.")
@click.option("--redundant", default=0, show_default=True, type=click.IntRange(min=0),
              help="Redundant expert replicas per layer for the balanced strategy.")
@click.option("--dispatch-dtype", type=click.Choice(["bf16", "fp8"]), default="bf16", show_default=True,
              help="Dtype of the all-to-all dispatch (combine is bf16).")
@click.option("--ep-map-out", default=None, type=click.Path(dir_okay=False),
              help="Write the physical-to-logical expert maps of the EP strategies (JSON).")
@click.option("--capacity-factor", "capacity_factors", multiple=True, metavar="C",
              help="Count the assignments a per-expert capacity of C x tokens x top_k / experts drops (repeatable).")
@click.option("--plot", default=None, metavar="FILE.png|PREFIX",
              help="PNG figures: per-device load before/after balancing (with --ep) or the expert placement.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def command(model, gpu_memory, gpus, cpu_memory, reserve, context, batch, precision, trace, accept_foreign_trace, holdout, seed,
            device_map_out, ep, nodes, redundant, dispatch_dtype, ep_map_out, capacity_factors, plot, as_json) -> None:
    """Plan serving MODEL: what fits on the GPUs, CPU RAM and disk at bf16 / fp8 / 4-bit, and
    with a routing trace, expert parallelism and capacity factors from measured routing.

    MODEL is a preset (e.g. mixtral, deepseek-v3), a config.json, a checkpoint directory or a
    cached Hub id. No weights are read; torch and transformers are imported only to write a
    device map.
    """
    from moetool.analysis.plan import plan
    from moetool.analysis.plan_ep import parse_factor
    from moetool.render import print_json

    for c in capacity_factors:
        parse_factor(c)  # bad input fails before any work
    if plot:
        from pathlib import Path

        from moetool.errors import MoetoolError

        if not Path(plot).expanduser().parent.exists():
            raise MoetoolError(f"--plot {plot}: directory {Path(plot).parent} does not exist")
    result = plan(model, gpu_memory=gpu_memory, gpus=gpus, cpu_memory=cpu_memory, reserve=reserve, context=context,
                  batch=batch, precision=precision, trace=trace, holdout=holdout, seed=seed, ep=ep, nodes=nodes,
                  redundant=redundant, dispatch_dtype=dispatch_dtype, capacity_factors=capacity_factors,
                  device_map_out=device_map_out, ep_map_out=ep_map_out, accept_foreign_trace=accept_foreign_trace)
    if plot:
        from moetool.render.plan import plot_plan

        written = plot_plan(result, plot)
        result.report["plots"] = written
    if as_json:
        print_json(result.report)
    else:
        from moetool.render.plan import render_plan

        render_plan(result.report)
        for p in result.report.get("plots", []):
            click.echo(f"wrote {p}", err=True)
