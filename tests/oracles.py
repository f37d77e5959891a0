"""Reference behaviour that moetool's results are checked against, written without moetool's
surgery code: a model that routes as if only some experts existed (what a pruned model must
equal). Used by tests/test_prune.py, tests/test_every_family.py and by
bench/quality_compression.py (expert importance)."""

from __future__ import annotations

import contextlib
from unittest import mock


def router_weight(router, num_experts: int):
    """The router's [num_experts, hidden] matrix: its 2-D parameter with one row per expert."""
    return next(p for p in router.parameters() if p.dim() == 2 and p.shape[0] == num_experts)


@contextlib.contextmanager
def routing_mask(model, kept: dict[int, list[int]]):
    """Inside the block MODEL routes as if only KEPT experts (per MoE layer; layers not in KEPT
    keep all) existed: the router's logits of dropped experts become -inf inside its own forward
    (so transformers' own softmax / sigmoid, top-k, group selection and normalisation run
    unchanged), and every score-correction bias in the block (DeepSeek-V3's on the router,
    MiniMax-M2's on the block, ERNIE 4.5's [1, E] one on the router's moe_statics: sigmoid(-inf)
    = 0 or softmax's 0 plus a bias could still be chosen) becomes -inf for the dropped experts
    too. Everything is restored on exit."""
    import torch

    from moetool.runtime.loading import loaded_from_model, moe_blocks

    loaded = loaded_from_model(model)
    E = loaded.rc.num_experts
    W = loaded.rc.router_width  # zero-computation experts (LongCat) have router rows after the routed ones
    restore = []
    for L, block, router, _experts in moe_blocks(loaded):
        if L not in kept:
            continue
        dropped = [e for e in range(E) if e not in kept[L]]
        mask = torch.zeros(W)
        mask[dropped] = float("-inf")
        real_forward = router.forward
        weight = router_weight(router, W)

        def forward(*args, _real=real_forward, _mask=mask, _weight=weight, **kwargs):
            real_linear = torch.nn.functional.linear

            def linear(x, w, b=None):
                y = real_linear(x, w, b)
                if w.shape == _weight.shape and w.data_ptr() == _weight.data_ptr():
                    y = y + _mask.to(y.dtype)
                return y

            with mock.patch.object(torch.nn.functional, "linear", linear):
                return _real(*args, **kwargs)  # some routers also take the block's bias

        router.forward = forward
        restore.append(lambda r=router: r.__dict__.pop("forward", None))
        biases = [t for name, t in [*block.named_parameters(), *block.named_buffers()]
                  if name.endswith("e_score_correction_bias") and t.shape[-1] == W]
        for bias in biases:
            saved = bias.detach().clone()
            with torch.no_grad():
                bias[..., dropped] = float("-inf")
            restore.append(lambda b=bias, s=saved: b.data.copy_(s))
    try:
        yield model
    finally:
        for undo in restore:
            undo()
