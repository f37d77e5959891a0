"""What moetool promises about its inputs and outputs (issue #14, docs/promises.md), one test
(or a few) per promise: incomplete checkpoints, pickles and remote code, nonsense configs,
traces of another model, checks before work, litter, exit codes and signals (real signals to a
real child process), file modes. The table of bad inputs every command is run against is
tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, assert_one_line_error, run_cli
from moetool.errors import MoetoolError

MIXTRAL = FIXTURES / "tiny-mixtral"
OLMOE = FIXTURES / "tiny-olmoe"
DSV3 = FIXTURES / "tiny-deepseek-v3"
TEXT = FIXTURES / "corpus" / "heldout-prose.txt"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rc(path: Path):
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    return resolve_family(resolve(str(path)))


# -- 1. incomplete checkpoints --------------------------------------------------------------------------------
def _drop_last_shard(d: Path) -> list[str]:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    gone = sorted(k for k, v in index["weight_map"].items() if v == last)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return gone


def test_incomplete_checkpoint_is_named_before_any_load(tmp_path):
    from moetool.checkpoint.checks import check_weights

    d = _copy(MIXTRAL, tmp_path / "m")
    gone = _drop_last_shard(d)
    with pytest.raises(MoetoolError) as exc:
        check_weights(str(d), d, _rc(d))
    msg = str(exc.value)
    assert f"{len(gone)} tensors" in msg and all(name in msg for name in gone[:3]) and "\n" not in msg
    # the command that loads says the same, before transformers is imported
    code = ("import sys\nfrom moetool.cli import main\ntry:\n    main(['trace', sys.argv[1], '--prompt', 'hi'])\n"
            "except SystemExit as e:\n    print(e.code, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr
    assert "incomplete checkpoint" in r.stderr


def test_alias_layouts_and_packed_companions_count_as_present():
    from moetool.checkpoint.checks import missing_tensors

    rc = _rc(MIXTRAL)
    names = {t.name for t in rc.family.tensors(rc)}
    fused = {n for n in names if ".block_sparse_moe.experts." not in n}
    fused |= {f"model.layers.{L}.mlp.experts.{p}" for L in rc.moe_layers for p in ("gate_up_proj", "down_proj")}
    assert missing_tensors(rc, fused)[0] == []  # transformers-5 fused experts on disk
    assert missing_tensors(rc, fused - {"model.layers.1.self_attn.k_proj.weight"})[0] == [
        "model.layers.1.self_attn.k_proj.weight"]
    per_expert = names - {"model.layers.0.block_sparse_moe.experts.3.w2.weight"}
    assert missing_tensors(rc, per_expert)[0] == ["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    oss = _rc(FIXTURES / "tiny-gpt-oss")
    mx = set()
    for t in oss.family.tensors(oss):
        if t.name.endswith(("gate_up_proj", "down_proj")):  # gpt-oss MXFP4: blocks + scales instead
            mx |= {t.name + "_blocks", t.name + "_scales"}
        else:
            mx.add(t.name)
    assert missing_tensors(oss, mx)[0] == []


def test_a_load_with_unexpected_or_missing_keys_is_an_error(tmp_path):
    """Headers complete but a key transformers does not know: not a silent load."""
    import torch
    from safetensors.torch import save_file

    from moetool.runtime.loading import check_loading_info, load_model

    d = _copy(MIXTRAL, tmp_path / "m")
    save_file({"model.layers.0.self_attn.surplus.weight": torch.zeros(2, 2)}, str(d / "extra.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.surplus.weight"] = "extra.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoetoolError, match="surplus.weight"):
        load_model(str(d))
    with pytest.raises(MoetoolError, match=r"2 weights missing from the checkpoint \(transformers would initialise them at random\): a.weight, b.weight"):
        check_loading_info("m", {"missing_keys": {"b.weight", "a.weight"}, "unexpected_keys": set()})


# -- 2. pickles and remote code ---------------------------------------------------------------------------------
def _pickled_copy(tmp_path: Path, state: dict | None = None) -> Path:
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MIXTRAL / name, d / name)
    if state is None:
        state = {}
        for f in MIXTRAL.glob("*.safetensors"):
            state.update(load_file(str(f)))
    torch.save(state, d / "pytorch_model.bin")
    return d


def test_pickles_only_when_asked_and_then_weights_only(tmp_path):
    from moetool.analysis.trace import trace_model

    d = _pickled_copy(tmp_path)
    for cmd in (["trace", d, "--prompt", "hi"], ["eval", d, "--file", TEXT],
                ["distill", d, "--out", tmp_path / "o", "--file", TEXT]):
        assert_one_line_error(run_cli(*cmd), "--allow-pickle")
    asked, _ = trace_model(str(d), ["the same routing"], load_options={"allow_pickle": True})
    safe, _ = trace_model(str(MIXTRAL), ["the same routing"])
    for L in safe.moe_layers:
        assert (asked.experts[L] == safe.experts[L]).all()


def test_a_cached_hub_id_gets_the_same_checks(tmp_path):
    """A Hub id in the local cache resolves to its snapshot: pickles and holes are refused there too."""
    hub = tmp_path / "hub"
    holey = _copy(MIXTRAL, tmp_path / "holey")
    _drop_last_shard(holey)
    for repo_id, snapshot in (("acme/pickled", _pickled_copy(tmp_path, state={})), ("acme/holey", holey)):
        repo = hub / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(snapshot, repo / "snapshots" / "abc123")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("abc123")
    env = dict(os.environ, HF_HUB_CACHE=str(hub))
    assert_one_line_error(run_cli("trace", "acme/pickled", "--prompt", "hi", env=env), "--allow-pickle")
    assert_one_line_error(run_cli("eval", "acme/holey", "--file", TEXT, env=env), "incomplete checkpoint")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_allow_pickle_never_runs_code_from_the_pickle(tmp_path):
    marker = tmp_path / "pwned"
    d = _pickled_copy(tmp_path, state={"model.embed_tokens.weight": _Evil(str(marker))})
    r = run_cli("trace", d, "--prompt", "hi", "--allow-pickle")
    assert_one_line_error(r, "cannot load")
    assert r.returncode == 2 and not marker.exists()


def test_remote_code_runs_only_when_asked(tmp_path):
    marker = tmp_path / "remote-code-ran"
    d = _copy(MIXTRAL, tmp_path / "m")
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import MixtralForCausalLM as EvilForCausalLM\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("trace", d, "--prompt", "hi", "--json")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


# -- 3. nonsense configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture,change,needle", [
    (MIXTRAL, {"num_local_experts": -4}, "num_local_experts = -4"),
    (MIXTRAL, {"num_experts_per_tok": 0}, "num_experts_per_tok = 0"),
    (MIXTRAL, {"num_experts_per_tok": 9}, "top-k cannot exceed"),
    (MIXTRAL, {"hidden_size": "32"}, "hidden_size"),
    (MIXTRAL, {"num_attention_heads": 0}, "num_attention_heads = 0"),
    (MIXTRAL, {"num_key_value_heads": -2}, "num_key_value_heads = -2"),
    (MIXTRAL, {"vocab_size": 2.5}, "vocab_size = 2.5"),
    (DSV3, {"n_group": 3}, "n_group = 3"),
    (DSV3, {"topk_group": 5}, "topk_group = 5"),
    (DSV3, {"n_routed_experts": -1}, "n_routed_experts = -1"),
    (DSV3, {"moe_intermediate_size": 0}, "moe_intermediate_size = 0"),
])
def test_nonsense_configs_are_one_line_naming_the_key(tmp_path, fixture, change, needle):
    cfg = json.loads((fixture / "config.json").read_text())
    cfg.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    for cmd in (["params", path], ["plan", path, "--gpu-memory", "1GiB"]):
        r = run_cli(*cmd)
        assert r.returncode == 2
        assert_one_line_error(r, needle)


def test_every_preset_and_fixture_is_valid():
    from moetool.analysis.params import list_presets

    assert len(list_presets()) >= 10
    for d in sorted(FIXTURES.glob("t*-*")):
        if (d / "config.json").is_file():
            _rc(d)


# -- 4. a trace of another model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    from moetool.analysis.trace import trace_model

    root = tmp_path_factory.mktemp("traces")
    out = {}
    for name, path in (("mixtral", MIXTRAL), ("olmoe", OLMOE)):
        trace, _ = trace_model(str(path), ["a trace of this model", "and another text"])
        trace.save(root / f"{name}.safetensors")
        out[name] = root / f"{name}.safetensors"
        old = type(trace)(trace.token_ids, trace.sequence, trace.position, trace.decode, trace.experts,
                          trace.weights, trace.logits, {k: v for k, v in trace.meta.items() if k != "model_fingerprint"})
        old.save(root / f"{name}-old.safetensors")
        out[f"{name}-old"] = root / f"{name}-old.safetensors"
    return out


def test_a_trace_carries_its_model_fingerprint(traces, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from moetool.checkpoint.fingerprint import model_fingerprint
    from moetool.analysis.trace import Trace

    recorded = Trace.load(traces["mixtral"]).meta["model_fingerprint"]
    assert recorded == model_fingerprint(_rc(MIXTRAL), MIXTRAL)
    copy = _copy(MIXTRAL, tmp_path / "elsewhere")  # the same model somewhere else: the same fingerprint
    assert model_fingerprint(_rc(copy), copy) == recorded
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    name = "model.layers.1.block_sparse_moe.gate.weight"
    shard = copy / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name] + np.float32(1e-3)  # one router nudged: another model
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert model_fingerprint(_rc(copy), copy) != recorded


def test_a_trace_of_another_model_is_refused_unless_accepted(traces, tmp_path):
    foreign = traces["mixtral"]
    for cmd in (["prune", OLMOE, "--trace", foreign, "--keep", "4", "--out", tmp_path / "p"],
                ["merge-experts", OLMOE, "--trace", foreign, "--to", "4", "--similarity", "weight", "--out", tmp_path / "m"],
                ["plan", OLMOE, "--trace", foreign, "--gpu-memory", "1GiB"],
                ["distill", OLMOE, "--trace", foreign, "--out", tmp_path / "d", "--file", TEXT],
                ["trace", "show", foreign, "--model", OLMOE]):
        r = run_cli(*cmd)
        if cmd[0] == "distill":  # olmoe has no dense sibling: refused even earlier, for that
            continue
        assert_one_line_error(r, "recorded on another model")
        assert "--accept-foreign-trace" in r.stderr or cmd[0] == "trace"
    r = run_cli("prune", OLMOE, "--trace", foreign, "--keep", "4", "--out", tmp_path / "p", "--accept-foreign-trace",
                "--json")
    assert r.returncode == 0, r.stderr
    assert "warning: --trace" in r.stderr and "using it anyway" in r.stderr
    r = run_cli("prune", MIXTRAL, "--trace", traces["mixtral"], "--keep", "4", "--out", tmp_path / "own", "--json")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_distill_checks_the_trace_before_loading(traces, tmp_path, monkeypatch):
    from moetool.compression import distill as d

    monkeypatch.setattr(d, "_run", lambda *a, **k: pytest.fail("loaded the teacher before checking the trace"))
    with pytest.raises(MoetoolError, match="recorded on another model"):
        d.distill(str(DSV3), str(tmp_path / "s"), [str(TEXT)], trace=str(_retag(traces["mixtral"], DSV3, tmp_path)))


def _retag(trace_path: Path, model: Path, tmp_path: Path) -> Path:
    """The mixtral trace with the shapes of MODEL's routing (so only the fingerprint differs)."""
    import numpy as np

    from moetool.analysis.trace import Trace

    tr = Trace.load(trace_path)
    rc = _rc(model)
    experts = {L: tr.experts[tr.moe_layers[0]] % rc.num_experts for L in rc.moe_layers}
    weights = {L: tr.weights[tr.moe_layers[0]] for L in rc.moe_layers}
    meta = {**tr.meta, "num_layers": rc.num_layers, "moe_layers": list(rc.moe_layers), "num_experts": rc.num_experts,
            "top_k": rc.top_k}
    out = tmp_path / "retagged.safetensors"
    Trace(tr.token_ids, tr.sequence, tr.position, tr.decode, experts, weights, {}, meta).save(out)
    assert np.asarray(experts[rc.moe_layers[0]]).shape[1] == rc.top_k
    return out


