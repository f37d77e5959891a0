"""Curated families (hand-reviewed JSON, no torch at run time) against transformers' own model on
the meta device, over several config variants each, and against the derived spec."""

from __future__ import annotations

import json

import pytest

from moetool.families import all_families

pytest.importorskip("transformers")

ABSENT = "(key left out of config.json)"  # a variant value that removes the key

# model_type -> config variants (on top of transformers' defaults with few layers and experts)
_MLA = [
    {},
    {"attention_bias": True, "first_k_dense_replace": 1, "n_shared_experts": 2},
    {"mlp_layer_types": ["dense", "sparse", "dense", "sparse", "sparse"], "tie_word_embeddings": True},
]
VARIANTS = {
    "kimi_linear": [
        {},
        {"layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"], "q_lora_rank": 96,
         "attention_bias": True, "tie_word_embeddings": True},
        {"layer_types": None, "mlp_layer_types": None, "first_k_dense_replace": 2, "num_shared_experts": 2,
         "linear_attn_config": {"full_attn_layers": [2, 4], "kda_layers": [1, 3], "head_dim": 64, "num_heads": 8,
                                "short_conv_kernel_size": 3}},
    ],
    "longcat_flash": [{}, {"attention_bias": True, "router_bias": True, "zero_expert_num": 3},
                      {"tie_word_embeddings": True, "qk_head_dim": None, "qk_nope_head_dim": 64, "num_layers": 3}],
    "nemotron_h": [{}, {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe", "mlp"],
                        "mlp_bias": True, "use_bias": True, "use_conv_bias": False, "moe_latent_size": 1024},
                   {"layers_block_type": None, "hybrid_override_pattern": "ME*EM-E", "n_groups": 4,
                    "num_key_value_heads": 4, "head_dim": 64}],
    "gemma4_text": [
        {},
        {"num_hidden_layers": 6, "layer_types": None, "per_layer_config": ABSENT, "global_head_dim": 128,
         "num_global_key_value_heads": 1, "attention_k_eq_v": True, "hidden_size_per_layer_input": 32,
         "vocab_size_per_layer_input": 1000},
        {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
         "per_layer_config": {"1": {"head_dim": 96, "num_key_value_heads": 2}, "03": {"head_dim": 96, "num_key_value_heads": 2}},
         "num_kv_shared_layers": 2, "use_double_wide_mlp": True, "attention_bias": True, "tie_word_embeddings": False},
    ],
    "deepseek_v4": [
        {},
        {"num_hidden_layers": 5, "layer_types": None, "mlp_layer_types": None, "num_hash_layers": 1,
         "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}, "hc_mult": 3,
         "o_groups": 4, "mlp_bias": True},
        {"num_hidden_layers": 4, "layer_types": None, "mlp_layer_types": None,
         "compress_ratios": [0, 4, 128, 4], "index_n_heads": 8, "index_head_dim": 64, "tie_word_embeddings": True},
    ],
    "mistral4": [{}, {"first_k_dense_replace": 2, "q_lora_rank": None, "attention_bias": True},
                 {"n_shared_experts": 2, "tie_word_embeddings": True, "v_head_dim": 64, "qk_rope_head_dim": 32}],
    "jamba": [{}, {"attn_layer_period": 2, "attn_layer_offset": 1, "mamba_proj_bias": True, "mamba_conv_bias": False},
              {"expert_layer_period": 1, "expert_layer_offset": 0, "mamba_dt_rank": 12, "mamba_expand": 3}],
    "llama4_text": [{}, {"interleave_moe_layer_step": 2, "attention_bias": True},
                    {"moe_layers": [0, 3], "tie_word_embeddings": True, "num_key_value_heads": 4}],
    "qwen3_next": [{}, {"full_attention_interval": 2, "attention_bias": True, "mlp_only_layers": [0]},
                   {"layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention"],
                    "decoder_sparse_step": 2, "linear_num_key_heads": 8, "head_dim": 128}],
    "qwen3_5_moe_text": [{}, {"full_attention_interval": 2, "tie_word_embeddings": True},
                         {"layer_types": ["linear_attention", "full_attention", "full_attention", "linear_attention"],
                          "linear_value_head_dim": 64, "attention_bias": True}],
    "minimax_m2": [{}, {"head_dim": 64, "num_key_value_heads": 2, "tie_word_embeddings": True}],
    "phimoe": [{}, {"attention_bias": True, "lm_head_bias": True}, {"num_key_value_heads": 4, "tie_word_embeddings": True}],
    "ernie4_5_moe": [{}, {"use_bias": True, "tie_word_embeddings": False, "moe_num_shared_experts": 0},
                     {"moe_layer_start_index": 0, "moe_layer_interval": 2, "moe_layer_end_index": 2,
                      "moe_num_shared_experts": 2}],
    "deepseek_v32": _MLA + [{"index_n_heads": 16, "index_head_dim": 64}],
    "glm_moe_dsa": _MLA + [{"index_n_heads": 8},  # shared DSA layers have no indexer of their own
                           {"indexer_types": ["full", "shared", "full", "shared", "shared"]},
                           {"indexer_types": ABSENT, "index_topk_freq": 2, "index_skip_topk_offset": 1},
                           {"indexer_types": ABSENT, "index_topk_pattern": "FSSFS"}],
    "glm4_moe_lite": [{}, {"q_lora_rank": None}, {"attention_bias": True, "first_k_dense_replace": 2,
                                                  "qk_rope_head_dim": 32, "v_head_dim": 96}],
    "glm4_moe": [
        {},
        {"attention_bias": True, "use_qk_norm": True, "first_k_dense_replace": 2, "head_dim": 64},
        {"n_shared_experts": 2, "tie_word_embeddings": True, "first_k_dense_replace": 0, "num_key_value_heads": 2},
    ],
}
# families whose transformers model holds weights their published checkpoints do not have and moetool does not
# count (docs/families.md): model_type -> function(meta model) -> parameters to leave out
def _unused_zero_expert_rows(model) -> int:
    """LongCat-Flash: transformers allocates gate/up rows for the zero-computation experts too (never used)."""
    n = 0
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if name.endswith("experts") and gate_up is not None and down is not None and gate_up.dim() == 3:
            n += (gate_up.shape[0] - down.shape[0]) * gate_up.shape[1] * gate_up.shape[2]
    return n


