"""Statistics of a routing trace, as plain data (what `moetool trace --json` prints).

numpy only: summarising a saved trace never imports torch. Definitions (T tokens traced,
k experts per token, E experts per layer, c_i tokens that chose expert i, so sum c_i = T*k):

- ``expert_counts[i]`` = c_i; ``expert_fraction[i]`` = c_i / T, the fraction of tokens that
  chose expert i (sums to k); ``expert_share[i]`` = c_i / (T*k) (sums to 1).
- ``max_over_mean`` = max c_i / mean c_i (1 = perfectly balanced, E/k = all tokens on k experts);
  ``cv`` = std(c) / mean(c) (population std; 0 = balanced).
- ``load_entropy`` = entropy in bits of ``expert_share``; ``load_entropy_normalized`` divides by
  log2(E) (1 = balanced).
- ``routing_entropy`` = mean over tokens of the entropy in bits of the token's own top-k
  weights renormalised to sum 1 (0 = one expert takes all the weight, log2(k) = even mix).
  ``router_entropy`` (only when logits were recorded) = mean entropy of softmax(logits) over
  all E experts.
- ``lb_loss`` = E * sum_i f_i * P_i, the Switch-Transformer load-balancing loss with
  f_i = expert_share[i] and P_i = mean over tokens of the router probability of expert i:
  softmax(logits) when logits were recorded (``lb_loss_source`` = "logits"), otherwise each
  token's top-k weights renormalised to sum 1, zero elsewhere ("weights"). 1.0 = balanced;
  transformers' ``load_balancing_loss_func`` (before its coefficient) is k times this value.
- ``top_pairs``: the most frequent pairs of experts chosen together by one token, with
  ``count``, ``fraction`` (of tokens) and ``lift`` = count * T / (c_a * c_b), the ratio to
  choosing the two independently (approximate: a token's k choices are distinct).
- ``expert_weight_mean[i]`` = mean routing weight expert i received when chosen.
"""

from __future__ import annotations

import numpy as np

TOKEN_VIEW_LIMIT = 64  # the token-by-token view is given for traces up to this many tokens
TOP_PAIRS = 5


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def layer_stats(ids: np.ndarray, weights: np.ndarray, num_experts: int, logits: np.ndarray | None = None,
                top_pairs: int = TOP_PAIRS, zero_experts: int = 0) -> dict:
    """Statistics of one layer's routing: ids/weights [T, k], optional logits [T, E + zero_experts].
    Per-expert figures cover the E routed experts; choices of a zero-computation expert (ids >= E)
    are counted apart (``zero_expert_share``) and in no pair."""
    T, k = ids.shape
    E = num_experts
    W = E + zero_experts
    flat = ids.astype(np.int64).ravel()
    counts = np.bincount(flat, minlength=E)[:E]
    total = max(T * k, 1)
    share = counts / total
    mean = total / E
    w = weights.astype(np.float64)
    wsum = w.sum(axis=1, keepdims=True)
    wnorm = np.divide(w, wsum, out=np.full_like(w, 1.0 / k), where=wsum > 0)
    wsum_per_expert = np.bincount(flat, weights=w.ravel(), minlength=E)[:E]
    weight_mean = np.divide(wsum_per_expert, counts, out=np.zeros(E), where=counts > 0)

    if logits is not None and T:
        probs = _softmax(logits)
        P = probs.mean(axis=0)[:E]
        lb_source = "logits"
        router_entropy = float(_entropy_bits(probs).mean())
    else:
        P = np.bincount(flat, weights=wnorm.ravel(), minlength=E)[:E] / max(T, 1)
        lb_source = "weights"
        router_entropy = None

    pairs = []
    if k >= 2 and T:
        s = np.sort(ids.astype(np.int64), axis=1)
        a_idx, b_idx = np.triu_indices(k, 1)
        codes = (s[:, a_idx] * W + s[:, b_idx]).ravel()
        pc = np.bincount(codes, minlength=W * W).reshape(W, W)[:E, :E].ravel()  # pairs of routed experts
        top = np.argsort(-pc, kind="stable")[:top_pairs]
        for code in top:
            c = int(pc[code])
            if c == 0:
                break
            a, b = divmod(int(code), E)
            denom = counts[a] * counts[b]
            pairs.append({"experts": [a, b], "count": c, "fraction": round(c / T, 6),
                          "lift": round(c * T / denom, 4) if denom else None})

    out = {
        "tokens": int(T),
        "expert_counts": [int(c) for c in counts],
        "expert_fraction": [round(float(c) / max(T, 1), 6) for c in counts],
        "expert_share": [round(float(x), 6) for x in share],
        "expert_weight_mean": [round(float(x), 6) for x in weight_mean],
        "max_over_mean": round(float(counts.max() / mean), 4) if T else None,
        "cv": round(float(counts.std() / mean), 4) if T else None,
        "load_entropy": round(float(_entropy_bits(share)), 4),
        "load_entropy_normalized": round(float(_entropy_bits(share) / np.log2(E)), 4) if E > 1 else 1.0,
        "routing_entropy": round(float(_entropy_bits(wnorm).mean()), 4) if T else None,
        "router_entropy": None if router_entropy is None else round(router_entropy, 4),
        "lb_loss": round(float(E * np.sum(share * P)), 4) if T else None,
        "lb_loss_source": lb_source,
        "top_pairs": pairs,
        "unused_experts": [int(i) for i in np.flatnonzero(counts == 0)],
    }
    if zero_experts:  # the share of choices that computed nothing: measured active routed experts = k x (1 - share)
        out["zero_expert_share"] = round(float((flat >= E).sum()) / total, 6)
    return out