def test_an_old_trace_without_fingerprint_is_accepted_with_a_warning(traces, tmp_path):
    r = run_cli("prune", MIXTRAL, "--trace", traces["mixtral-old"], "--keep", "4", "--out", tmp_path / "p", "--json")
    assert r.returncode == 0, r.stderr
    assert "no model fingerprint" in r.stderr


# -- 6. checks before the expensive part --------------------------------------------------------------------------------
def test_prune_refuses_group_constraints_before_calibrating(monkeypatch, tmp_path):
    from moetool.compression import prune

    monkeypatch.setattr(prune, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking the groups"))
    with pytest.raises(MoetoolError, match="groups"):
        prune.prune_checkpoint(str(DSV3), str(tmp_path / "o"), keep=3, by="reap", file=str(TEXT), progress=False)


def test_distill_checks_out_and_disk_before_loading(monkeypatch, tmp_path):
    import collections
    import errno
    import tempfile

    from moetool.compression import distill as d
    from moetool.runtime import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the teacher first"))
    usage = collections.namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
        with pytest.raises(MoetoolError, match="not enough disk space"):
            d.distill(str(MIXTRAL), str(tmp_path / "s"), [str(TEXT)], steps=1)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", read_only)
        with pytest.raises(MoetoolError, match="Read-only file system"):
            d.distill(str(MIXTRAL), str(tmp_path / "s"), [str(TEXT)], steps=1)
    assert not (tmp_path / "s").exists()


def test_a_read_only_file_system_is_said_as_such(tmp_path):
    """A real read-only mount (a user + mount namespace), where the system allows one."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = (f"mount -t tmpfs -o ro none {ro} && exec {sys.executable} -m moetool.cli prune {MIXTRAL} "
           f"--out {ro}/out --keep 2 --by random")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none {ro}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user/mount namespaces here")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line_error(r, "Read-only file system")
    assert r.returncode == 2 and "disk space" not in r.stderr


# -- 7. litter, --out ., --force --------------------------------------------------------------------------------------
_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from moetool.compression import surgery
    real = surgery.write_safetensors
    calls = []
    def slow(path, tensors, metadata=None, on_tensor=None):
        size = real(path, tensors, metadata, on_tensor)
        calls.append(path)
        if len(calls) == 2:  # mid-write: one shard done, the rest to come
            print("WRITING", file=sys.stderr, flush=True)
            time.sleep(120)
        return size
    surgery.write_safetensors = slow
    from moetool.cli import main
    main(sys.argv[1:])
""")


