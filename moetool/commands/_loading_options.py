"""Click options for loading a model, shared by every command that runs one.

    @click.command("prune")
    @click.argument("model")
    @loading_options
    def command(model, load_options, ...):
        from moetool.runtime.loading import load_model
        loaded = load_model(model, **load_options)

The decorator adds --dtype, --device-map, --max-memory, --offload-folder, --load-in-4bit,
--load-in-8bit, --trust-remote-code, --allow-pickle, --stream/--no-stream, --run-dir and --resume,
and hands them to the command as one dict, ``load_options``, whose keys are ``load_model``'s
keyword arguments. --progress/--no-progress sets moetool.runtime.progress's default for the process (with
neither, progress shows when stderr is a terminal and the command is not printing --json).
"""

from __future__ import annotations

import functools

import click

from moetool.runtime.loading import DTYPES

OPTION_NAMES = ("dtype", "device_map", "max_memory", "offload_folder", "load_in_4bit", "load_in_8bit",
                "trust_remote_code", "allow_pickle", "stream", "run_dir", "resume")

_OPTIONS = [
    click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                 help="Weight dtype to load in (auto = the checkpoint's)."),
    click.option("--device-map", "device_map", default=None, metavar="MAP",
                 help="auto, balanced, sequential, cpu, cuda:N, a JSON object, or a JSON file of module -> device."),
    click.option("--max-memory", "max_memory", default=None, metavar="BUDGET",
                 help="Memory budget per device, e.g. '0=20GiB,cpu=64GiB'; what does not fit is offloaded "
                      "to disk (implies --device-map auto)."),
    click.option("--offload-folder", "offload_folder", default=None, type=click.Path(file_okay=False),
                 help="Where disk-offloaded weights go (default: a temporary directory, removed at exit)."),
    click.option("--load-in-4bit", "load_in_4bit", is_flag=True,
                 help="Quantize to 4 bits on load (bitsandbytes NF4, fused experts included)."),
    click.option("--load-in-8bit", "load_in_8bit", is_flag=True,
                 help="Quantize to 8 bits on load (bitsandbytes LLM.int8 linear layers, int8 fused experts)."),
    click.option("--trust-remote-code", "trust_remote_code", is_flag=True,
                 help="Allow the checkpoint's own Python code to run (off by default)."),
    click.option("--allow-pickle", "allow_pickle", is_flag=True,
                 help="Read pickled weights (.bin/.pt) when there are no safetensors, with torch's weights_only "
                      "loader (off by default: moetool never unpickles unless asked)."),
    click.option("--stream/--no-stream", "stream", default=None,
                 help="Run the model one decoder layer at a time, reading each layer's weights from disk "
                      "(default: when the weights do not fit the memory given: --max-memory, else the free memory; "
                      "see docs/streaming.md)."),
    click.option("--run-dir", "run_dir", default=None, type=click.Path(file_okay=False),
                 help="Checkpoint a layer-by-layer run here after every layer (see --resume)."),
    click.option("--resume", "resume", is_flag=True,
                 help="Continue an interrupted layer-by-layer run from its --run-dir."),
    click.option("--progress/--no-progress", "progress_flag", default=None,
                 help="Progress on stderr (default: when stderr is a terminal and not --json)."),
]


_RUN_OPTIONS = ("stream", "run_dir", "resume")


def loading_options(func=None, *, stream: bool = True, checkpoints: bool = True):
    """Add the loading options to a click command; the command receives ``load_options``.
    ``stream=False``: without --stream/--run-dir/--resume (a command that needs the whole model
    in memory); ``checkpoints=False``: --stream/--no-stream without --run-dir/--resume (a command
    with checkpoints and a --resume of its own, e.g. distill)."""
    if func is None:
        return functools.partial(loading_options, stream=stream, checkpoints=checkpoints)
    dropped = _RUN_OPTIONS if not stream else () if checkpoints else ("run_dir", "resume")
    names = tuple(n for n in OPTION_NAMES if n not in dropped)
    options = [o for o, n in zip(_OPTIONS, _OPTION_DESTS) if n not in dropped]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from moetool.runtime import progress

        load_options = {name: kwargs.pop(name) for name in names}
        flag = kwargs.pop("progress_flag")
        progress.set_default(flag if flag is not None else (False if kwargs.get("as_json") else None))
        return func(*args, load_options=load_options, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


_OPTION_DESTS = OPTION_NAMES + ("progress_flag",)  # one per entry of _OPTIONS, in order

_CALIBRATION_OPTIONS = [
    click.option("--trace", "trace", type=click.Path(dir_okay=False), default=None,
                 help="Routing statistics from a trace file (`moetool trace --out`; router logits too if it was "
                      "recorded with --logits)."),
    click.option("--file", "file", type=click.Path(dir_okay=False), default=None,
                 help="Calibration text to trace (one text per line, or JSONL with a 'text' field)."),
    click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Calibrate on at most this many tokens."),
    click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Texts per forward pass."),
    click.option("--accept-foreign-trace", "accept_foreign_trace", is_flag=True,
                 help="Use a --trace recorded on another model (its router weights or routing config differ); "
                      "refused by default."),
]


def calibration_options(func):
    """Add --trace, --file, --max-tokens, --batch-size and --accept-foreign-trace (where routing statistics come from),
    shared by the commands that choose or combine experts."""
    for option in reversed(_CALIBRATION_OPTIONS):
        func = option(func)
    return func
