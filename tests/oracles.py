"""Reference behaviour that moetool's results are checked against, written without moetool's
surgery code: a model that routes as if only some experts existed (what a pruned model must
equal). Used by tests/test_prune.py and by bench/quality_compression.py (expert importance)."""

from __future__ import annotations

import contextlib
from unittest import mock


@contextlib.contextmanager
def routing_mask(model, kept: dict[int, list[int]]):
    """Inside the block MODEL routes as if only KEPT experts (per MoE layer; layers not in KEPT
    keep all) existed: the router's logits of dropped experts become -inf inside its own forward
    (so transformers' own softmax / sigmoid, top-k, group selection and normalisation run
    unchanged), and for sigmoid scoring with a score-correction bias (DeepSeek-V3, where
    sigmoid(-inf) = 0 could still be chosen) the bias of dropped experts becomes -inf too.
    Everything is restored on exit."""
    import torch

    from moetool.runtime.loading import loaded_from_model, moe_blocks

    loaded = loaded_from_model(model)
    E = loaded.rc.num_experts
    restore = []
    for L, _block, router, _experts in moe_blocks(loaded):
        if L not in kept:
            continue
        dropped = [e for e in range(E) if e not in kept[L]]
        mask = torch.zeros(E)
        mask[dropped] = float("-inf")
        real_forward = router.forward

        def forward(*args, _real=real_forward, _mask=mask, _router=router, **kwargs):
            real_linear = torch.nn.functional.linear

            def linear(x, w, b=None):
                y = real_linear(x, w, b)
                if w.shape == _router.weight.shape and w.data_ptr() == _router.weight.data_ptr():
                    y = y + _mask.to(y.dtype)
                return y

            with mock.patch.object(torch.nn.functional, "linear", linear):
                return _real(*args, **kwargs)  # some routers also take the block's bias

        router.forward = forward
        restore.append(lambda r=router: r.__dict__.pop("forward", None))
        holder = router if hasattr(router, "e_score_correction_bias") else _block  # MiniMax-M2 keeps it on the block
        if hasattr(holder, "e_score_correction_bias"):
            bias = holder.e_score_correction_bias
            saved = bias.detach().clone()
            with torch.no_grad():
                bias[dropped] = float("-inf")
            restore.append(lambda b=bias, s=saved: b.data.copy_(s))
    try:
        yield model
    finally:
        for undo in restore:
            undo()
