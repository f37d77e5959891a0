"""Derived families: every MoE family of the installed transformers, counted exactly as
transformers' own model on the meta device counts it."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, assert_one_line_error, params_without_torch, run_cli

pytest.importorskip("transformers")

# families whose default config transformers itself cannot build, or that moetool does not
# handle, with the reason: the scan must report exactly these (a new transformers that changes
# the list fails here, so the list stays true)
UNSUPPORTED = json.loads((ROOT / "tests" / "data" / "unsupported_families.json").read_text())
# families where the checkpoint layout (what moetool counts) differs from transformers' model
KNOWN_DIFFERENCES = {
    "inkling2_text": "the checkpoint stores the LM head with a padded vocabulary (Inkling2UnpadVocab cuts it on load)",
    "inkling2_loop_text": "the checkpoint stores the LM head with a padded vocabulary (Inkling2UnpadVocab cuts it on load)",
    "longcat_flash": "transformers allocates gate/up rows for the zero-computation experts too; the published checkpoints "
                     "do not have them and the curated family does not count them (tests/test_curated.py checks the "
                     "difference is exactly those rows)",
}


@pytest.fixture(scope="module")
def scan():
    from moetool.families.catalog import scan as run_scan

    return {row["model_type"]: row for row in run_scan()}


def test_every_moe_family_counts_exactly(scan, tmp_path):
    """One test over every MoE family (a parametrised test would have to scan at collection)."""
    from moetool.families.catalog import tiny_config
    from moetool.families.derive import build_meta_model, hf_config_for, meta_count
    from moetool.analysis.params import count_params

    moe = sorted(mt for mt, row in scan.items() if row["status"] == "moe")
    assert len(moe) >= 50, moe  # transformers 5.24 has about 60 buildable MoE text families
    failures = []
    for mt in moe:
        cfg = tiny_config(mt)
        path = tmp_path / f"{mt}.json"
        path.write_text(json.dumps(cfg))
        report = count_params(str(path))
        truth = meta_count(build_meta_model(hf_config_for(cfg)))
        arch = report["architecture"]
        if arch["moe_layers"] < 1 or arch["routed_experts"] < 2 or not 1 <= arch["experts_per_token"] <= arch["routed_experts"]:
            failures.append(f"{mt}: {arch}")
        if mt in KNOWN_DIFFERENCES:
            if report["total"] == truth:
                failures.append(f"{mt}: listed as a known difference but now counts exactly")
        elif report["total"] != truth:
            failures.append(f"{mt}: moetool {report['total']:,} != transformers {truth:,}")
        if sum(r["total"] for r in report["roles"].values()) != report["total"]:
            failures.append(f"{mt}: roles do not sum to the total")
    assert not failures, "\n".join(failures)


def test_unsupported_families_are_the_committed_list(scan):
    found = {mt: row["reason"] for mt, row in scan.items() if row["status"] == "unsupported"}
    assert set(found) == set(UNSUPPORTED), (sorted(set(found) - set(UNSUPPORTED)), sorted(set(UNSUPPORTED) - set(found)))
    for mt, reason in found.items():
        assert reason and UNSUPPORTED[mt]["why"], mt


def test_families_cover_the_issue_list(scan):
    wanted = ["deepseek_v32", "deepseek_v4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "qwen3_next", "qwen3_5_moe_text",
              "minimax_m2", "llama4_text", "phimoe", "mistral4", "gemma4_text", "nemotron_h", "kimi_linear",
              "ernie4_5_moe", "longcat_flash", "jamba"]
    assert [mt for mt in wanted if scan.get(mt, {}).get("status") != "moe"] == []


def test_routing_interface_is_recorded(scan):
    # gpt-oss, Llama 4 and JetMoE experts do not take (hidden_states, top_k_index, top_k_weights)
    assert scan["gpt_oss"]["routing"] == ["router_output"]
    assert scan["llama4_text"]["routing"] == ["router_output"]
    assert scan["mixtral"]["routing"] == ["experts_input"]


def test_derived_spec_layouts_and_disk_names(tmp_path):
    from moetool.families.catalog import tiny_config
    from moetool.families.derive import derived_spec
    from moetool.families import Family

    fam = Family(derived_spec(tiny_config("glm4_moe")))  # curated too; derived here on purpose
    assert fam.level == "derived"
    rc = fam.resolve(tiny_config("glm4_moe"))
    assert rc.moe_layers == [1, 2, 3] and rc.num_experts == 8 and rc.top_k == 2
    names = {t.name for t in fam.tensors(rc)}
    # per-expert on disk (transformers fuses them on load), router with DeepSeek-style bias
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    m = fam.classify("model.layers.2.mlp.experts.5.gate_proj.weight")
    assert (m.role, m.layer, m.expert) == ("routed_experts", 2, 5)
    assert fam.runtime_layouts == [{"block": "model.layers.{L}.mlp", "router": "gate", "experts": "experts",
                                    "routing": "experts_input", "shared": "shared_experts"}]
    from moetool.families.resolve import config_keys

    assert config_keys(fam, "num_experts") == ["n_routed_experts"]
    assert config_keys(fam, "top_k") == ["num_experts_per_tok"]


def test_fused_on_disk_family_keeps_fused_names():
    from moetool.families.catalog import tiny_config
    from moetool.families import family_for_config

    cfg = tiny_config("gpt_oss")  # curated, but derive it anyway to check the conversion path
    from moetool.families.derive import derive_spec
    from moetool.families import Family

    fam = Family(derive_spec(cfg))
    fused = [t for t in fam.spec["tensors"]["moe_layer"] if t.get("fused")]
    assert {t["name"] for t in fused} >= {"model.layers.{L}.mlp.experts.gate_up_proj", "model.layers.{L}.mlp.experts.down_proj"}
    assert family_for_config(cfg).level == "curated"


def test_mixers_and_zero_experts_are_reported(tmp_path):
    from moetool.families.catalog import tiny_config
    from moetool.analysis.params import count_params

    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config("qwen3_next")))
    r = count_params(str(path))
    assert r["roles"]["mixers"]["total"] > 0  # Gated DeltaNet linear attention
    assert r["roles"]["mixers"]["active"] == r["roles"]["mixers"]["total"]
    path.write_text(json.dumps(tiny_config("longcat_flash")))
    from moetool.families import family_for_config

    cfg = tiny_config("longcat_flash")
    fam = family_for_config(cfg)  # curated: zero_experts is an expression over the config
    assert fam.resolve(cfg).zero_experts > 0
    report = count_params(str(path))
    assert any("zero-computation" in n for n in report["notes"])
    assert report["active_min"] < report["active"]


def test_deepseek_v2_null_top_k_is_one_line_error(tmp_path):
    cfg = {"model_type": "deepseek_v2", "num_experts_per_tok": None, "hidden_size": 64, "num_hidden_layers": 2,
           "vocab_size": 100, "n_routed_experts": 4, "moe_intermediate_size": 8, "intermediate_size": 16,
           "num_attention_heads": 2, "kv_lora_rank": 8, "q_lora_rank": None, "qk_nope_head_dim": 8,
           "qk_rope_head_dim": 4, "v_head_dim": 8}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    result = run_cli("params", path)
    assert result.returncode == 2
    assert_one_line_error(result, "num_experts_per_tok")


def test_unknown_model_type_is_one_line_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "no_such_moe", "num_hidden_layers": 2}))
    result = run_cli("params", path)
    assert result.returncode == 2
    assert_one_line_error(result, "no_such_moe")


def test_cached_derived_params_is_fast_without_transformers(tmp_path):
    from moetool.families.catalog import tiny_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config("minimax_m2")))
    first = run_cli("params", path, "--json")
    assert first.returncode == 0, first.stderr
    result, wall = params_without_torch(path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total"] == json.loads(first.stdout)["total"]
    assert wall < 1.0, f"cached derived params took {wall:.2f}s"


def test_families_command_json():
    result = run_cli("families", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    levels = {row["model_type"]: row["level"] for row in data["families"]}
    assert levels["mixtral"] == "curated" and levels["qwen3_next"] in ("curated", "derived")
    assert levels["switch_transformers"] == "unsupported"
    assert all(row.get("reason") for row in data["families"] if row["level"] == "unsupported")
    assert data["counts"]["derived"] >= 40


# -- a derived family end to end: fixtures/derived-granitemoehybrid (Mamba2 + attention + MoE, no JSON) ----------
DERIVED = ROOT / "fixtures" / "derived-granitemoehybrid"
TEXT = ("def route(tokens):\n    return sorted(tokens, key=len)\n"
        "The router sends each token to two experts; their outputs are mixed by weight.")


def test_derived_checkpoint_params_equal_transformers():
    from moetool.families.derive import build_meta_model, hf_config_for, meta_count
    from moetool.analysis.params import count_params

    config = json.loads((DERIVED / "config.json").read_text())
    r = count_params(str(DERIVED))
    assert r["family_level"] == "derived" and r["source"] == "checkpoint"
    assert r["warnings"] == []  # every tensor on disk classified, disk and config agree
    assert r["total"] == meta_count(build_meta_model(hf_config_for(config)))
    assert r["roles"]["mixers"]["total"] > 0  # the Mamba mixers, counted apart from attention


def test_commands_run_on_a_derived_family(tmp_path):
    """trace (counts equal the experts module's own inputs), eval and plan on the derived fixture;
    prune exactness and merge loading are in test_prune / test_merge."""
    import numpy as np
    import torch

    from moetool.analysis.evaluate import evaluate_models
    from moetool.runtime.loading import moe_blocks
    from moetool.analysis.plan import plan
    from moetool.analysis.trace import trace_model

    trace, loaded = trace_model(str(DERIVED), [TEXT])
    seen = {}
    hooks = [experts.register_forward_pre_hook(lambda mod, args, L=L: seen.__setitem__(L, args[1].clone()))
             for L, _block, _router, experts in moe_blocks(loaded)]
    ids = loaded.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        loaded.model(**ids)
    for h in hooks:
        h.remove()
    assert sorted(seen) == sorted(trace.experts) == loaded.rc.moe_layers == [0, 1, 2, 3]
    for L, index in seen.items():  # the trace holds exactly what the experts module received
        got = np.sort(trace.experts[L].astype(np.int64), axis=1)
        want = np.sort(index.reshape(-1, index.shape[-1]).numpy(), axis=1)
        assert np.array_equal(got, want), L
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    result = evaluate_models([str(DERIVED)], str(text), max_tokens=64)
    assert result
    placed = plan(str(DERIVED), gpu_memory="1MB")
    assert placed.report["family"] == "granitemoehybrid"


def test_block_that_is_the_decoder_layer():
    """Gemma 4 puts router and experts directly in the decoder layer: the layer's own scalar is
    not part of the router."""
    from moetool.families.catalog import tiny_config
    from moetool.families.derive import derive_spec

    spec = derive_spec(tiny_config("gemma4_text"))
    roles = {t["name"]: t["role"] for g in spec["tensors"].values() for t in g}
    assert roles["model.layers.{L}.layer_scalar"] == "other"
    assert roles["model.layers.{L}.router.proj.weight"] == "router"
    assert spec["runtime"]["layouts"][0]["block"] == "model.layers.{L}"
