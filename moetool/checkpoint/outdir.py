"""Where moetool writes: checks before any work, atomic output directories, clean-up of what an
interrupted run left, and the marker that says a directory is moetool's own.

Every command that writes a directory (prune, merge-experts, distill) goes through here:

- ``check_output`` runs before anything expensive: OUT is not the current directory (or one
  above it), not inside or around an input, its parent exists and can be written (a real
  probe: a read-only file system or a permission problem is said as such), and an existing OUT
  is replaced only with ``--force`` and only if moetool wrote it (it holds ``moetool.json``)
  or it is empty. Temporary directories that a killed run left beside OUT
  (``.OUT.tmp-PID-*``, ``.OUT.old-PID-*`` of a process that no longer runs) are removed, and
  the removal is said on stderr.
- ``atomic_output_dir`` yields a temporary directory beside OUT (mode from the umask, like any
  directory the user creates), writes the marker into it, and moves it into place only when
  complete; any failure, Ctrl-C or SIGTERM removes it.

Single output files (a trace, a device map) use ``check_output_file`` and ``atomic_file``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterable

from moetool.errors import MoetoolError, Terminated, warn

MARKER = "moetool.json"  # written into every output directory: --force may replace only these
_STALE_RX = re.compile(r"\.(?:tmp|old)-?(\d+)(?:-|$)")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dir_mode() -> int:
    return 0o777 & ~umask()


def file_mode() -> int:
    """The mode a file created by open() gets: 0666 less the umask."""
    return 0o666 & ~umask()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's running process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def clean_stale(parent: Path, name: str) -> list[str]:
    """Remove ``.NAME.tmp-PID...`` / ``.NAME.old-PID...`` (and a trace's ``.NAME.tmpPID``) in
    PARENT whose process no longer runs: what a killed run left. Says so on stderr; returns
    the names removed. Leftovers without a process id (older moetool) are named, not removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    prefix = f".{name}."
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        m = _STALE_RX.match(p.name[len(prefix) - 1:])
        if m is None:
            if re.match(r"\.(tmp|old)-", p.name[len(prefix) - 1:]):
                warn(f"{p} looks like what an interrupted moetool run left; remove it if no run is writing {name}")
            continue
        if _pid_alive(int(m.group(1))):
            continue
        size = _size(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        if not p.exists():
            from moetool.units import human_bytes

            warn(f"removed {p} ({human_bytes(size)}), left by an interrupted run")
            removed.append(p.name)
    return removed


def _is_cwd_or_above(path: Path) -> bool:
    cwd = Path.cwd().resolve()
    return path == cwd or path in cwd.parents


def probe_writable(directory: Path, what: str) -> None:
    """Create and remove a directory in DIRECTORY: a read-only file system, a permission
    problem or a missing directory is one line naming the cause, before any work."""
    try:
        probe = tempfile.mkdtemp(prefix=".moetool-probe-", dir=directory)
        os.rmdir(probe)
    except OSError as exc:
        raise MoetoolError(f"{what}: cannot write in {directory} ({exc.strerror or exc})") from None


def check_output(out: str | Path, inputs: Iterable[Path], force: bool) -> Path:
    """Refuse an OUT that exists (without FORCE, or not written by moetool), is a file, is the
    current directory or above it, overlaps an input, or cannot be written. Removes what an
    interrupted run left beside it. Returns OUT as a Path."""
    out = Path(out).expanduser()
    real = out.resolve()
    if not out.name or _is_cwd_or_above(real):
        raise MoetoolError(f"--out {out} is the current directory or one above it; name a new directory")
    parent = real.parent
    if not parent.is_dir():
        raise MoetoolError(f"--out {out}: directory {parent} does not exist")
    for inp in inputs:
        src = Path(inp).resolve()
        if real == src or src in real.parents or real in src.parents:
            raise MoetoolError(f"--out {out} overlaps the input checkpoint {inp}; write somewhere else")
    if out.exists() or out.is_symlink():
        if not force:
            raise MoetoolError(f"--out {out} already exists (use --force to replace it)")
        if not out.is_dir() or out.is_symlink():
            raise MoetoolError(f"--out {out} exists and is not a directory; not replacing it")
        check_replaceable(out)
    probe_writable(parent, f"--out {out}")
    clean_stale(parent, out.name)
    return out


def check_replaceable(out: Path) -> None:
    """--force replaces only an empty directory or one that moetool wrote (it holds MARKER)."""
    if (out / MARKER).is_file() or not any(out.iterdir()):
        return
    raise MoetoolError(f"--out {out} exists and was not written by moetool (no {MARKER} in it); --force replaces "
                       "only moetool's own outputs: remove it yourself or choose another --out")


def marker(command: str, **details) -> dict:
    from moetool import __version__

    return {"written_by": f"moetool {__version__}", "command": command, **details}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool, mark: dict | None = None):
    """Yield a temporary directory beside OUT; on success write MARK (moetool.json) into it
    and move it to OUT (replacing OUT with FORCE, if moetool wrote it), on any failure remove
    it. SIGTERM is turned into a clean failure meanwhile."""
    out = Path(out)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    os.chmod(tmp, _dir_mode())  # mkdtemp makes 0700; an output is a directory like any other
    previous = None
    in_main = _in_main_thread()
    if in_main:
        def on_term(signum, frame):
            raise Terminated()

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps(mark or marker("unknown"), indent=1, default=str) + "\n")
        if out.exists():
            if not force:
                raise MoetoolError(f"--out {out} appeared while writing (use --force to replace it)")
            check_replaceable(out)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_disk_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    margin = 16 * 2**20
    if free < needed + margin:
        from moetool.units import human_bytes

        raise MoetoolError(f"not enough disk space in {where}: the output needs {human_bytes(needed)}, "
                           f"{human_bytes(free)} free")


# -- single files ---------------------------------------------------------------------------------------------
def check_output_file(path: str | Path, flag: str) -> Path:
    """Before any work: FLAG's PATH is not a directory, its directory exists and can be
    written; leftovers of an interrupted write beside it are removed."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MoetoolError(f"{flag} {path}: is a directory; give a file name")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise MoetoolError(f"{flag} {path}: directory {path.parent} does not exist")
    probe_writable(parent, f"{flag} {path}")
    clean_stale(parent, path.name)
    return path


def tmp_file_beside(path: Path) -> Path:
    """The temporary name a file is written under before it is moved to PATH."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
