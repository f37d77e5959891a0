"""Command line entry point.

Commands live one per module in ``moetool.commands`` and are imported only when run, so
`moetool params` never pays for torch or transformers.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from moetool import __version__
from moetool.errors import MoetoolError

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


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, no traceback."""
    try:
        cli.main(args=argv, prog_name="moetool", standalone_mode=False)
    except MoetoolError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
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
    except OSError as exc:  # full disk, permissions: the environment, not a bug
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: still one line unless debugging
        if os.environ.get("MOETOOL_DEBUG"):
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (set MOETOOL_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