NOT_COUNTED = {"longcat_flash": _unused_zero_expert_rows}
CURATED = sorted(mt for f in all_families().values() for mt in f.spec["model_types"] if mt in VARIANTS)


def _cases():
    for mt in CURATED:
        for i, v in enumerate(VARIANTS[mt]):
            yield pytest.param(mt, v, id=f"{mt}-{i}")


@pytest.mark.parametrize("model_type,overrides", list(_cases()))
def test_curated_equals_transformers(model_type, overrides, tmp_path):
    from moetool.families.catalog import tiny_config
    from moetool.families.derive import build_meta_model, hf_config_for, meta_count
    from moetool.analysis.params import count_params

    cfg = {k: v for k, v in {**tiny_config(model_type), **overrides}.items() if v != ABSENT}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    report = count_params(str(path))
    assert report["family_level"] == "curated"
    model = build_meta_model(hf_config_for(cfg))
    unused = NOT_COUNTED[model_type](model) if model_type in NOT_COUNTED else 0
    if model_type in NOT_COUNTED:
        assert unused > 0  # the difference is real, not a blanket exemption
    assert report["total"] == meta_count(model) - unused


@pytest.mark.parametrize("model_type", CURATED)
def test_curated_roles_equal_derived(model_type, tmp_path):
    """The curated spec and the derived one agree role by role (the derived spec is the truth
    about what each tensor is; the curated one adds expressions)."""
    from moetool.families.catalog import tiny_config
    from moetool.analysis.count import count_config
    from moetool.families.derive import derive_spec
    from moetool.families import Family, family_for_config

    cfg = tiny_config(model_type)
    curated = family_for_config(cfg)
    derived = Family(derive_spec(cfg))
    a = count_config(curated.resolve(cfg))["roles"]
    b = count_config(derived.resolve(cfg))["roles"]
    if model_type in NOT_COUNTED:  # the derived spec lists what transformers holds
        from moetool.families.derive import build_meta_model, hf_config_for

        b["routed_experts"]["total"] -= NOT_COUNTED[model_type](build_meta_model(hf_config_for(cfg)))
    assert {k: v["total"] for k, v in a.items() if v["total"]} == {k: v["total"] for k, v in b.items() if v["total"]}
    assert curated.resolve(cfg).moe_layers == derived.resolve(cfg).moe_layers


