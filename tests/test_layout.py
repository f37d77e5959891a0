"""The package layout is the architecture (docs/architecture.md): commands -> compression / analysis
-> runtime -> checkpoint / families -> errors / units. An import against that order (including
one inside a function) fails here, naming the module that made it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moetool"

# group -> the groups it may import (besides itself)
ALLOWED = {
    "cli": {"commands", "errors", "version"},
    "commands": {"render", "compression", "analysis", "runtime", "checkpoint", "families", "errors", "units", "version"},
    "render": {"compression", "analysis", "families", "errors", "units"},
    "compression": {"analysis", "runtime", "checkpoint", "families", "errors", "units", "version"},
    "analysis": {"runtime", "checkpoint", "families", "errors", "units", "version"},
    "runtime": {"checkpoint", "families", "errors", "units"},
    "checkpoint": {"families", "errors", "units", "version"},
    "families": {"errors"},
    "units": {"errors"},
    "errors": set(),
}


def _group(dotted: str) -> str:
    parts = dotted.split(".")
    if len(parts) == 1 or parts[1] == "__version__":
        return "version"
    return parts[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moetool":
            if node.module == "moetool":
                yield from (f"moetool.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "moetool")


def _edges():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target in _imports(path):
            yield source, target


def test_every_group_is_known():
    groups = {_group(s) for s, _ in _edges() if s != "moetool"} | {_group(t) for _, t in _edges()}
    assert groups <= set(ALLOWED) | {"version"}, f"new subpackage without a place in the layout: {groups - set(ALLOWED)}"


def test_no_import_goes_against_the_layers():
    wrong = [f"{s} imports {t}" for s, t in _edges()
             if s != "moetool" and _group(s) != _group(t) and _group(t) not in ALLOWED[_group(s)]]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_function_level_imports(tmp_path):
    # the rule would be toothless if imports inside functions were invisible to it
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from moetool.compression.prune import prune\n")
    assert list(_imports(probe)) == ["moetool.compression.prune"]
