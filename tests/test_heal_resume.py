"""heal --run-dir / --resume: a heal killed by a real signal after healing a layer (before that
layer's checkpoint) resumes to the same checkpoint, byte for byte, and the same per-layer results
as an uninterrupted run; resident and streamed; `prune --heal` too; a resume of another heal is
refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT, assert_one_line_error, run_cli

CALIB = FIXTURES / "corpus" / "train-prose.txt"
FAST = dict(router_steps=3, experts_steps=3, holdout=0.0)
TIMINGS = ("seconds", "fit_seconds")

# A child that heals (heal_checkpoint, or prune_checkpoint with heal=True) and SIGKILLs itself right
# after layer KILL_AT is healed (its tensors already in the store, its checkpoint not yet written).
_CHILD = r"""
import json, os, signal, sys
from moetool.compression import heal
what, args, kill_at, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
layer_end = heal.HealObserver.layer_end

def killing_layer_end(self, layer):
    changed = layer_end(self, layer)
    if layer == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return changed

heal.HealObserver.layer_end = killing_layer_end
args["options" if what == "heal" else "heal_options"] = heal.HealOptions(**args.pop("opts"))
if what == "heal":
    result = heal.heal_checkpoint(**args)
else:
    from moetool.compression.prune import prune_checkpoint
    result = prune_checkpoint(**args)
json.dump(result, open(out, "w"))
"""


def _child(what: str, args: dict, kill_at: int, out: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _CHILD, what, json.dumps(args), str(kill_at), str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def _calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(CALIB.read_text()[:6000])
    return path


def _prune(src: Path, out: Path, seed: int = 3) -> None:
    from moetool.compression.prune import prune_checkpoint

    prune_checkpoint(str(src), str(out), keep=4, by="random", seed=seed, regroup=True, progress=False, force=True)


def _weights(d: Path) -> dict:
    """{file name: bytes} of the checkpoint's safetensors files."""
    return {f.name: f.read_bytes() for f in sorted(d.glob("*.safetensors"))}


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _last_moe_layer(src: Path) -> int:
    from moetool.compression.surgery import Checkpoint

    return int(max(Checkpoint(str(src)).rc.moe_layers))


@pytest.mark.parametrize("stream", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("fixture", ["tiny-mixtral", "tiny-deepseek-v3"])
def test_heal_killed_by_a_signal_resumes_to_the_same_checkpoint(fixture, stream, tmp_path):
    from moetool.compression.heal import HealOptions, heal_checkpoint

    src = FIXTURES / fixture
    pruned = tmp_path / "pruned"
    _prune(src, pruned)
    calib = _calib(tmp_path)
    args = dict(compressed=str(pruned), ref=str(src), file=str(calib), max_tokens=200, progress=False)
    # uninterrupted, no run directory
    full = heal_checkpoint(**args, out=str(tmp_path / "full"), options=HealOptions(**FAST),
                           load_options={"stream": stream})
    assert full["streamed"] is stream
    run = tmp_path / "run"
    kill_at = _last_moe_layer(src)  # layer 0 (mixtral) or layer 1 (deepseek, layer 0 dense) healed before
    killed = _child("heal", {**args, "out": str(tmp_path / "resumed"), "opts": FAST,
                             "load_options": {"stream": stream, "run_dir": str(run)}}, kill_at, tmp_path / "never.json")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "resumed").exists()
    state = json.loads(next(run.rglob("state.json")).read_text())
    assert state["next_layer"] == kill_at  # the killed layer was healed, not checkpointed
    heal_state = state["observers"][0]
    assert [r["layer"] for r in heal_state["rows"]] == [r["layer"] for r in full["layers"]][:-1]
    layer_files = sorted(p.name for p in run.rglob("healed-layers/layer-*"))
    assert f"layer-{kill_at:05d}.safetensors" in layer_files  # written before the kill: must be redone, not trusted
    resumed = heal_checkpoint(**args, out=str(tmp_path / "resumed"), options=HealOptions(**FAST),
                              load_options={"stream": stream, "run_dir": str(run), "resume": True})
    assert _weights(tmp_path / "resumed") == _weights(tmp_path / "full")  # byte for byte
    assert resumed["tensors_rewritten"] == full["tensors_rewritten"] > 0
    assert _untimed(resumed["layers"]) == _untimed(full["layers"])
    assert _untimed({**resumed, "out": None}) == _untimed({**full, "out": None})
    # the run directory stays (as every command's): a second resume rewrites the same checkpoint at once
    assert next(run.rglob("state.json")).is_file()
    again = heal_checkpoint(**args, out=str(tmp_path / "again"), options=HealOptions(**FAST),
                            load_options={"stream": stream, "run_dir": str(run), "resume": True})
    assert _weights(tmp_path / "again") == _weights(tmp_path / "full")
    assert _untimed(again["layers"]) == _untimed(full["layers"])
    assert not list(tmp_path.glob(".*"))  # no temporary directories beside the outputs


