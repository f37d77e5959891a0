"""The streaming checkpoint-surgery machinery shared by prune and merge-experts: file format,
byte-exact copies, atomic output, refusal of unsafe outputs, and streaming (no tensor of a
pruned checkpoint is ever materialised)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import FIXTURES, assert_one_line_error, run_cli
from moetool.compression import surgery
from moetool.errors import MoetoolError
from moetool.families import all_families
from moetool.compression.surgery import Checkpoint, OutExpert, SurgeryPlan, run_surgery
from moetool.families.resolve import config_keys

MIXTRAL = FIXTURES / "tiny-mixtral"
DSV3 = FIXTURES / "tiny-deepseek-v3"


def _tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _plan(ckpt: Checkpoint, keep: list[int], updates: dict | None = None) -> SurgeryPlan:
    return SurgeryPlan({L: [OutExpert([e]) for e in keep] for L in ckpt.rc.moe_layers}, updates or {}, "prune")


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_identity_surgery_is_byte_exact(tmp_path):
    from safetensors import safe_open

    ckpt = Checkpoint(str(MIXTRAL))
    E = ckpt.rc.num_experts
    out = tmp_path / "same"
    result = run_surgery(ckpt, _plan(ckpt, list(range(E))), out, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_index = json.loads((MIXTRAL / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src_index["weight_map"])
    total = 0
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), "pt") as f, safe_open(str(MIXTRAL / src_index["weight_map"][name]), "pt") as g:
            a, b = f.get_tensor(name), g.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all()), name
            total += a.numel() * a.element_size()
    assert index["metadata"]["total_size"] == total == result["bytes"]["output"]
    assert json.loads((out / "config.json").read_text()) == json.loads((MIXTRAL / "config.json").read_text())
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (MIXTRAL / side).read_bytes()
    assert result["layout_check"] == "ok"


def test_shards_are_valid_safetensors_with_aligned_tensors(tmp_path):
    ckpt = Checkpoint(str(DSV3))
    out = tmp_path / "p"
    run_surgery(ckpt, _plan(ckpt, list(range(ckpt.rc.num_experts))), out, progress=False)
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}
    for shard in sorted(out.glob("*.safetensors")):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__")
        spans = sorted(tuple(v["data_offsets"]) for v in header.values())
        assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no gaps
        for v in header.values():
            assert (8 + n + v["data_offsets"][0]) % sizes.get(v["dtype"], 1) == 0


def test_pruning_copies_bytes_without_materialising_tensors(tmp_path, monkeypatch):
    """Pruning moves bytes file to file: reading any tensor into memory would fail here."""

    def no_read(self, *a, **k):
        raise AssertionError("pruning read a tensor into memory")

    monkeypatch.setattr(Checkpoint, "read", no_read)
    ckpt = Checkpoint(str(MIXTRAL))
    keep = [1, 4, 6]
    out = tmp_path / "p"
    run_surgery(ckpt, _plan(ckpt, keep, {"num_local_experts": 3}), out, progress=False)
    monkeypatch.undo()
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_index = json.loads((MIXTRAL / "model.safetensors.index.json").read_text())
    for L in ckpt.rc.moe_layers:
        for j, e in enumerate(keep):
            new = f"model.layers.{L}.block_sparse_moe.experts.{j}.w2.weight"
            old = f"model.layers.{L}.block_sparse_moe.experts.{e}.w2.weight"
            with safe_open(str(out / index["weight_map"][new]), "pt") as f, \
                    safe_open(str(MIXTRAL / src_index["weight_map"][old]), "pt") as g:
                assert bool((f.get_tensor(new) == g.get_tensor(old)).all())
        gate = f"model.layers.{L}.block_sparse_moe.gate.weight"
        with safe_open(str(out / index["weight_map"][gate]), "pt") as f, \
                safe_open(str(MIXTRAL / src_index["weight_map"][gate]), "pt") as g:
            assert bool((f.get_tensor(gate) == g.get_tensor(gate)[keep]).all())


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [_Boom("disk on fire"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["error", "ctrl-c", "disk-full"])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    """A failure after the first shard: no --out, no temporary directory, input untouched."""
    real = surgery.write_safetensors
    calls = []

    def failing(path, tensors, metadata=None, on_tensor=None):
        calls.append(path)
        if len(calls) == 2:
            raise exc
        return real(path, tensors, metadata, on_tensor)

    monkeypatch.setattr(surgery, "write_safetensors", failing)
    before = _tree_digest(MIXTRAL)
    ckpt = Checkpoint(str(MIXTRAL))
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        run_surgery(ckpt, _plan(ckpt, [0, 1, 2, 3], {"num_local_experts": 4}), out, progress=False)
    assert len(calls) == 2 and calls[0].exists() is False  # the first shard was written, then removed
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []
    assert _tree_digest(MIXTRAL) == before


def test_disk_full_during_a_tensor_write(tmp_path, monkeypatch):
    real = surgery._write_all
    calls = {"n": 0}

    def full(fd, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(surgery, "_write_all", full)
    monkeypatch.setattr(surgery, "_COPY_FILE_RANGE", False)  # force the buffered path through _write_all
    ckpt = Checkpoint(str(MIXTRAL))
    with pytest.raises(OSError):
        run_surgery(ckpt, _plan(ckpt, [0, 1]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(surgery.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    ckpt = Checkpoint(str(MIXTRAL))
    with pytest.raises(MoetoolError, match="not enough disk space"):
        run_surgery(ckpt, _plan(ckpt, [0, 1]), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_force(tmp_path):
    """--force replaces a directory moetool wrote (it holds moetool.json), never someone else's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    r = run_cli("prune", MIXTRAL, "--out", out, "--keep", "4", "--by", "random")
    assert_one_line_error(r, "already exists")
    assert (out / "old.txt").exists()
    r = run_cli("prune", MIXTRAL, "--out", out, "--keep", "4", "--by", "random", "--force")
    assert_one_line_error(r, "not written by moetool")
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()  # an empty directory may be replaced
    r = run_cli("prune", MIXTRAL, "--out", out, "--keep", "4", "--by", "random", "--force", "--json")
    assert r.returncode == 0, r.stderr
    marker = json.loads((out / "moetool.json").read_text())
    assert marker["command"] == "prune" and marker["written_by"].startswith("moetool ")
    r = run_cli("prune", MIXTRAL, "--out", out, "--keep", "2", "--by", "random", "--force", "--json")
    assert r.returncode == 0, r.stderr  # moetool's own output: replaced
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    assert _leftovers(tmp_path, "out") == []


