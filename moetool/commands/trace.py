"""`moetool trace MODEL` (record routing) and `moetool trace show FILE` (render a saved trace)."""

from __future__ import annotations

import click

from moetool.commands._loading_options import loading_options


def _emit(summary: dict, as_json: bool, plot: str | None) -> None:
    from moetool.render import print_json

    if plot:
        from moetool.render.plot import load_heatmap

        load_heatmap(summary, plot)
    if as_json:
        print_json(summary)
    else:
        from moetool.render.trace import render_trace

        render_trace(summary)
    if plot:
        click.echo(f"wrote heatmap to {plot}", err=True)


@click.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs (same fields as `trace --json`).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also draw a layer-by-expert load heatmap (PNG).")
@click.option("--model", "check_model", default=None, metavar="MODEL",
              help="Check the trace fits MODEL's layers and experts (its config only; no weights are loaded).")
def show_command(file: str, as_json: bool, plot: str | None, check_model: str | None) -> None:
    """Render a saved trace FILE again, without loading the model."""
    from moetool.analysis.trace import Trace, check_trace_matches_model
    from moetool.analysis.trace_stats import summarize

    trace = Trace.load(file)
    if check_model:
        check_trace_matches_model(trace, check_model, file)
    _emit(summarize(trace), as_json, plot)


class _TraceCommand(click.Command):
    """`trace MODEL ...` records; `trace show FILE ...` dispatches to the show command."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "show":
            return show_command.make_context(f"{info_name} show", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("trace", cls=_TraceCommand, epilog="Render a saved trace again: moetool trace show FILE [--json] [--plot F]")
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="Text to trace (repeatable).")
@click.option("--file", "file", type=click.Path(dir_okay=False), default=None,
              help="Texts to trace: one per line, or JSONL with a 'text' field.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Trace at most this many tokens in all.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Texts per forward pass.")
@click.option("--generate", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also greedily generate N tokens per text and trace their decode steps.")
@click.option("--logits", is_flag=True, help="Also record the full router logits (E float16 values per token and layer).")
@click.option("--no-special-tokens", is_flag=True, help="Tokenize without the tokenizer's special tokens (BOS...).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Save the trace (.safetensors).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Draw a layer-by-expert load heatmap (PNG).")
@loading_options
def command(model, prompts, file, max_tokens, batch_size, generate, logits, no_special_tokens, out, as_json, plot,
            load_options) -> None:
    """Record which experts MODEL routes each token to, per MoE layer, and show the load.

    MODEL is a checkpoint directory or a Hub id in the local cache. Text is tokenized as the
    model's own tokenizer does (special tokens included); padding never counts.
    """
    from moetool.errors import MoetoolError
    from moetool.analysis.trace import read_texts, trace_model
    from moetool.analysis.trace_stats import summarize

    if plot and not plot.lower().endswith(".png"):
        raise MoetoolError(f"--plot {plot}: write a .png file")
    from moetool.checkpoint.outdir import check_output_file

    for flag, path in (("--out", out), ("--plot", plot)):  # writable, before the model is loaded
        if path:
            check_output_file(path, flag)
    texts = read_texts(prompts, file)
    trace, _loaded = trace_model(model, texts, max_tokens=max_tokens, batch_size=batch_size, logits=logits,
                                 generate=generate, add_special_tokens=not no_special_tokens,
                                 load_options=load_options)
    if out:
        size = trace.save(out)
        click.echo(f"saved trace of {trace.tokens} tokens to {out} ({size:,} bytes)", err=True)
    _emit(summarize(trace), as_json, plot)
