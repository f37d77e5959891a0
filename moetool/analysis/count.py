"""Parameter counting: from a config (by the family's tensor templates) or from safetensors
headers (exactly what is on disk). Plain data in, plain data out; no torch."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

from moetool.families import ROLES, Family, ResolvedConfig

# Linear weights that weight-only quantization (fp8, 4-bit) converts; embeddings, LM head,
# routers and norms stay in bf16, as in DeepSeek's fp8 release and bitsandbytes' defaults.
QUANTIZED_ROLES = {"attention", "routed_experts", "shared_experts", "dense_mlp"}
FP8_BLOCK = 128  # DeepSeek-style 128x128 blocks with one fp32 scale each
NF4_BLOCK = 64  # bitsandbytes 4-bit default blocksize, one fp32 absmax per block


def _fp8_bytes(shape: tuple[int, ...]) -> int:
    *lead, rows, cols = shape
    batches = math.prod(lead) if lead else 1
    scales = batches * math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)
    return batches * rows * cols + 4 * scales


def _nf4_bytes(numel: int) -> int:
    # packed 4-bit values + fp32 absmax per block + the 16-entry fp32 code book
    return math.ceil(numel / 2) + 4 * math.ceil(numel / NF4_BLOCK) + 64


def weight_memory(tensors: Iterable[tuple[tuple[int, ...], str, int]]) -> dict:
    """Bytes of the weights at bf16, fp8 (block-scaled) and 4-bit (NF4), given
    (shape, role, multiplicity) triples."""
    bf16 = fp8 = nf4 = 0
    for shape, role, times in tensors:
        numel = math.prod(shape)
        bf16 += 2 * numel * times
        if role in QUANTIZED_ROLES and len(shape) >= 2:
            fp8 += _fp8_bytes(shape) * times
            nf4 += _nf4_bytes(numel) * times
        else:
            fp8 += 2 * numel * times
            nf4 += 2 * numel * times
    return {"bf16": bf16, "fp8": fp8, "int4": nf4}


def _empty_roles() -> dict[str, dict[str, int]]:
    return {role: {"total": 0, "active": 0} for role in ROLES}


def summarize(
    rc: ResolvedConfig,
    entries: Iterable[tuple[str, int, int | None]],
    per_layer: bool = False,
) -> dict:
    """Totals and activated counts from (role, numel, layer) entries of the main model.

    Routed experts are activated in proportion top_k / num_experts per MoE layer; every
    other parameter is touched by every token (embedding and head counted in full, the
    convention behind Mixtral's published 12.9B).
    """
    roles = _empty_roles()
    layers: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for role, numel, layer in entries:
        roles.setdefault(role, {"total": 0, "active": 0})["total"] += numel
        if layer is not None:
            layers[layer][role] += numel
    ratio = rc.top_k / rc.num_experts if rc.num_experts else 0.0
    for role, counts in roles.items():
        counts["active"] = round(counts["total"] * ratio) if role == "routed_experts" else counts["total"]
    total = sum(c["total"] for c in roles.values())
    active = sum(c["active"] for c in roles.values())
    report = {
        "total": total,
        "active": active,
        "active_without_embeddings": active - roles["embeddings"]["total"],
        "activated_fraction": active / total if total else 0.0,
        "roles": roles,
    }
    if per_layer:
        rows = []
        for layer in sorted(layers):
            counts = layers[layer]
            layer_total = sum(counts.values())
            routed = counts.get("routed_experts", 0)
            rows.append(
                {
                    "layer": layer,
                    "kind": "moe" if rc.is_moe_layer(layer) else "dense",
                    "total": layer_total,
                    "active": layer_total - routed + round(routed * ratio),
                    "roles": dict(counts),
                }
            )
        report["layers"] = rows
    return report


def architecture_summary(rc: ResolvedConfig) -> dict:
    moe = rc.moe_layers
    per_expert = 0
    if moe:
        per_expert = sum(
            t.numel for t in rc.family.layer_tensors(rc, moe[0]) if t.role == "routed_experts"
        ) // rc.num_experts
    return {
        "family": rc.family.name,
        "layers": rc.num_layers,
        "moe_layers": len(moe),
        "dense_layers": rc.num_layers - len(moe),
        "hidden_size": rc.hidden_size,
        "routed_experts": rc.num_experts,
        "zero_experts": rc.zero_experts,
        "experts_per_token": rc.top_k,
        "shared_experts": rc.num_shared_experts,
        "expert_intermediate_size": rc.expert_intermediate,
        "params_per_expert": per_expert,
        "scoring": rc.fields.get("scoring"),
        "n_group": rc.fields.get("n_group"),
        "topk_group": rc.fields.get("topk_group"),
        "mtp_layers": rc.mtp_layers,
        "vocab_size": rc.vocab_size,
    }


def kv_cache_per_token(rc: ResolvedConfig, bytes_per_element: int = 2) -> dict:
    """KV cache bytes per token of context. Only softmax-attention layers cache keys and values that grow with
    the context (hybrids: Mamba and linear-attention layers keep a fixed state instead, ``fixed_state``)."""
    attention = rc.attention_layers
    n_attn = len(attention)
    sliding = [L for L in attention if rc.attention_window(L)]
    full = [L for L in attention if not rc.attention_window(L)]
    out = {"bf16": sum(rc.kv_elements(L) for L in full) * bytes_per_element, "attention_layers": n_attn}
    if sliding:  # sliding-window layers keep at most their window: a fixed size per sequence, not per token
        out["full_attention_layers"] = len(full)
        out["sliding_window_layers"] = len(sliding)
        out["windows"] = sorted({rc.attention_window(L) for L in sliding})
        out["sliding_bf16_per_sequence"] = sum(rc.attention_window(L) * rc.kv_elements(L)
                                               for L in sliding) * bytes_per_element
    compressed = rc.fields.get("kv_elements_per_layer_compressed")
    if compressed:
        # MLA: serving engines cache the compressed latent + rope key; transformers caches
        # the decompressed per-head keys and values (the "bf16" figure above).
        out["mla_compressed_bf16"] = n_attn * compressed * bytes_per_element
    return out


def fixed_state(rc: ResolvedConfig, bytes_per_element: int = 2) -> dict | None:
    """The fixed-size state of the Mamba / linear-attention layers per sequence (it does not grow with the
    context): convolution window plus recurrent state, where the family describes its size; None for a model
    without such layers."""
    n_state = len(rc.state_layers)
    if not n_state:
        return None
    out: dict = {"state_layers": n_state}
    elements = rc.state_elements_per_layer
    if elements is not None:
        out["elements_per_layer"] = elements
        out["bf16"] = n_state * elements * bytes_per_element
    return out


def flops_per_token(rc: ResolvedConfig, active_matmul_params: int, context: int) -> dict:
    """Forward FLOPs for one token: 2 x activated matmul weights, plus attention over ``context``
    previous tokens (QK^T and AV, 2 FLOPs per multiply-add) in the softmax-attention layers (a
    sliding-window layer over at most its window)."""
    attended = sum(min(context, rc.attention_window(L) or context) for L in rc.attention_layers)
    attention = 2 * attended * (rc.attn_qk_width + rc.attn_v_width)
    return {
        "matmul": 2 * active_matmul_params,
        "attention": attention,
        "context": context,
        "total": 2 * active_matmul_params + attention,
    }


def count_config(rc: ResolvedConfig, per_layer: bool = False, context: int = 4096) -> dict:
    """Count a model from its config alone."""
    fam: Family = rc.family
    groups = list(fam.tensor_groups(rc, include_mtp=True))
    main = [(t, n) for t, n in groups if not t.mtp]
    report = summarize(rc, ((t.role, t.numel * n, t.layer) for t, n in main), per_layer=per_layer)
    report["mtp_params"] = sum(t.numel * n for t, n in groups if t.mtp)
    report["scale_params"] = 0
    report["architecture"] = architecture_summary(rc)
    report["memory"] = weight_memory((t.shape, t.role, n) for t, n in main)
    report["kv_cache_bytes_per_token"] = kv_cache_per_token(rc)
    state = fixed_state(rc)
    if state is not None:
        report["fixed_state_bytes_per_sequence"] = state
    report["flops_per_token"] = flops_per_token(rc, _active_matmul(report), context)
    if rc.zero_experts:  # a choice of a zero-computation expert computes nothing: active is a range
        report["active_min"] = report["active"] - report["roles"]["routed_experts"]["active"]
        report["active_min_without_embeddings"] = report["active_min"] - report["roles"]["embeddings"]["total"]
    report["warnings"] = []
    return report


def _active_matmul(report: dict) -> int:
    # the input embedding is a lookup, not a matmul; norms are elementwise
    roles = report["roles"]
    return report["active"] - roles["embeddings"]["active"] - roles["norms"]["active"]
