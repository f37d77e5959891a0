"""A table of bad inputs that every command is run against (docs/promises.md).

Every command the CLI lists is run on every bad checkpoint below, in-process through
``moetool.cli.main`` (what the console script runs): each must end with one ``error:`` line on
stderr naming the problem, exit status 2, no traceback, the input unchanged and no output
written. A command this table does not know yet is run as ``moetool COMMAND MODEL``, so a new
command inherits these checks the day it is added; give it a row in ARGS when it needs more
(or ``None`` for a command that reads no model at all, with the reason beside it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import FIXTURES
from moetool.cli import LazyGroup, main

MIXTRAL = FIXTURES / "tiny-mixtral"
TEXT = FIXTURES / "corpus" / "heldout-prose.txt"

# how each command is run on MODEL ({out}: a fresh output path, {text}: a small text file)
ARGS: dict[str, list[str] | None] = {
    "params": ["{model}"],
    "plan": ["{model}", "--gpu-memory", "1GiB"],
    "trace": ["{model}", "--prompt", "hello world", "--out", "{out}.safetensors"],
    "prune": ["{model}", "--out", "{out}", "--keep", "2", "--by", "random"],
    "merge-experts": ["{model}", "--out", "{out}", "--to", "2", "--similarity", "weight", "--file", "{text}"],
    "eval": ["{model}", "--file", "{text}"],
    "distill": ["{model}", "--out", "{out}", "--file", "{text}", "--steps", "0"],
    "heal": ["{model}", "--ref", str(MIXTRAL), "--file", "{text}", "--out", "{out}"],
}


# -- the bad inputs: each a function that turns a copy of tiny-mixtral into a bad checkpoint -----------
def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: Path, index: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def incomplete(d: Path) -> None:
    """One shard's entries gone from the index (its file still there): q_proj, v_proj, a norm."""
    index = _index(d)
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    _write_index(d, index)


def missing_shard(d: Path) -> None:
    index = _index(d)
    (d / sorted(set(index["weight_map"].values()))[0]).unlink()


def truncated_shard(d: Path) -> None:
    shard = d / sorted(set(_index(d)["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


def absurd_header(d: Path) -> None:
    shard = d / sorted(set(_index(d)["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**60) + data[8:])


def pickle_only(d: Path) -> None:
    for p in d.glob("*.safetensors*"):
        p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"never unpickled")


def negative_experts(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = -4
    (d / "config.json").write_text(json.dumps(cfg))


def top_k_above_experts(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (d / "config.json").write_text(json.dumps(cfg))


def malformed_config(d: Path) -> None:
    (d / "config.json").write_text("{not json")


def no_config(d: Path) -> None:
    (d / "config.json").unlink()


def dense_model(d: Path) -> None:
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))


# input -> (needle in the error, {command: None (not an error for it: exit 0)})
BAD = {
    incomplete: ("incomplete checkpoint", {"params": None}),  # params counts what is there (and warns)
    missing_shard: ("which is missing", {}),
    truncated_shard: ("truncated", {}),
    absurd_header: ("corrupt safetensors header", {}),
    pickle_only: ("pickled weights", {"params": None, "plan": None}),  # config-only counts, no weights read
    negative_experts: ("num_local_experts = -4", {}),
    top_k_above_experts: ("num_experts_per_tok = 9", {}),
    malformed_config: ("malformed JSON", {}),
    no_config: ("no config.json", {}),
    dense_model: ("dense model", {}),
}


NO_MODEL = {"families"}  # commands that read no model (moetool families lists what transformers has)


def _commands() -> list[str]:
    return [c for c in LazyGroup().list_commands(None) if c not in NO_MODEL]


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for make in BAD:
        d = root / make.__name__
        shutil.copytree(MIXTRAL, d)
        make(d)
        out[make.__name__] = d
    return out


def test_the_table_knows_what_is_tested():
    """The CLI's commands are discovered, so a new command is in the table below on its own."""
    assert set(ARGS) <= set(_commands())


@pytest.mark.parametrize("command", _commands())
@pytest.mark.parametrize("bad", list(BAD), ids=[f.__name__ for f in BAD])
def test_every_command_refuses_bad_input(command, bad, bad_checkpoints, tmp_path, capsys):
    model = bad_checkpoints[bad.__name__]
    needle, exceptions = BAD[bad]
    out = tmp_path / "out"
    template = ARGS.get(command, ["{model}"])
    if template is None:
        pytest.skip(f"{command} reads no model")
    args = [a.format(model=model, out=out, text=TEXT) for a in template]
    before = _digest(model)
    code = 0
    try:
        main([command, *args])
    except SystemExit as exc:
        code = exc.code or 0
    err = capsys.readouterr().err
    assert _digest(model) == before, "the input was modified"
    assert not out.exists() and not Path(f"{out}.safetensors").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary litter
    if command in exceptions:
        assert code == 0, err
        return
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
