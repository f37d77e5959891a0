"""Layer-by-layer (streaming) runs equal resident runs on every fixture family: the same
expert for every token and layer, REAP and expert outputs within float rounding, the same eval
loss; each command's --stream output equals its --no-stream output; a run killed by a real
signal resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT, TINY, run_cli
from moetool.runtime.loading import load_model

SMALL = TINY + sorted(p for p in FIXTURES.glob("derived-*") if p.is_dir())  # every tiny fixture family
ALL = SMALL + sorted(p for p in FIXTURES.glob("trained-*") if p.is_dir())
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def forward(self, hidden_states):",
         "Mixture-of-experts models route every token to a few experts, and the rest stay idle."]


# fixtures whose family refuses here, with the words of its one-line refusal
NO_LAYERWISE: dict[str, str] = {}  # (glm_moe_dsa's layers pass the indexer's top-k on: carried by the executor)
NO_EXPERT_PROBE = {"tiny-llama4": "takes only hidden states",  # experts get every token, pre-scaled
                   "derived-jetmoe": "takes only hidden states"}  # its experts take tokens grouped by expert


@lru_cache(maxsize=None)
def resident(path: str):
    return load_model(path)


def _refused(fixture) -> bool:
    """True (after checking the refusal) where FIXTURE's family cannot be streamed."""
    from moetool.errors import MoetoolError

    from moetool.families import family_for_config

    family = family_for_config(json.loads((fixture / "config.json").read_text()))
    reason = family.layerwise_unsupported or family.stream_unsupported  # the family's data says why
    needle = NO_LAYERWISE.get(fixture.name) or ("cannot run one layer at a time" if reason else None)
    if needle:
        with pytest.raises(MoetoolError, match=needle) as exc:
            load_model(str(fixture), stream=True)
        assert "\n" not in str(exc.value) and (not reason or reason in str(exc.value))
    return bool(needle)