def summarize(trace, top_pairs: int = TOP_PAIRS, token_view_limit: int = TOKEN_VIEW_LIMIT) -> dict:
    """Everything `moetool trace --json` prints. Stable fields (a contract): ``tokens``,
    ``layers[*].layer``, ``layers[*].expert_counts``, ``load.weight_bytes``,
    ``load.expert_weight_bytes``, ``load.quantization``."""
    meta = trace.meta
    E, k = trace.num_experts, trace.top_k
    layers = []
    for L in trace.moe_layers:
        st = layer_stats(trace.experts[L], trace.weights[L], E, trace.logits.get(L), top_pairs=top_pairs,
                         zero_experts=trace.zero_experts)
        layers.append({"layer": int(L), **st})
    T = trace.tokens
    decode = int(trace.decode.sum()) if T else 0

    def mean_of(key):
        vals = [lay[key] for lay in layers if lay[key] is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    out = {
        "format": "moetool-trace-summary",
        "model": meta.get("model"),
        "family": meta.get("family"),
        "num_experts": E,
        "top_k": k,
        "num_layers": trace.num_layers,
        "moe_layers": trace.moe_layers,
        "tokens": int(T),
        "prompt_tokens": int(T - decode),
        "decode_tokens": decode,
        "sequences": int(np.unique(trace.sequence).size),
        "truncated": bool(meta.get("truncated", False)),
        "logits": trace.has_logits,
        "routing": meta.get("routing", "router-output"),
        "scoring": meta.get("scoring"),
        "layers": layers,
        "overall": {
            "max_over_mean": mean_of("max_over_mean"),
            "cv": mean_of("cv"),
            "load_entropy_normalized": mean_of("load_entropy_normalized"),
            "routing_entropy": mean_of("routing_entropy"),
            "lb_loss": mean_of("lb_loss"),
            "unused_expert_slots": sum(len(lay["unused_experts"]) for lay in layers),
            "worst_layer": max(layers, key=lambda lay: lay["max_over_mean"] or 0)["layer"] if layers and T else None,
        },
        "load": {
            "weight_bytes": int(meta.get("weight_bytes", 0)),
            "expert_weight_bytes": int(meta.get("expert_weight_bytes", 0)),
            "quantization": meta.get("quantization", "none"),
            "dtype": meta.get("dtype"),
            "devices": meta.get("devices", {}),
            "streamed": bool(meta.get("streamed", False)),
        },
        "token_view": token_view(trace) if 0 < T <= token_view_limit else None,
    }
    if trace.zero_experts:
        share = mean_of("zero_expert_share")
        out["zero_experts"] = trace.zero_experts
        out["overall"]["zero_expert_share"] = share
        out["overall"]["routed_experts_per_token"] = None if share is None else round(k * (1 - share), 4)
    return out


def token_view(trace) -> list[dict] | None:
    """Token by token: text -> experts per MoE layer (in ``moe_layers`` order)."""
    texts = trace.token_texts
    rows = []
    for t in range(trace.tokens):
        rows.append({
            "index": t,
            "sequence": int(trace.sequence[t]),
            "position": int(trace.position[t]),
            "token_id": int(trace.token_ids[t]),
            "token": texts[t] if texts is not None and t < len(texts) else None,
            "decode": bool(trace.decode[t]),
            "experts": [[int(e) for e in trace.experts[L][t]] for L in trace.moe_layers],
            "weights": [[round(float(w), 4) for w in trace.weights[L][t]] for L in trace.moe_layers],
        })
    return rows
