"""Hybrid models: only softmax-attention layers have a KV cache that grows with the context; Mamba and
linear-attention layers keep a fixed state per sequence (the family's "cache" section, data). Expected
figures are computed by hand from the published configs (written out below), not by the code under test."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES
from moetool.analysis.params import count_params

# preset -> (attention layers, KV bytes per token at bf16, state layers, fixed state bytes per sequence at bf16)
HAND = {
    # Jamba-v0.1: 32 layers, attention where L % 8 == 4 -> 4 layers; KV 2 x 8 heads x 128 x 2 bytes each;
    # 28 Mamba layers of 2 x 4096 = 8192 channels x (d_conv 4 + d_state 16)
    "jamba-v0.1": (4, 4 * 2 * 8 * 128 * 2, 28, 28 * 8192 * (4 + 16) * 2),
    # Qwen3-Next-80B-A3B: 48 layers, every 4th full attention -> 12; KV 2 x 2 heads x 256; 36 Gated DeltaNet
    # layers: conv window (2 x 16 x 128 + 32 x 128) x 4, recurrent 32 heads x 128 x 128
    "qwen3-next-80b-a3b": (12, 12 * 2 * 2 * 256 * 2, 36, 36 * ((2 * 2048 + 4096) * 4 + 32 * 128 * 128) * 2),
    # Nemotron 3 Nano: pattern with 6 '*' (attention), 23 'M' (Mamba2); KV 2 x 2 heads x 128; Mamba2 conv window
    # (64 x 64 + 2 x 8 groups x 128) x 4, SSM state 64 heads x 64 x 128
    "nemotron-3-nano-30b-a3b": (6, 6 * 2 * 2 * 128 * 2, 23, 23 * ((4096 + 2 * 8 * 128) * 4 + 4096 * 128) * 2),
    # Kimi-Linear-48B-A3B: MLA in layers 4, 8, ..., 24, 27 (1-based) -> 7; transformers caches 32 heads x
    # (192 + 128); 20 KDA layers: q/k/v conv windows 3 x 4096 x 4, recurrent 32 heads x 128 x 128
    "kimi-linear-48b-a3b": (7, 7 * 32 * (192 + 128) * 2, 20, 20 * (3 * 4096 * 4 + 32 * 128 * 128) * 2),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hybrid_kv_cache_and_state_by_hand(name):
    n_attn, kv, n_state, state = HAND[name]
    r = count_params(name, context=4096)
    assert r["kv_cache_bytes_per_token"]["attention_layers"] == n_attn
    assert r["kv_cache_bytes_per_token"]["bf16"] == kv
    assert r["fixed_state_bytes_per_sequence"]["state_layers"] == n_state
    assert r["fixed_state_bytes_per_sequence"]["bf16"] == state
    arch = r["architecture"]
    assert r["flops_per_token"]["attention"] == 2 * n_attn * 4096 * _attn_width(name)
    assert arch["layers"] >= n_attn + n_state


def _attn_width(name: str) -> int:
    # qk width + v width of one attention layer, from the published configs
    return {"jamba-v0.1": 2 * 32 * 128, "qwen3-next-80b-a3b": 2 * 16 * 256,
            "nemotron-3-nano-30b-a3b": 2 * 32 * 128, "kimi-linear-48b-a3b": 32 * 192 + 32 * 128}[name]


def test_mla_compressed_kv_counts_only_attention_layers():
    r = count_params("kimi-linear-48b-a3b")
    assert r["kv_cache_bytes_per_token"]["mla_compressed_bf16"] == 7 * (512 + 64) * 2


def test_non_hybrid_models_are_unchanged():
    r = count_params("mixtral-8x7b")
    assert r["kv_cache_bytes_per_token"] == {"bf16": 32 * 2 * 8 * 128 * 2, "attention_layers": 32}
    assert "fixed_state_bytes_per_sequence" not in r
    assert r["flops_per_token"]["attention"] == 2 * 32 * 4096 * 2 * 32 * 128


def test_derived_hybrid_finds_its_attention_layers():
    """A derived family (GraniteMoeHybrid) reads which layers attend from transformers' own model: the
    config's layer_types say the same."""
    path = FIXTURES / "derived-granitemoehybrid"
    types = json.loads((path / "config.json").read_text())["layer_types"]
    r = count_params(str(path))
    attention = sum(t == "full_attention" for t in types)
    assert 0 < attention < len(types)
    assert r["kv_cache_bytes_per_token"]["attention_layers"] == attention
    assert r["fixed_state_bytes_per_sequence"]["state_layers"] == len(types) - attention