def _same_routing(a, b):
    assert a.moe_layers == b.moe_layers
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_array_equal(a.sequence, b.sequence)
    np.testing.assert_array_equal(a.position, b.position)
    for L in a.moe_layers:
        np.testing.assert_array_equal(a.experts[L], b.experts[L], err_msg=f"layer {L}")
        np.testing.assert_allclose(a.weights[L].astype(np.float32), b.weights[L].astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("fixture", ALL, ids=[p.name for p in ALL])
def test_streamed_layers_hold_exactly_the_resident_weights(fixture):
    """Every parameter a streamed layer gets from disk (renamed, per-expert matrices fused into
    transformers' 3-D tensors) equals what transformers' own loader put there."""
    if _refused(fixture):
        return
    ref = resident(str(fixture)).model.state_dict()
    ref_buffers = dict(resident(str(fixture)).model.named_buffers())
    lm = load_model(str(fixture), stream=True)
    reader = lm.layer_reader
    for i in range(lm.rc.num_layers):
        reader.materialise(i)
        for name, t in reader.layers[i].state_dict().items():
            assert torch.equal(t, ref[f"{reader.prefix}.{i}.{name}"]), name
        for name, t in reader.layers[i].named_buffers():  # and those computed at construction (DeepSeek-V4's rotary)
            assert torch.equal(t, ref_buffers[f"{reader.prefix}.{i}.{name}"]), name
        reader.free(i)
        assert all(p.device.type == "meta" for p in reader.layers[i].parameters())
    assert reader.bytes_read > 0


def test_layer_reader_builds_what_transformers_converts_on_load():
    """Tensors transformers converts on load come from its own conversion mapping (Kimi Linear's
    q/k/v_conv1d concatenated into conv1d); fused experts of any projections are fused from each
    expert's matrices (Nemotron-H's non-gated up_proj)."""
    kimi = load_model(str(FIXTURES / "tiny-kimi-linear"), stream=True).layer_reader
    kind, conv, first, pairs = kimi.plan(0)["self_attn.conv1d.weight"]
    assert kind == "convert" and first == "model.layers.0.self_attn.conv1d.weight"
    assert sorted(e.name.rsplit(".", 2)[-2] for _, e in pairs) == ["k_conv1d", "q_conv1d", "v_conv1d"]
    assert [p for p in conv.source_patterns] == [f"self_attn.{x}_conv1d.weight" for x in "qkv"]  # concatenated so
    nemo = load_model(str(FIXTURES / "tiny-nemotron-h"), stream=True).layer_reader
    moe = next(i for i in range(len(nemo.layers)) if "mixer.experts.up_proj" in nemo.plan(i))
    kind, src, leaf = nemo.plan(moe)["mixer.experts.up_proj"]
    assert kind == "fuse" and leaf == "up_proj" and all(len(ents) == 1 for ents in src)
    assert [ents[0].name for ents in src] == [f"backbone.layers.{moe}.mixer.experts.{e}.up_proj.weight"
                                              for e in range(len(src))]


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v4", "tiny-nemotron-h"])
def test_transformers_conversion_builds_the_experts_the_fuse_does(name, monkeypatch):
    """With the family's per-expert fuse switched off, every fused experts tensor comes from
    transformers' own conversion ops (MergeModulelist, then Concatenate for gate_up_proj) and equals
    what transformers' loader put there: the two ways agree."""
    from moetool.runtime.streaming import LayerReader

    fx = str(FIXTURES / name)
    ref = resident(fx).model.state_dict()
    monkeypatch.setattr(LayerReader, "_expert_entries", lambda self, layer: {})
    reader = load_model(fx, stream=True).layer_reader
    converted = 0
    for i in range(len(reader.layers)):
        kinds = {n: k[0] for n, k in reader.plan(i).items()}
        converted += sum(k == "convert" for k in kinds.values())
        for n, t in reader.read(i).items():
            assert torch.equal(t, ref[f"{reader.prefix}.{i}.{n}"]), n
    assert converted > 0


def test_buffers_computed_at_construction_are_rebuilt_from_the_config_or_refused():
    """A layer's non-persistent buffer is rebuilt by its owner's class from the config (its values are
    those the class computes); an owner whose class needs more than the config is a one-line error."""
    from types import SimpleNamespace

    from moetool.errors import MoetoolError
    from moetool.runtime.streaming import rebuilt_buffers

    class Table(torch.nn.Module):
        def __init__(self, config, device=None):
            super().__init__()
            self.register_buffer("inv_freq", 1.0 / config.base ** torch.arange(0, 8, 2, device=device) / 8,
                                 persistent=False)

    class Sized(torch.nn.Module):
        def __init__(self, config, dim):
            super().__init__()
            self.register_buffer("table", torch.arange(dim, dtype=torch.float32), persistent=False)

    config = SimpleNamespace(base=10000.0)
    model = SimpleNamespace(config=config)
    with torch.device("meta"):
        good = torch.nn.ModuleDict({"rotary": Table(config)})
        bad = torch.nn.ModuleDict({"sizer": Sized(config, 4)})
    got = rebuilt_buffers([good], model, torch.float32)
    assert list(got[0]) == ["rotary.inv_freq"]
    assert torch.equal(got[0]["rotary.inv_freq"], Table(config).inv_freq)
    with pytest.raises(MoetoolError, match="sizer.table is computed at construction.*cannot be rebuilt") as exc:
        rebuilt_buffers([good, bad], model, torch.float32)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("layer 1:")


@pytest.mark.parametrize("fixture", ALL, ids=[p.name for p in ALL])
def test_streamed_trace_routes_every_token_like_the_resident_model(fixture):
    if _refused(fixture):
        return
    from moetool.analysis.trace import record_trace

    ref = record_trace(resident(str(fixture)), TEXTS, logits=True, batch_size=2)
    got = record_trace(load_model(str(fixture), stream=True), TEXTS, logits=True, batch_size=2)
    _same_routing(ref, got)
    for L in ref.moe_layers:
        np.testing.assert_allclose(got.logits[L].astype(np.float32), ref.logits[L].astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("fixture", SMALL, ids=[p.name for p in SMALL])
def test_streamed_reap_and_expert_outputs_match(fixture, tmp_path):
    from moetool.compression.prune import calibrate
    from moetool.errors import MoetoolError

    if _refused(fixture):
        return
    if fixture.name in NO_EXPERT_PROBE:
        with pytest.raises(MoetoolError, match=NO_EXPERT_PROBE[fixture.name]):
            calibrate(str(fixture), TEXTS, None, 2, {}, reap=True, outputs=True, logits=False)
        return

    f = tmp_path / "calib.txt"
    f.write_text("\n".join(TEXTS))
    kw = dict(reap=True, outputs=True, logits=False)
    a = calibrate(str(fixture), TEXTS, None, 2, {}, **kw)
    b = calibrate(str(fixture), TEXTS, None, 2, {"stream": True}, **kw)
    for L in a.layers:
        np.testing.assert_array_equal(a.counts[L], b.counts[L])
        np.testing.assert_allclose(b.reap[L], a.reap[L], rtol=1e-5, atol=1e-7)
        # atol 1e-5: Qwen3-Next's Gated DeltaNet recurrence rounds differently when streamed (1.5e-6 seen)
        np.testing.assert_allclose(b.outputs[L], a.outputs[L], rtol=1e-5, atol=1e-5)
        assert a.reap[L].max() > 0


@pytest.mark.parametrize("fixture", SMALL, ids=[p.name for p in SMALL])
def test_streamed_eval_gives_the_same_loss(fixture, tmp_path):
    if _refused(fixture):
        return
    from moetool.analysis.evaluate import evaluate_models

    f = tmp_path / "text.txt"
    f.write_text(" ".join(TEXTS * 4))
    a = evaluate_models([str(fixture)], str(f), seq_len=16, batch_size=3, progress=False)["models"][0]
    b = evaluate_models([str(fixture)], str(f), seq_len=16, batch_size=3, progress=False,
                        load_options={"stream": True})["models"][0]
    assert a["tokens"] == b["tokens"]
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-6, abs=1e-7)


def test_eval_ref_kl_streamed_against_resident(tmp_path):
    """KL of a streamed model against the same model resident as --ref is zero (to rounding)."""
    from moetool.analysis.evaluate import evaluate_models

    f = tmp_path / "text.txt"
    f.write_text(" ".join(TEXTS * 4))
    fx = str(FIXTURES / "tiny-mixtral")
    link = tmp_path / "same-model"
    link.symlink_to(FIXTURES / "tiny-mixtral")
    out = evaluate_models([str(link)], str(f), ref=fx, seq_len=16, batch_size=2, progress=False,
                          load_options={"stream": True})
    row = next(r for r in out["models"] if not r["is_ref"])
    assert abs(row["kl"]) < 1e-6 and row["top1_agreement"] == 1.0


def test_activations_spilled_to_disk_give_the_same_trace():
    from moetool.runtime.executor import Executor
    from moetool.runtime.observers import RoutingRecorder

    lm = resident(str(FIXTURES / "tiny-qwen2-moe"))
    tok = lm.tokenizer
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    runs = []
    for budget in (None, 1):
        rec = RoutingRecorder(lm)
        ex = Executor(lm, batch_size=2, mode="layerwise", max_memory=budget)
        ex.run(seqs, [rec])
        runs.append((rec.result(), ex.stats["activation_store"]))
    assert runs[0][1] == "memory" and runs[1][1] == "disk"
    for L in runs[0][0][1]:
        np.testing.assert_array_equal(runs[0][0][1][L], runs[1][0][1][L])


def test_layer_end_may_change_the_layer_and_the_next_layers_see_it():
    """An observer that changes a layer's weights in layer_end (heal) returns True: the next
    layer's inputs are recomputed with the changed weights, exactly as a resident model with
    that change."""
    from moetool.runtime.executor import Executor, Observer
    from moetool.runtime.observers import RoutingRecorder
    from moetool.analysis.trace import record_trace

    fx = str(FIXTURES / "tiny-olmoe")

    class Scale(Observer):
        def attach(self, ex, hooks):
            self.ex = ex

        def layer_end(self, layer):
            if layer == 0:
                with torch.no_grad():
                    self.ex.layer_module(0).self_attn.o_proj.weight.mul_(3.0)
                return True

    lm = load_model(fx, stream=True)
    seqs = [lm.tokenizer(t)["input_ids"] for t in TEXTS]
    rec = RoutingRecorder(lm)
    Executor(lm, batch_size=2).run(seqs, [rec, Scale()])
    changed = load_model(fx)
    with torch.no_grad():
        changed.model.model.layers[0].self_attn.o_proj.weight.mul_(3.0)
    ref = record_trace(changed, TEXTS, batch_size=2)
    cols, ids, _, _ = rec.result()
    srt = np.lexsort((cols["position"], cols["sequence"]))  # a trace's order
    plain = record_trace(resident(fx), TEXTS, batch_size=2)
    later = [L for L in ref.moe_layers if L > 0]
    for L in later:
        np.testing.assert_array_equal(ids[L][srt], ref.experts[L])
    assert any(not np.array_equal(plain.experts[L], ref.experts[L]) for L in later)


# -- commands ---------------------------------------------------------------------------------------------
def _json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_trace_command_streams(tmp_path):
    fx = FIXTURES / "tiny-deepseek-v3"
    outs = []
    for flag in ("--no-stream", "--stream"):
        out = tmp_path / f"t{flag}.safetensors"
        r = _json(run_cli("trace", fx, "--prompt", TEXTS[0], "--prompt", TEXTS[2], "--json", "--out", out, flag))
        outs.append((r, out))
    assert outs[1][0]["load"]["streamed"] is True and outs[0][0]["load"]["streamed"] is False
    from moetool.analysis.trace import Trace

    _same_routing(Trace.load(outs[0][1]), Trace.load(outs[1][1]))


def test_prune_reap_command_streams(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(TEXTS * 3))
    fx = FIXTURES / "tiny-mixtral"
    res = []
    for flag in ("--no-stream", "--stream"):
        r = _json(run_cli("prune", fx, "--keep", "4", "--by", "reap", "--file", f, "--out", tmp_path / flag, "--json",
                          flag))
        res.append(r["selection"]["layers"])
    assert [row["kept"] for row in res[0]] == [row["kept"] for row in res[1]]
    for a, b in zip(res[0], res[1]):
        np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-5)