def test_out_overlapping_the_input_is_refused(tmp_path):
    src = tmp_path / "model"
    shutil.copytree(MIXTRAL, src)
    for out in (src, src / "inside"):
        with pytest.raises(MoetoolError, match="overlaps the input"):
            run_surgery(Checkpoint(str(src)), _plan(Checkpoint(str(src)), [0, 1]), out, force=True, progress=False)
    r = run_cli("prune", src, "--out", src / "inside", "--keep", "4", "--by", "random", "--force")
    assert_one_line_error(r, "overlaps the input")
    assert not (src / "inside").exists()


def test_pickled_weights_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(MIXTRAL / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    r = run_cli("prune", d, "--out", tmp_path / "o", "--keep", "4", "--by", "random")
    assert_one_line_error(r, "safetensors")


def test_companion_tensors_follow_their_expert(tmp_path):
    """A tensor the spec does not name beside a per-expert one (an FP8 scale) is renamed with it."""
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "model"
    shutil.copytree(MIXTRAL, src)
    extra = {f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight_scale_inv": torch.full((2, 2), float(e))
             for e in range(8)}
    save_file(extra, str(src / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "extra.safetensors" for k in extra})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(str(src))
    out = tmp_path / "out"
    result = run_surgery(ckpt, _plan(ckpt, [2, 5], {"num_local_experts": 2}), out, progress=False)
    from safetensors import safe_open

    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    names = [n for n in new_index["weight_map"] if n.endswith("weight_scale_inv")]
    assert sorted(names) == [f"model.layers.0.block_sparse_moe.experts.{j}.w1.weight_scale_inv" for j in (0, 1)]
    with safe_open(str(out / new_index["weight_map"][names[1]]), "pt") as f:
        assert float(f.get_tensor(sorted(names)[1])[0, 0]) == 5.0
    assert result["layout_check"].startswith("skipped")


def test_config_keys_come_from_the_family_spec():
    fams = all_families()
    assert config_keys(fams["mixtral"], "num_experts") == ["num_local_experts"]
    assert config_keys(fams["deepseek_v3"], "num_experts") == ["n_routed_experts", "num_local_experts"]
    assert config_keys(fams["qwen3_moe"], "num_experts") == ["num_experts", "num_local_experts"]
    assert config_keys(fams["gpt_oss"], "top_k") == ["num_experts_per_tok", "experts_per_token"]
    assert config_keys(fams["deepseek_v3"], "mtp_layers") == ["num_nextn_predict_layers"]
    assert config_keys(fams["mixtral"], "num_shared_experts") == []


def test_unknown_dtype_refused_for_merging(tmp_path):
    ckpt = Checkpoint(str(MIXTRAL))
    ent = next(iter(ckpt.entries.values()))
    bad = dataclasses.replace(ent, dtype="I8")
    with pytest.raises(MoetoolError, match="float"):
        surgery._require_float(bad)


def test_prefixed_mtp_weights_are_counted_apart_and_dropped(tmp_path):
    """Qwen3-Next / Qwen3.5 checkpoints keep their multi-token-prediction module under mtp.* (a decoder
    layer with its own experts, fc and norms) beside the model that transformers builds (it ignores them).
    params counts them as MTP parameters, not "unknown"; prune drops them and sets the config's MTP
    layer count to 0, so the output's experts are never out of step with its MTP layer."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from moetool.analysis.params import count_params
    from moetool.compression.prune import prune_checkpoint

    src = tmp_path / "qwen3-next-mtp"
    shutil.copytree(FIXTURES / "tiny-qwen3-next", src)
    config = json.loads((src / "config.json").read_text())
    H, E = config["hidden_size"], config["num_experts"]
    mtp = {"mtp.fc.weight": torch.randn(H, 2 * H), "mtp.norm.weight": torch.ones(H),
           "mtp.pre_fc_norm_hidden.weight": torch.ones(H), "mtp.layers.0.mlp.gate.weight": torch.randn(E, H)}
    for e in range(E):
        mtp[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"] = torch.randn(H, 4)
    save_file(mtp, str(src / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({n: "model-mtp.safetensors" for n in mtp})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    config["mtp_num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(config))

    plain = count_params(str(FIXTURES / "tiny-qwen3-next"))
    report = count_params(str(src))
    assert report["warnings"] == []  # every tensor classified
    assert report["mtp_params"] == sum(t.numel() for t in mtp.values())
    assert report["total"] == plain["total"] and report["roles"] == plain["roles"]
    from moetool.analysis.trace import trace_model

    assert trace_model(str(src), ["mtp weights beside the model"])[0].tokens > 0  # loads: transformers ignores mtp.*

    result = prune_checkpoint(str(src), str(tmp_path / "out"), keep=E // 2, by="random", seed=1, progress=False)
    assert result["config_changes"]["mtp_num_hidden_layers"] == {"from": 1, "to": 0}
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert not [n for n in out_index["weight_map"] if n.startswith("mtp.")]
    assert count_params(str(tmp_path / "out"))["warnings"] == []
