"""Progress on stderr for every phase that can take more than a second (loading, calibration,
tracing, evaluation): tokens processed / total, the decoder layer being run, the rate and the
time left, drawn by rich.

Shown when stderr is a terminal, unless the command runs with ``--json`` or ``--no-progress``;
``--progress`` shows it even when stderr is not a terminal (a log file). The CLI sets the
process default once per invocation (``set_default``); library callers pass ``enabled``.
"""

from __future__ import annotations

import contextlib
import sys
import time

_DEFAULT: bool | None = None  # None: auto (stderr is a terminal)


def set_default(enabled: bool | None) -> None:
    """What ``enabled=None`` means for this process (the CLI's --progress/--no-progress/--json)."""
    global _DEFAULT
    _DEFAULT = enabled


def is_enabled(enabled: bool | None = None) -> bool:
    if enabled is None:
        enabled = _DEFAULT
    if enabled is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(enabled)


class _Null:
    """The no-op progress: every call accepted, nothing drawn."""

    def task(self, *a, **k):
        return self

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


NULL = _Null()


class Progress:
    """A rich progress display with one task per phase. ``task(description, total, unit)``
    returns a handle with ``advance(n)`` and ``update(description=..., info=...)``."""

    def __init__(self, transient: bool = True, force: bool = False):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=Console(stderr=True, force_terminal=True if force else None), transient=transient)
        self._bar.start()

    def task(self, description: str, total: int | None, unit: str = "tokens", info: str = "") -> "_Task":
        return _Task(self._bar, self._bar.add_task(description, total=total, unit=unit, rate="", info=info), unit)

    def close(self):
        self._bar.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Task:
    def __init__(self, bar, task_id, unit: str):
        self.bar, self.id, self.unit = bar, task_id, unit
        self.t0 = time.perf_counter()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        dt = time.perf_counter() - self.t0
        rate = f"{self.done / dt:,.0f} {self.unit}/s" if dt > 0.2 else ""
        self.bar.update(self.id, advance=n, rate=rate)

    def update(self, **fields) -> None:
        self.bar.update(self.id, **fields)

    def close(self) -> None:
        self.bar.update(self.id, visible=False)


def open_progress(enabled: bool | None = None):
    """A Progress when enabled (see the module docstring), else the no-op one."""
    if not is_enabled(enabled):
        return NULL
    return Progress(force=(enabled is True or (enabled is None and _DEFAULT is True)))


@contextlib.contextmanager
def status(message: str, enabled: bool | None = None):
    """A spinner with MESSAGE while a step without a measurable total runs (loading)."""
    if not is_enabled(enabled):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
