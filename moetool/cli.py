"""Command line entry point.

Commands live one per module in ``moetool.commands`` and are imported only when run, so
`moetool params` never pays for torch or transformers.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

import click

from moetool import __version__
from moetool.errors import MoetoolError, Terminated, first_line

_COMMANDS_DIR = Path(__file__).parent / "commands"


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(p.stem.replace("_", "-") for p in _COMMANDS_DIR.glob("*.py") if not p.stem.startswith("_"))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.list_commands(ctx):
            return None
        module = importlib.import_module(f"moetool.commands.{name.replace('-', '_')}")
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moetool")
def cli() -> None:
    """Inspect and compress Mixture-of-Experts checkpoints."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, no traceback.

    Exit status (docs/promises.md): 0 done; 2 bad input or an environment that refused (one
    `error:` line); 1 a bug (one line unless MOETOOL_DEBUG=1); 130 Ctrl-C; 143 SIGTERM. Both
    signals run the same cleanup as any failure (temporary outputs removed)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        previous = None
    try:
        _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, prog_name="moetool", standalone_mode=False)
    except MoetoolError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click wraps the signal in Abort
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("terminated", err=True)
            sys.exit(143)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `moetool`: the help, as click prints it
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(0)
    except click.exceptions.UsageError as exc:  # bad option or argument: one line, like every user error
        where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:  # full disk, permissions: the environment, not a bug; say what it did
        click.echo(f"error: {os_error_message(exc)}", err=True)
        sys.exit(2)
    except Exception as exc:  # a bug: still one line unless debugging
        if type(exc).__name__ == "SafetensorError":  # a damaged file that slipped past the header checks
            click.echo(f"error: corrupt safetensors file ({first_line(exc, with_type=False)})", err=True)
            sys.exit(2)
        if os.environ.get("MOETOOL_DEBUG"):
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (set MOETOOL_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


def os_error_message(exc: OSError) -> str:
    """'cannot write /x/y: Read-only file system': what the environment did, and to which path."""
    what = exc.strerror or str(exc)
    return f"{exc.filename}: {what}" if exc.filename else what


if __name__ == "__main__":
    main()
