"""Force one of bitsandbytes' two CPU 4-bit paths in a test, whatever CPU runs it.

Where bitsandbytes 0.50 decides (read from its source):

* ``bitsandbytes.nn.modules.Linear4bit.__init__`` sets ``self.support_avx512bf16_for_cpu =
  has_avx512bf16()`` (the name imported into ``bitsandbytes.nn.modules``). When it is True, the
  first eval-mode forward without grad repacks the weight for the CPU kernel
  (``functional._convert_weight_packed_for_cpu``, plain torch: where odd shapes fail) and
  ``matmul_4bit`` then calls ``functional.gemv_4bit``, whose CPU kernel is registered only on a
  CPU with AVX512-BF16 (``backends/cpu/ops.py``). When it is False, the weight stays in the
  generic layout and ``gemm_4bit`` dequantizes and multiplies (any shape).
* ``bitsandbytes.backends.cpu.ops._has_avx512`` (torch's CPU capability) sends 4-bit
  dequantization with blocks of 2048 or more to a generic implementation: moetool's fused
  experts go through ``dequantize_4bit``.

``force_cpu_path(monkeypatch, "avx512bf16" | "generic")`` patches the first decision (models
must be built after it). Forcing "avx512bf16" on a CPU without it replaces the missing kernel
by :func:`reference_packed_gemv` (bitsandbytes' own un-tiling, then dequantize and multiply), so
the repacking -- bitsandbytes' code, where shapes break -- runs on every CPU; where the CPU has
the kernel, the kernel runs (and tests check the reference against it).
"""

from __future__ import annotations

import copy

import torch

PATHS = ("avx512bf16", "generic")


def cpu_has_avx512bf16() -> bool:
    import bitsandbytes.functional as F

    return bool(F.has_avx512bf16())


def reference_packed_gemv(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """What bitsandbytes' AVX512-BF16 ``gemv_4bit`` computes for a repacked weight, in plain
    torch: undo the tiling with bitsandbytes' own inverse, take the absmax back out of its
    transposed bf16 layout, dequantize, multiply."""
    import bitsandbytes.functional as F

    assert getattr(state, "packing_format_for_cpu", False), "only for repacked weights"
    codes_state = copy.copy(state)
    codes_state.original_nested = False  # the absmax is handled below
    codes, _ = F._convert_weight_packed_for_cpu_inverse(B, codes_state)
    n_out, n_in = state.shape
    absmax = state.absmax.reshape(n_in // state.blocksize, n_out).T.reshape(-1).float()
    qs = F.QuantState(absmax=absmax, shape=torch.Size(state.shape), blocksize=state.blocksize,
                      quant_type=state.quant_type, dtype=torch.bfloat16, code=state.code)
    weight = F.dequantize_4bit(codes.reshape(-1, 1), qs)
    result = torch.nn.functional.linear(A.to(torch.bfloat16), weight).to(A.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


def force_cpu_path(monkeypatch, path: str) -> None:
    """Make every bitsandbytes Linear4bit built from now on take PATH on CPU."""
    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules as bnb_modules

    assert path in PATHS, path
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: path == "avx512bf16")
    if path == "avx512bf16" and not cpu_has_avx512bf16():
        monkeypatch.setattr(F, "gemv_4bit", reference_packed_gemv)


def linear4bit_layers(model) -> list:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]


def assert_path_taken(model, path: str) -> None:
    """After a forward: every Linear4bit holds its weight in PATH's layout."""
    layers = linear4bit_layers(model)
    for name, module in layers:
        packed = bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))
        assert packed == (path == "avx512bf16"), f"{name}: repacked={packed} on the {path} path"