def test_merge_experts_command_streams(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(TEXTS * 3))
    fx = FIXTURES / "tiny-qwen3-moe"
    res = []
    for flag in ("--no-stream", "--stream"):
        r = run_cli("merge-experts", fx, "--to", "4", "--file", f, "--out", tmp_path / flag, "--json", flag)
        res.append(_json(r))
    a = sorted((tmp_path / "--no-stream").glob("*.safetensors"))
    b = sorted((tmp_path / "--stream").glob("*.safetensors"))
    from safetensors.torch import load_file

    for x, y in zip(a, b):
        ta, tb = load_file(str(x)), load_file(str(y))
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


def test_eval_command_streams(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(" ".join(TEXTS * 4))
    fx = FIXTURES / "trained-mixtral"
    a = _json(run_cli("eval", fx, "--file", f, "--seq-len", "16", "--json", "--no-stream"))["models"][0]
    b = _json(run_cli("eval", fx, "--file", f, "--seq-len", "16", "--json", "--stream"))["models"][0]
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-6)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_distill_with_a_streamed_teacher_equals_a_resident_one(name, tmp_path):
    """The teacher streamed layer by layer (student init, usage calibration, held-out reference
    and its top-K cache, each one pass over the layers) trains the same student as the resident
    teacher with the same cache."""
    from moetool.compression.distill import distill

    train = FIXTURES / "corpus" / "train-prose.txt"
    held = FIXTURES / "corpus" / "heldout-code.txt"
    (tmp_path / "t.txt").write_text(train.read_text()[:12000])
    (tmp_path / "h.txt").write_text(held.read_text()[:3000])
    kw = dict(steps=2, seq_len=32, batch_size=2, calib_tokens=256, progress=False, cache_topk=64,
              eval_files=[str(tmp_path / "h.txt")])
    fx = str(FIXTURES / name)
    resident = distill(fx, tmp_path / "a", [str(tmp_path / "t.txt")], cache_teacher=str(tmp_path / "ca"),
                       load_options={"stream": False}, **kw)
    streamed = distill(fx, tmp_path / "b", [str(tmp_path / "t.txt")], load_options={"stream": True}, **kw)
    assert streamed["teacher_streamed"] and not resident["teacher_streamed"]
    assert streamed["training"]["teacher_cache"]["temporary"]
    assert not Path(streamed["training"]["teacher_cache"]["dir"]).name.startswith("ca")
    assert streamed["init"] == resident["init"]
    assert streamed["eval"][0]["kl"] == pytest.approx(resident["eval"][0]["kl"], rel=1e-4, abs=1e-6)
    assert streamed["eval"][0]["teacher_ppl"] == pytest.approx(resident["eval"][0]["teacher_ppl"], rel=1e-5)
    for x, y in zip(streamed["history"], resident["history"]):
        assert x["kl"] == pytest.approx(y["kl"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    a = {k: v for f in sorted((tmp_path / "a").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted((tmp_path / "b").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4


def test_distill_refuses_hidden_loss_with_a_streamed_teacher():
    from moetool.compression.distill import DistillOptions, check_options
    from moetool.errors import MoetoolError

    opts = DistillOptions(out="/tmp/x-never", files=[str(FIXTURES / "corpus" / "train-prose.txt")],
                          load_options={"stream": True}, hidden_loss=1.0)
    with pytest.raises(MoetoolError, match="hidden-loss"):
        check_options(str(FIXTURES / "tiny-mixtral"), opts)


# -- resume after a real signal ---------------------------------------------------------------------------------
_CHILD = r"""
import json, os, signal, sys
import numpy as np
from moetool.runtime.loading import load_model
from moetool.runtime.executor import Executor, Observer
from moetool.runtime.observers import RoutingRecorder, ExpertProbe
fx, run_dir, resume, kill_at, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]
lm = load_model(fx, stream=True, run_dir=run_dir, resume=resume)
texts = ["The quick brown fox jumps over the lazy dog.", "def forward(self, hidden_states):",
         "Mixture-of-experts models route every token to a few experts, and the rest stay idle."]
seqs = [lm.tokenizer(t)["input_ids"] for t in texts]

class Killer(Observer):
    def layer_end(self, layer):
        if layer == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

rec, probe = RoutingRecorder(lm), ExpertProbe(lm, reap=True, outputs=True)
Executor(lm, batch_size=2).run(seqs, [rec, probe, Killer()])
cols, ids, w, _ = rec.result()
json.dump({"ids": {L: v.tolist() for L, v in ids.items()}, "w": {L: v.astype(float).tolist() for L, v in w.items()},
           "reap": {L: v.tolist() for L, v in probe.reap_scores().items()},
           "out": {L: v.tolist() for L, v in probe.output_features().items()}}, open(out, "w"))
"""


def _child(args, env):
    return subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def test_run_killed_by_a_signal_resumes_to_the_same_result(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fx = FIXTURES / "trained-deepseek-v3"
    full = _child([fx, tmp_path / "a", 0, -1, tmp_path / "full.json"], env)
    assert full.returncode == 0, full.stderr
    killed = _child([fx, tmp_path / "b", 0, 2, tmp_path / "never.json"], env)
    assert killed.returncode == -signal.SIGKILL
    state = json.loads(next((tmp_path / "b").rglob("state.json")).read_text())
    assert state["next_layer"] == 2  # layers 0 and 1 were checkpointed, layer 2 was not
    resumed = _child([fx, tmp_path / "b", 1, -1, tmp_path / "resumed.json"], env)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    assert a == b


def test_buffers_computed_at_construction_are_rebuilt_by_transformers_init_or_refused():
    """A non-persistent buffer beside weights read from disk (Gemma 4's embedding scale) is built
    the way transformers' loader builds it (empty, then the model's _init_weights); one that
    _init_weights does not set is a one-line error naming it, never uninitialised memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetool.errors import MoetoolError
    from moetool.runtime.hf_compat import init_computed_buffers

    cfg = AutoConfig.from_pretrained(FIXTURES / "tiny-gemma4")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    emb = model.model.embed_tokens
    assert init_computed_buffers(model, emb, torch.device("cpu")) == ["embed_scale"]
    assert float(emb.embed_scale) == pytest.approx(cfg.hidden_size ** 0.5) and emb.weight.device.type == "meta"
    assert float(emb.embed_scale) == float(resident(str(FIXTURES / "tiny-gemma4")).model.model.embed_tokens.embed_scale)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    with torch.device("meta"):
        odd = Odd()
    with pytest.raises(MoetoolError, match="buffer table is computed at construction") as exc:
        init_computed_buffers(model, odd, torch.device("cpu"))
    assert "\n" not in str(exc.value)


# -- values a layer hands to the next (GLM-5's shared indexer layers) ---------------------------------------------
@pytest.fixture(scope="module")
def glm_shared_indexer(tmp_path_factory) -> Path:
    """tiny-glm-moe-dsa with layers 1 and 2 "shared" (indexer_types): they have no indexer of their own and
    attend to the top-k keys the previous layer hands them (prev_topk_indices), as GLM-5's shared DSA layers
    do; their indexer tensors are left out, as transformers builds such layers without them."""
    from safetensors.torch import load_file, save_file

    src = FIXTURES / "tiny-glm-moe-dsa"
    dst = tmp_path_factory.mktemp("glm") / "tiny-glm-moe-dsa-shared"
    dst.mkdir()
    types = ["full", "shared", "shared"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["indexer_types"] = types

    def drop(name):
        return any(name.startswith(f"model.layers.{L}.self_attn.indexer.") for L, t in enumerate(types) if t != "full")

    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v for k, v in load_file(str(f)).items() if not drop(k)}, str(dst / f.name),
                      metadata={"format": "pt"})
        elif f.name == "model.safetensors.index.json":
            idx = json.loads(f.read_text())
            idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if not drop(k)}
            (dst / f.name).write_text(json.dumps(idx))
        elif f.name == "config.json":
            (dst / f.name).write_text(json.dumps(cfg))
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_values_a_layer_hands_to_the_next_are_carried_layer_by_layer(glm_shared_indexer, tmp_path):
    """The executor finds, in the model's own forward, that each layer's prev_topk_indices is the
    previous layer's second output, and passes the real one on: a streamed trace and eval of the
    shared-indexer model equal the resident ones, which differ from the all-"full" model's."""
    from moetool.analysis.evaluate import evaluate_models
    from moetool.analysis.trace import record_trace
    from moetool.runtime.executor import Executor
    from moetool.runtime.observers import RoutingRecorder

    fx = str(glm_shared_indexer)
    lm = load_model(fx, stream=True)
    ex = Executor(lm, batch_size=2)
    ex.run([lm.tokenizer(t)["input_ids"] for t in TEXTS], [RoutingRecorder(lm)])
    assert ex.out_arity == 2
    assert ex.carry == {1: [("prev_topk_indices", 0, 1)], 2: [("prev_topk_indices", 1, 1)]}
    ref = record_trace(resident(fx), TEXTS, logits=True, batch_size=2)
    got = record_trace(load_model(fx, stream=True), TEXTS, logits=True, batch_size=2)
    _same_routing(ref, got)
    for L in ref.moe_layers:
        np.testing.assert_allclose(got.logits[L].astype(np.float32), ref.logits[L].astype(np.float32), atol=1e-3)
    full = record_trace(resident(str(FIXTURES / "tiny-glm-moe-dsa")), TEXTS, logits=True, batch_size=2)
    assert any(np.abs(full.logits[L].astype(np.float32) - ref.logits[L].astype(np.float32)).max() > 0.1
               for L in ref.moe_layers)  # the handed-on top-k matters: a lost one would show
    f = tmp_path / "text.txt"
    f.write_text(" ".join(TEXTS * 4))
    a = evaluate_models([fx], str(f), seq_len=16, batch_size=3, progress=False)["models"][0]
    b = evaluate_models([fx], str(f), seq_len=16, batch_size=3, progress=False,
                        load_options={"stream": True})["models"][0]
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-6, abs=1e-7)


def test_handed_on_values_survive_a_kill_and_resume(glm_shared_indexer, tmp_path):
    """Killed by SIGKILL in layer 1, the checkpoint holds layer 0's top-k for layer 1 beside the
    hidden states; the resumed run equals an uninterrupted one exactly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fx = glm_shared_indexer
    full = _child([fx, tmp_path / "a", 0, -1, tmp_path / "full.json"], env)
    assert full.returncode == 0, full.stderr
    killed = _child([fx, tmp_path / "b", 0, 1, tmp_path / "never.json"], env)
    assert killed.returncode == -signal.SIGKILL
    state = json.loads(next((tmp_path / "b").rglob("state.json")).read_text())
    assert state["next_layer"] == 1
    assert all(keys == [[0, 1, True]] for keys in state["carried"].values()) and len(state["carried"]) == 3
    resumed = _child([fx, tmp_path / "b", 1, -1, tmp_path / "resumed.json"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "full.json").read_text()) == json.loads((tmp_path / "resumed.json").read_text())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_on_cuda_prefetches_and_routes_like_the_resident_model():
    """On a GPU each layer goes to the device (the next one read into pinned memory while the
    current one computes) and routing equals the resident CPU run."""
    from moetool.analysis.trace import record_trace

    fx = str(FIXTURES / "trained-mixtral")
    lm = load_model(fx, stream=True, device_map="cuda:0")
    assert lm.layer_reader.device.type == "cuda"
    got = record_trace(lm, TEXTS, batch_size=2)
    ref = record_trace(resident(fx), TEXTS, batch_size=2)
    for L in ref.moe_layers:  # GPU kernels round differently: nearly every choice the same
        assert (got.experts[L] == ref.experts[L]).all(axis=1).mean() > 0.97


def test_streams_by_itself_when_the_weights_do_not_fit(monkeypatch, capsys):
    import moetool.runtime.loading as loading

    fx = str(FIXTURES / "tiny-olmoe")
    monkeypatch.setattr(loading, "_available_memory", lambda: 100_000)  # less than the 0.3 MB of weights
    lm = load_model(fx, stream=None)
    assert lm.layer_reader is not None and lm.load_info()["streamed"]
    assert "one layer at a time" in capsys.readouterr().err
    monkeypatch.setattr(loading, "_available_memory", lambda: 10**12)
    assert load_model(fx, stream=None).layer_reader is None
    capsys.readouterr()
    # a --max-memory budget smaller than the weights: streamed, the budget holds the hidden states
    lm = load_model(fx, stream=None, max_memory="cpu=100KB")
    assert lm.layer_reader is not None and lm.run_options["activation_budget"] == 100_000
    assert "do not fit in --max-memory (100,000 bytes)" in capsys.readouterr().err
    # a budget the weights fit in: resident (the budget is accelerate's, as before)
    assert load_model(fx, stream=None, max_memory="cpu=1GB").layer_reader is None
    # --no-stream with a small budget: accelerate's placement and disk offload
    lm = load_model(fx, stream=False, max_memory="cpu=100KB")
    assert lm.layer_reader is None and lm.load_info()["offloaded"]
    # an explicit device map is the user's placement: never streamed by itself
    assert load_model(fx, stream=None, device_map="cpu").layer_reader is None


def test_resume_without_run_dir_is_a_one_line_error():
    from conftest import assert_one_line_error

    r = run_cli("trace", FIXTURES / "tiny-olmoe", "--prompt", "hi", "--resume")
    assert_one_line_error(r, "--run-dir")
    assert r.returncode == 2


@pytest.mark.parametrize("bits", [4, 8])
def test_streamed_quantized_experts_route_like_the_resident_model_with_quantized_experts(bits):
    """--stream --load-in-4bit/8bit quantizes each layer's fused experts as it is read
    (moetool.runtime.quant.bnb), exactly as quantize_experts does on the whole resident model."""
    from moetool.runtime.quant import bnb as quant
    from moetool.analysis.trace import record_trace

    fx = str(FIXTURES / "tiny-qwen3-moe")
    if bits == 4:
        try:
            quant.require_backend("cpu")
        except Exception as exc:  # noqa: BLE001 - no usable bitsandbytes 4-bit here
            pytest.skip(str(exc))
    lm = load_model(fx, stream=True, **{f"load_in_{bits}bit": True})
    assert lm.quantization.startswith("experts-")
    got = record_trace(lm, TEXTS, batch_size=2)
    assert lm.layer_reader.quant_report["bytes_after"] < lm.layer_reader.quant_report["bytes_before"]
    ref_lm = load_model(fx)
    quant.quantize_experts(ref_lm.model, bits=bits)
    ref = record_trace(ref_lm, TEXTS, batch_size=2)
    _same_routing(ref, got)
    again = record_trace(lm, TEXTS, batch_size=2)  # layers freed back to meta can be read again
    _same_routing(ref, again)


def test_resume_refuses_a_checkpoint_of_other_text(tmp_path):
    from moetool.errors import MoetoolError
    from moetool.runtime.executor import Executor
    from moetool.runtime.observers import RoutingRecorder

    lm = load_model(str(FIXTURES / "tiny-olmoe"), stream=True, run_dir=str(tmp_path))
    seqs = [lm.tokenizer(t)["input_ids"] for t in TEXTS]
    Executor(lm, batch_size=2).run(seqs, [RoutingRecorder(lm)])
    assert list(tmp_path.rglob("state.json"))
    again = load_model(str(FIXTURES / "tiny-olmoe"), stream=True, run_dir=str(tmp_path), resume=True)
    with pytest.raises(MoetoolError, match="other text or another model"):
        Executor(again, batch_size=2).run(seqs[:2], [RoutingRecorder(again)])