# preset -> (which active figure the publisher quotes, tolerance on active, tolerance on total);
# figures quoted as "30B-A3B" are rounded, hence the wider tolerances there
PUBLISHED = {
    "glm-4.5": ("without_embeddings_and_head", 0.02, 0.01),
    "glm-5": ("active", 0.03, 0.01),
    "glm-4.7-flash": ("without_embeddings_and_head", 0.10, 0.01),
    "deepseek-v3.2-exp": ("without_embeddings_and_head", 0.02, 0.01),
    "qwen3-next-80b-a3b": ("without_embeddings_and_head", 0.10, 0.01),
    "qwen3.5-397b-a17b": ("active", 0.03, 0.01),
    "minimax-m2": ("without_embeddings_and_head", 0.03, 0.01),
    "phi-3.5-moe": ("active", 0.01, 0.01),
    "llama-4-scout-17b-16e": ("active", 0.03, 0.02),
    "jamba-v0.1": ("active", 0.02, 0.01),
    "ernie-4.5-21b-a3b": ("without_embeddings_and_head", 0.05, 0.05),
    "kimi-linear-48b-a3b": ("without_embeddings_and_head", 0.10, 0.03),
    "mistral-small-4-119b": ("without_embeddings_and_head", 0.10, 0.01),
    "longcat-flash": ("without_embeddings_and_head", 0.03, 0.01),
    "nemotron-3-nano-30b-a3b": ("active", 0.02, 0.01),
    "gemma-4-26b-a4b": ("active", 0.02, 0.01),
    "deepseek-v4-flash": ("without_embeddings_and_head", 0.03, 0.01),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_curated_presets_match_published_figures(name):
    from moetool.analysis.params import count_params

    r = count_params(name)
    pub = r["preset"]["published"]
    which, tol_active, tol_total = PUBLISHED[name]
    assert abs(r["total"] - pub["total"]) / pub["total"] < tol_total, r["total"]
    active = r["active"]
    if which == "without_embeddings_and_head":
        active = r["active_without_embeddings"] - r["roles"]["lm_head"]["active"]
    assert abs(active - pub["active"]) / pub["active"] < tol_active, active


@pytest.mark.parametrize("name", ["qwen3-next-80b-a3b", "glm-4.5", "qwen3.5-397b-a17b", "kimi-linear-48b-a3b",
                                  "mistral-small-4-119b", "longcat-flash", "nemotron-3-nano-30b-a3b",
                                  "gemma-4-26b-a4b", "deepseek-v4-flash"])
def test_curated_params_needs_no_torch(name):
    from conftest import params_without_torch

    result, wall = params_without_torch(name)
    assert result.returncode == 0, result.stderr
    assert wall < 1.0, f"moetool params {name} took {wall:.2f}s"


def test_every_layout_names_its_routing_interface():
    """The executor picks its adapter by this: experts modules that take (hidden_states,
    top_k_index, top_k_weights), or routing read from the router's output."""
    for fam in all_families().values():
        for layout in fam.runtime_layouts:
            assert layout.get("routing") in ("experts_input", "router_output"), fam.name