def _start_slow_prune(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, "prune", str(MIXTRAL), "--out", str(out), "--keep", "4",
                          "--by", "random", "--json"], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stderr.readline().strip() == "WRITING"
    return p


def _litter(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_write_cleans_up_and_exits_with_its_code(tmp_path, sig, code, word):
    out = tmp_path / "out"
    p = _start_slow_prune(out)
    assert len(_litter(out)) == 1  # the temporary directory being written
    p.send_signal(sig)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == code
    assert word in rest and "Traceback" not in rest
    assert not out.exists() and _litter(out) == []


def test_a_killed_run_leaves_litter_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    p = _start_slow_prune(out)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    p.stderr.close()
    left = _litter(out)
    assert len(left) == 1 and left[0].is_dir() and not out.exists()
    r = run_cli("prune", MIXTRAL, "--out", out, "--keep", "4", "--by", "random", "--json")
    assert r.returncode == 0, r.stderr
    assert f"removed {left[0]}" in r.stderr and "interrupted run" in r.stderr
    assert _litter(out) == [] and (out / "moetool.json").is_file()


def test_a_running_writer_s_temporary_directory_is_left_alone(tmp_path):
    out = tmp_path / "out"
    p = _start_slow_prune(out)
    try:
        r = run_cli("prune", MIXTRAL, "--out", out, "--keep", "4", "--by", "random", "--json")
        assert r.returncode == 0, r.stderr
        assert "removed" not in r.stderr and len(_litter(out)) == 1  # still the other run's
    finally:
        p.kill()
        p.wait()
        p.stderr.close()


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_out_as_the_current_directory_or_above_is_refused(tmp_path, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    r = subprocess.run([sys.executable, "-m", "moetool.cli", "prune", str(MIXTRAL), "--out", out, "--keep", "4",
                        "--by", "random", "--force"], capture_output=True, text=True, cwd=work,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line_error(r, "current directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and (work / "mine.txt").read_text() == "keep"


def test_force_never_replaces_someone_elses_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for cmd in (["prune", MIXTRAL, "--out", out, "--keep", "4", "--by", "random", "--force"],
                ["distill", MIXTRAL, "--out", out, "--file", TEXT, "--steps", "0", "--force"]):
        assert_one_line_error(run_cli(*cmd), "not written by moetool")
    assert (out / "thesis.tex").read_text() == "years of work"


# -- 8/9. exit codes, modes, small things --------------------------------------------------------------------------------
def _run_with_umask(mask: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetool.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, preexec_fn=lambda: os.umask(mask), env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, mask):
    out, trace = tmp_path / "p", tmp_path / "t.safetensors"
    assert _run_with_umask(mask, "prune", MIXTRAL, "--out", out, "--keep", "4", "--by", "random", "--json").returncode == 0
    assert _run_with_umask(mask, "trace", MIXTRAL, "--prompt", "hi", "--out", trace, "--json").returncode == 0
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    written = [p for p in out.iterdir() if p.name not in ("tokenizer.json", "tokenizer_config.json",
                                                           "generation_config.json")]  # copies keep their mode
    assert written and all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in written + [trace]), \
        {p.name: oct(p.stat().st_mode & 0o777) for p in written + [trace]}


def test_trace_generate_prints_no_transformers_warning():
    r = run_cli("trace", MIXTRAL, "--prompt", "hello", "--generate", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "past_key_values" not in r.stderr, r.stderr


def test_a_distilled_qwen3_student_has_no_moe_keys():
    from moetool.compression.distill_init import student_config
    from moetool.checkpoint.source import resolve

    src = resolve(str(FIXTURES / "tiny-qwen3-moe"))
    assert "num_local_experts" in src.config  # the fixture carries the fallback key
    cfg = student_config(src.config, _rc(FIXTURES / "tiny-qwen3-moe"), 64)
    assert not [k for k in cfg if "expert" in k or "moe" in k], cfg


def test_merge_says_why_it_needs_routing_statistics(tmp_path):
    r = run_cli("merge-experts", MIXTRAL, "--out", tmp_path / "o", "--to", "4")
    assert_one_line_error(r, "how often each expert is used")


def test_safetensor_errors_and_os_errors_are_one_line_exit_2(monkeypatch, capsys):
    from moetool import cli
    from moetool.analysis import params

    class SafetensorError(Exception):
        pass

    for exc in (SafetensorError("Error while deserializing header: HeaderTooLarge"),
                PermissionError(13, "Permission denied", "/x/y")):
        def boom(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(params, "count_params", boom)
        with pytest.raises(SystemExit) as e:
            cli.main(["params", "mixtral"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert ("HeaderTooLarge" in err[0]) if isinstance(exc, SafetensorError) else ("/x/y: Permission denied" in err[0])


def test_sigterm_while_loading_exits_143(tmp_path):
    """Not only during a write: SIGTERM anywhere is a clean exit 143."""
    p = subprocess.Popen([sys.executable, "-c", "import time, sys\nfrom moetool import cli\nfrom moetool.analysis import params\n"
                          "params.count_params = lambda *a, **k: (print('READY', file=sys.stderr, flush=True), "
                          "time.sleep(60))\ncli.main(['params', 'mixtral'])"], cwd=ROOT, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stderr.readline().strip() == "READY"
    time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    assert "terminated" in p.stderr.read()
    p.stderr.close()
