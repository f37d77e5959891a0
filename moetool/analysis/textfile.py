"""Reading a user's text file (calibration, training or evaluation text) with one-line errors."""

from __future__ import annotations

from pathlib import Path

from moetool.errors import MoetoolError


def read_utf8(path: str | Path, label: str | None = None) -> str:
    """The whole file as text; a missing, unreadable or non-UTF-8 file is a MoetoolError that
    starts with LABEL (default: the path)."""
    label = label or str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoetoolError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise MoetoolError(f"{label}: is a directory, not a text file") from None
    except UnicodeDecodeError:
        raise MoetoolError(f"{label}: not UTF-8 text") from None
    except OSError as exc:
        raise MoetoolError(f"{label}: cannot read ({exc.strerror})") from None
