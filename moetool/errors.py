"""The exception types the CLI turns into a one-line error and an exit status (docs/promises.md)."""


class MoetoolError(Exception):
    """A problem with the user's input or environment, worded for the user (one line): exit 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C: exit 143."""


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (library code that must tell the user something
    without failing: a stale temporary directory removed, a trace without a fingerprint)."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(exc: BaseException, with_type: bool = True) -> str:
    """The first line of an exception's message for a one-line error, after its type name
    unless ``with_type`` is False; the type name alone when the message is empty."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text[0]}" if with_type else text[0]
