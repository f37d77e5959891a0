"""The quantized stand-in for a fused 3-D expert weight (moetool.runtime.quant.bnb installs it).

A module of its own so that torch is imported at its top: the CLI never imports it, and
``moetool.runtime.quant.bnb`` imports it only when experts are quantized.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moetool.runtime import hf_compat

CHUNK_ELEMENTS = 1 << 22  # quantize at most this many values at once (bounds the temporary memory)


class QuantizedExpertWeight(nn.Module):
    """Stands in for one fused 3-D expert weight [E, out, in] (transformers' layout, or the
    transposed gpt-oss one: whatever the 3-D tensor was, ``self[e]`` is its 2-D slice e).

    Buffers (what ``state_dict`` holds):
      4-bit: ``packed`` uint8 [E, ceil(out*in/2)] (two codes a byte, bitsandbytes layout),
             ``absmax`` float32 [E, ceil(out*in/blocksize)];
      8-bit: ``packed`` int8 [E, out, in], ``absmax`` float32 [E, out] (row absmax; w = q * absmax / 127).

    ``self[e]`` (int or 0-d tensor) -> expert e dequantized, [out, in] in ``dtype``;
    ``self[ids]`` (1-D tensor / list / slice) -> [len(ids), out, in], each distinct expert
    dequantized once. With a tensor index, the result is on the index's device (so codes kept
    in CPU memory are dequantized where the computation runs). ``dequantize()`` -> the
    whole 3-D tensor (temporary, full size).
    """

    def __init__(self, shape, bits: int = 4, quant_type: str = "nf4", blocksize: int = 64,
                 dtype=torch.bfloat16, device=None):
        super().__init__()
        num_experts, rows, cols = (int(s) for s in shape)
        self.num_experts = num_experts
        self.expert_shape = (rows, cols)
        self.bits = int(bits)
        self.quant_type = quant_type if self.bits == 4 else "int8"
        self.blocksize = int(blocksize) if self.bits == 4 else cols
        self.compute_dtype = dtype
        hf_compat.mark_initialized(self)  # transformers' weight init must not touch it
        n = rows * cols
        if self.bits == 4:
            self.register_buffer("packed", torch.empty(num_experts, (n + 1) // 2, dtype=torch.uint8, device=device))
            self.register_buffer("absmax", torch.empty(num_experts, math.ceil(n / self.blocksize),
                                                       dtype=torch.float32, device=device))
        elif self.bits == 8:
            self.register_buffer("packed", torch.empty(num_experts, rows, cols, dtype=torch.int8, device=device))
            self.register_buffer("absmax", torch.empty(num_experts, rows, dtype=torch.float32, device=device))
        else:
            raise ValueError(f"bits must be 4 or 8, not {bits}")

    # tensor-like surface ------------------------------------------------------------------
    @property
    def shape(self):
        return torch.Size((self.num_experts, *self.expert_shape))

    @property
    def dtype(self):
        return self.compute_dtype

    @property
    def device(self):
        return self.packed.device

    ndim = 3

    def dim(self) -> int:
        return 3

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.num_experts * self.expert_shape[0] * self.expert_shape[1]

    def __len__(self) -> int:
        return self.num_experts

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.packed, self.absmax))

    def extra_repr(self) -> str:
        kind = f"{self.quant_type}, blocksize={self.blocksize}" if self.bits == 4 else "int8 rows"
        return (f"{self.num_experts}x{self.expert_shape[0]}x{self.expert_shape[1]}, {kind}, "
                f"dtype={str(self.compute_dtype).replace('torch.', '')}, device={self.packed.device}")

    # quantize / dequantize -----------------------------------------------------------------
    @torch.no_grad()
    def set_expert(self, e: int, weight) -> None:
        """Quantize the 2-D ``weight`` (any float dtype, any device) into slot ``e``."""
        self.set_experts(e, weight.unsqueeze(0))

    @torch.no_grad()
    def set_experts(self, start: int, weights) -> None:
        """Quantize ``weights`` [k, out, in] into slots start .. start+k-1, CHUNK_ELEMENTS
        values at a time (blocks never straddle two experts)."""
        rows, cols = self.expert_shape
        k = int(weights.shape[0])
        if tuple(weights.shape[1:]) != (rows, cols) or not 0 <= start <= self.num_experts - k:
            raise ValueError(f"experts {start}..{start + k - 1}: shape {tuple(weights.shape)} does not fit "
                             f"{tuple(self.shape)}")
        dev = self.packed.device
        n = rows * cols
        if self.bits == 4:
            import bitsandbytes.functional as F

            bs = self.blocksize
            if n % bs:  # the last block of each expert is partial: quantize expert by expert
                if k > 1:
                    for i in range(k):
                        self.set_experts(start + i, weights[i:i + 1])
                    return
            flat = weights.reshape(-1)  # one stream; with n % bs == 0 experts' blocks line up
            packed_out = self.packed[start:start + k].view(-1)
            absmax_out = self.absmax[start:start + k].view(-1)
            step = max(bs, (CHUNK_ELEMENTS // bs) * bs)
            for pos in range(0, flat.numel(), step):
                piece = flat[pos:pos + step].to(device=dev)
                if piece.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    piece = piece.float()
                packed, state = F.quantize_4bit(piece.contiguous(), blocksize=bs, quant_type=self.quant_type)
                packed_out[pos // 2:pos // 2 + packed.numel()] = packed.reshape(-1)
                absmax_out[pos // bs:pos // bs + state.absmax.numel()] = state.absmax.float()
                del packed, state, piece
        else:
            flat = weights.reshape(k * rows, cols)
            packed_out = self.packed[start:start + k].view(k * rows, cols)
            absmax_out = self.absmax[start:start + k].view(k * rows)
            step = max(1, CHUNK_ELEMENTS // max(cols, 1))
            for pos in range(0, k * rows, step):
                piece = flat[pos:pos + step].to(device=dev, dtype=torch.float32)
                scale = piece.abs().amax(dim=1).clamp_(min=1e-12)
                packed_out[pos:pos + step] = torch.round(piece * (127.0 / scale)[:, None]).clamp_(
                    -127, 127).to(torch.int8)
                absmax_out[pos:pos + step] = scale
                del piece, scale

    @torch.no_grad()
    def expert(self, e: int, device=None):
        """Expert ``e`` dequantized: a new [out, in] tensor in ``dtype`` on DEVICE (default:
        where the codes are)."""
        e = int(e)
        if e < 0:
            e += self.num_experts
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert index {e} out of range for {self.num_experts} experts")
        packed, absmax = self.packed[e], self.absmax[e]
        if device is not None and torch.device(device) != packed.device:
            packed = packed.to(device, non_blocking=True)
            absmax = absmax.to(device, non_blocking=True)
        if self.bits == 4:
            import bitsandbytes.functional as F

            # flat, then reshaped: bitsandbytes 0.50's native CPU kernel dequantizes some 2-D
            # shapes whose rows are shorter than the block wrongly (e.g. [64, 128] at block 256;
            # at blocks >= 2048 too when torch reports less than AVX512); flat is right on every
            # path (tests/test_quant.py::test_expert_dequantize_on_each_cpu_dequant_path)
            rows, cols = self.expert_shape
            state = F.QuantState(absmax=absmax, shape=torch.Size((rows * cols,)), blocksize=self.blocksize,
                                 quant_type=self.quant_type, dtype=self.compute_dtype)
            return F.dequantize_4bit(packed.reshape(-1, 1), state).reshape(rows, cols)
        return (packed.to(torch.float32) * (absmax / 127.0)[:, None]).to(self.compute_dtype)

    def __getitem__(self, idx):
        device = None
        rest = None
        if isinstance(idx, tuple):
            idx, rest = idx[0], idx[1:]
        if isinstance(idx, torch.Tensor):
            if idx.device.type != "meta":
                device = idx.device
            if idx.dtype == torch.bool:
                idx = idx.nonzero().reshape(-1)
            if idx.ndim == 0:
                out = self.expert(int(idx), device)
            else:
                ids = idx.reshape(-1)
                uniq, inverse = torch.unique(ids, return_inverse=True)
                mats = torch.stack([self.expert(int(i), device) for i in uniq.tolist()])
                out = mats[inverse.to(mats.device)].reshape(*idx.shape, *self.expert_shape)
        elif isinstance(idx, slice):
            ids = range(self.num_experts)[idx]
            out = torch.stack([self.expert(i) for i in ids]) if len(ids) else torch.empty(
                0, *self.expert_shape, dtype=self.compute_dtype, device=self.packed.device)
        elif isinstance(idx, (list, range)):
            out = torch.stack([self.expert(int(i)) for i in idx])
        else:
            import operator

            out = self.expert(operator.index(idx))
        return out[rest] if rest else out

    def dequantize(self, device=None):
        """The whole [E, out, in] weight in ``dtype`` (a temporary of the full size)."""
        return torch.stack([self.expert(e, device) for e in range(self.num_experts)])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """An experts module that uses the whole 3-D weight at once (Llama 4's
        ``torch.bmm(hidden, self.gate_up_proj)``): the weight dequantized for the call, a
        temporary of one layer's experts in the compute dtype, on the other inputs' device."""
        kwargs = kwargs or {}
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)

        def plain(a):
            return a.dequantize(device) if isinstance(a, cls) else a

        return func(*(plain(a) for a in args), **{k: plain(v) for k, v in kwargs.items()})

    def _apply(self, fn, recurse=True):
        # model.to(device) moves the codes; model.to(dtype)/.half()/.float() change the
        # dtype experts are dequantized to, never the codes or the float32 absmax
        absmax = self._buffers["absmax"]
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=absmax.device))
        super()._apply(fn, recurse)
        new = self._buffers["absmax"]
        if new is not None and new.dtype != torch.float32:
            self._buffers["absmax"] = absmax.to(device=new.device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point() and probe.dtype != self.compute_dtype:
            self.compute_dtype = probe.dtype
        return self
