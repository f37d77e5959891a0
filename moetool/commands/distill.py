"""`moetool distill`: parse options, distill, render."""

from __future__ import annotations

import click

from moetool.commands._loading_options import loading_options


@click.command("distill")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the dense checkpoint.")
@click.option("--file", "files", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Training text (UTF-8); repeat for several files.")
@click.option("--intermediate-size", type=int, default=None,
              help="Student FFN width [default: the teacher's activated width, top_k x expert width + shared].")
@click.option("--init", "init", type=click.Choice(["merge", "topk", "random"]), default="merge", show_default=True,
              help="How the student's MLPs start: usage-weighted expert average, most-used experts, or random.")
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="Routing usage from a `moetool trace` file instead of calibration on --file.")
@click.option("--accept-foreign-trace", "accept_foreign_trace", is_flag=True,
              help="Use a --trace recorded on another model (router weights or routing config differ); refused by default.")
@click.option("--calib-tokens", type=int, default=16384, show_default=True,
              help="Tokens of --file the teacher routes to measure expert usage for --init.")
@click.option("--steps", type=int, default=100, show_default=True,
              help="Optimizer steps (0: write the initialised student untrained).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per training sequence.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per micro-batch per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--warmup", type=int, default=None, help="Warm-up steps [default: 5% of --steps].")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--hidden-loss", type=float, default=0.0, show_default=True,
              help="Weight of the hidden-state MSE loss (0: logits only).")
@click.option("--eval-file", "eval_files", multiple=True, type=click.Path(dir_okay=False),
              help="Held-out text for evaluation; repeat for several files.")
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Evaluate every N steps (always at the start and the end when --eval-file is given).")
@click.option("--eval-tokens", type=int, default=16384, show_default=True, help="At most this many held-out tokens.")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: never).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoints go [default: OUT.checkpoints beside --out].")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint (same settings).")
@click.option("--cache-teacher", type=click.Path(file_okay=False), default=None,
              help="Run the teacher once and keep its top-K log-probabilities in this directory.")
@click.option("--cache-topk", type=int, default=64, show_default=True, help="K for --cache-teacher.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the data order and random weights.")
@loading_options(checkpoints=False)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def command(model: str, out: str, files: tuple[str, ...], as_json: bool, eval_files: tuple[str, ...],
            load_options: dict, **options) -> None:
    """Distill the MoE MODEL into its dense sibling (Mixtral -> Mistral, Qwen-MoE -> Qwen,
    DeepSeek -> all-dense DeepSeek) by knowledge distillation on --file, writing a checkpoint
    that transformers loads without moetool. Runs data-parallel when launched with torchrun or
    `accelerate launch` (one process per GPU; several CPU processes with torchrun). The
    teacher is loaded with the loading options below (the student trains in float32).
    """
    from moetool.compression.distill import distill
    from moetool.render import print_json
    from moetool.render.distill import render_distill

    result = distill(model, out, list(files), eval_files=list(eval_files), progress=not as_json,
                     load_options=load_options, **options)
    if result.get("process_index", 0) != 0:
        return
    print_json(result) if as_json else render_distill(result)