def test_plan_counts_kv_only_for_attention_layers():
    from moetool.analysis.plan import plan

    context, batch = 1000, 3
    report = plan("nemotron-3-nano-30b-a3b", gpus=0, context=context, batch=batch).report
    n_attn, kv, n_state, state = HAND["nemotron-3-nano-30b-a3b"]
    assert report["kv_cache_bytes"] == kv * context * batch + state * batch


# sliding-window attention: a sliding layer caches at most its window, a fixed size per sequence; only full
# attention layers grow with the context. preset -> (full layers, KV bytes per token, sliding layers, window,
# sliding KV bytes per sequence), worked out by hand from the published configs
SLIDING = {
    # gpt-oss-120b: 36 layers alternating sliding (window 128) / full; 8 KV heads x 64 -> 2 x 8 x 64 x 2 bytes
    "gpt-oss-120b": (18, 18 * 2 * 8 * 64 * 2, 18, 128, 18 * 128 * 2 * 8 * 64 * 2),
    # Gemma 4 26B A4B: 30 layers, every 6th full; full layers K = V with 2 global KV heads x 512 (transformers
    # caches keys and values both); sliding layers 8 KV heads x 256, window 1024
    "gemma-4-26b-a4b": (5, 5 * 2 * 2 * 512 * 2, 25, 1024, 25 * 1024 * 2 * 8 * 256 * 2),
}


@pytest.mark.parametrize("name", sorted(SLIDING))
def test_sliding_window_kv_by_hand(name):
    n_full, kv, n_sliding, window, per_sequence = SLIDING[name]
    r = count_params(name, context=4096)
    c = r["kv_cache_bytes_per_token"]
    assert (c["full_attention_layers"], c["bf16"], c["sliding_window_layers"], c["windows"],
            c["sliding_bf16_per_sequence"]) == (n_full, kv, n_sliding, [window], per_sequence)


def test_sliding_window_attention_flops_and_plan_kv():
    from moetool.analysis.plan import plan

    r = count_params("gpt-oss-120b", context=4096)
    # 64 heads x 64 for QK^T and again for AV; full layers over 4096 tokens, sliding ones over 128
    assert r["flops_per_token"]["attention"] == 2 * (18 * 4096 + 18 * 128) * 2 * 64 * 64
    context, batch = 1000, 2
    report = plan("gpt-oss-120b", gpus=0, context=context, batch=batch).report
    assert report["kv_cache_bytes"] == (18 * context + 18 * 128) * 2 * 8 * 64 * 2 * batch


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gemma-4-26b-a4b", "mixtral-8x7b", "phi-3.5-moe",
                                   str(FIXTURES / "tiny-gpt-oss"), str(FIXTURES / "tiny-gemma4")])
def test_sliding_windows_are_transformers_layer_types(model):
    """The family's window rule picks exactly the layers transformers' own config makes sliding-window
    attention, with its window (transformers fills layer_types in when a config has none)."""
    from moetool.checkpoint.source import resolve
    from moetool.families.derive import hf_config_for
    from moetool.families.resolve import resolve_family

    source = resolve(model)
    rc = resolve_family(source)
    hf = hf_config_for(source.config)
    hf = getattr(hf, "text_config", None) or hf
    types = getattr(hf, "layer_types", None)
    if types:
        want = [hf.sliding_window if t == "sliding_attention" else 0 for t in types]
    else:  # Mixtral, PhiMoE: a sliding_window, when set, applies to every layer
        want = [hf.sliding_window or 0] * rc.num_layers
    assert [rc.attention_window(L) for L in range(rc.num_layers)] == want
