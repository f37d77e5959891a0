from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
TINY = sorted(p for p in FIXTURES.glob("tiny-*") if p.is_dir())


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (what a user runs)."""
    return subprocess.run(
        [sys.executable, "-m", "moetool.cli", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )


def params_without_torch(model) -> tuple[subprocess.CompletedProcess, float]:
    """`moetool params MODEL --json` in a fresh interpreter that fails if torch or transformers
    got imported; returns the result and the process's wall time in seconds."""
    import time

    code = (
        "import sys; from moetool.cli import main\n"
        f"try:\n    main(['params', {str(model)!r}, '--json'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return result, time.perf_counter() - t0


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str = "") -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.fixture(params=TINY, ids=[p.name for p in TINY])
def tiny_fixture(request) -> Path:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _moetool_cache(tmp_path_factory):
    """Derived family specs and the families scan go to a per-session cache, never ~/.cache."""
    import os

    old = os.environ.get("MOETOOL_CACHE_DIR")
    os.environ["MOETOOL_CACHE_DIR"] = str(tmp_path_factory.mktemp("moetool-cache"))
    yield
    if old is None:
        os.environ.pop("MOETOOL_CACHE_DIR", None)
    else:
        os.environ["MOETOOL_CACHE_DIR"] = old
