"""The command line as a whole: usage mistakes are one line on stderr like every other user
error, and a bare `moetool` prints its help."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize("args,needle", [
    (["frobnicate"], "No such command 'frobnicate'"),
    (["params", "mixtral", "--bogus"], "No such option '--bogus'"),
    (["prune"], "Missing argument 'MODEL'"),
    (["merge-experts", "fixtures/tiny-mixtral", "--out", "x", "--to", "4", "--router-row", "first"],
     "'first' is not one of 'average', 'dominant'"),
    (["params", "mixtral", "--context", "many"], "--context"),
])
def test_usage_errors_are_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    assert_one_line_error(r, needle)
    assert "--help" in r.stderr  # where to look next


def test_bare_command_prints_help():
    r = run_cli()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: moetool") and "params" in r.stdout and "prune" in r.stdout
