"""`moetool eval MODEL [MODEL ...] --file TEXT [--ref MODEL]`: perplexity, KL and agreement."""

from __future__ import annotations

import click

from moetool.commands._loading_options import loading_options


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--file", "file", required=True, type=click.Path(dir_okay=False),
              help="Text to evaluate on (plain text, or JSONL with a 'text' field).")
@click.option("--ref", default=None, metavar="MODEL",
              help="Reference model: report KL(ref || model) of next-token distributions and top-1 agreement.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Evaluate on at most this many tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@loading_options
def command(models, file, ref, max_tokens, seq_len, batch_size, as_json, load_options) -> None:
    """Perplexity of each MODEL on the text of --file and, against --ref, the KL divergence of
    next-token distributions and top-1 agreement, side by side. Models load one at a time."""
    from moetool.analysis.evaluate import evaluate_models

    result = evaluate_models(list(models), file, ref=ref, max_tokens=max_tokens, seq_len=seq_len,
                             batch_size=batch_size, load_options=load_options, progress=not as_json)
    if as_json:
        from moetool.render import print_json

        print_json(result)
    else:
        from moetool.render.eval import render_eval

        render_eval(result)