def test_prune_heal_killed_in_the_heal_resumes_to_the_same_checkpoint(tmp_path):
    """prune --heal --run-dir: the calibration and the heal both checkpoint under the run directory;
    the unhealed surgery output is RUN/unhealed (written again on resume, the same)."""
    from moetool.compression.heal import HealOptions
    from moetool.compression.prune import prune_checkpoint

    src = FIXTURES / "tiny-mixtral"
    calib = _calib(tmp_path)
    args = dict(model=str(src), keep=4, by="frequency", file=str(calib), max_tokens=200, progress=False, heal=True)
    full = prune_checkpoint(**args, out=str(tmp_path / "full"), heal_options=HealOptions(**FAST),
                            load_options={"run_dir": str(tmp_path / "run-full")})
    assert not (tmp_path / "run-full" / "unhealed").exists()  # removed after success; checkpoints kept
    run = tmp_path / "run"
    killed = _child("prune", {**args, "out": str(tmp_path / "resumed"), "opts": FAST,
                              "load_options": {"run_dir": str(run)}}, 1, tmp_path / "never.json")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    states = {p.parent.parent.name: json.loads(p.read_text()) for p in run.rglob("state.json")}
    assert len(states) == 2  # the calibration's (finished) and the heal's (layer 0 done)
    assert sorted(s["next_layer"] for s in states.values()) == [1, 2]
    resumed = prune_checkpoint(**args, out=str(tmp_path / "resumed"), heal_options=HealOptions(**FAST),
                               load_options={"run_dir": str(run), "resume": True})
    assert _weights(tmp_path / "resumed") == _weights(tmp_path / "full")
    assert _untimed(resumed["heal"]["layers"]) == _untimed(full["heal"]["layers"])
    assert resumed["selection"]["layers"] == full["selection"]["layers"]  # the same experts kept, same scores
    assert not (run / "unhealed").exists()


def test_a_resume_of_another_heal_is_refused_in_one_line(tmp_path):
    from moetool.compression.heal import HealOptions, heal_checkpoint
    from moetool.errors import MoetoolError

    src = FIXTURES / "tiny-mixtral"
    pruned = tmp_path / "pruned"
    _prune(src, pruned)
    calib = _calib(tmp_path)
    run = tmp_path / "run"
    opts = dict(router_steps=2, experts_steps=2)
    heal_checkpoint(str(pruned), str(src), str(calib), str(tmp_path / "a"), max_tokens=200, options=HealOptions(**opts),
                    load_options={"run_dir": str(run)}, progress=False)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    # other options, through the CLI: one line, exit status 2
    res = run_cli("heal", pruned, "--ref", src, "--file", calib, "--max-tokens", "200", "--router-steps", "1",
                  "--experts-steps", "2", "--run-dir", run, "--resume", "--out", tmp_path / "b")
    assert_one_line_error(res, "options.router_steps")
    assert res.returncode == 2
    res = run_cli("heal", pruned, "--ref", src, "--file", calib, "--resume", "--out", tmp_path / "b")
    assert_one_line_error(res, "--resume needs --run-dir")
    assert res.returncode == 2

    def resume(max_tokens=200):
        with pytest.raises(MoetoolError) as err:
            heal_checkpoint(str(pruned), str(src), str(calib), str(tmp_path / "b"), max_tokens=max_tokens,
                            options=HealOptions(**opts), load_options={"run_dir": str(run), "resume": True},
                            progress=False)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "other text or another model" in resume(max_tokens=150)  # other text (fewer tokens)
    _prune(src, pruned, seed=4)  # another model at the same path (pruned again, other experts kept)
    assert "model differ" in resume()
    assert not (tmp_path / "b").exists()
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before  # the run dir untouched
