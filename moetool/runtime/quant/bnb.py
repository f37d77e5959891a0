"""4-bit / 8-bit weights for MoE models, the routed experts included.

The trap: transformers 5 keeps a MoE layer's routed experts as fused 3-D ``nn.Parameter`` s on
an experts module (``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]; gpt-oss stores them
transposed, [E, H, 2I] / [E, I, H], with ``gate_up_proj_bias`` / ``down_proj_bias``), and
bitsandbytes only swaps ``nn.Linear`` modules. ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` therefore quantizes attention,
dense MLPs and shared experts and silently leaves the routed experts -- most of the model -- in
full precision (bitsandbytes issue #1849).

This module quantizes the experts too:

* every fused 3-D expert weight is replaced by a :class:`QuantizedExpertWeight` sub-module that
  holds the packed 4-bit codes (bitsandbytes NF4/FP4, one absmax per ``blocksize`` values,
  blocks never straddle two experts) or int8 codes with one scale per output row, as buffers;
  ``weight[e]`` dequantizes expert ``e`` alone, on the fly, to a 2-D matrix, so the eager
  experts loop ``F.linear(x, self.gate_up_proj[expert_idx])`` runs unchanged;
* the experts module is switched to its eager forward (the default ``grouped_mm``/``batched_mm``
  implementations read the whole 3-D tensor at once), per module, whatever
  ``config._experts_implementation`` says;
* :func:`load_in_4bit` / :func:`load_in_8bit` quantize the experts *while* transformers loads
  the checkpoint (one fused tensor in full precision at a time), so peak memory stays about one
  expert tensor above the quantized model; ``nn.Linear`` layers are bitsandbytes' as usual.

See docs/quantization.md for the measured sizes and errors and for the limits.

Importing this module is cheap: torch, transformers and bitsandbytes are imported inside the
functions that need them (bitsandbytes may log warnings on import on CPU-only machines).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from typing import Any

from moetool.runtime import hf_compat
from moetool.errors import MoetoolError, first_line

EXPERT_WEIGHT_NAMES = ("gate_up_proj", "down_proj", "up_proj", "gate_proj")  # fused 3-D expert weights
_MARKERS = ("gate_up_proj", "down_proj")  # a module holding one of these as a 3-D weight is an experts module
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_BACKEND_CACHE: dict[str, dict] = {}
_log = logging.getLogger("moetool.runtime.quant.bnb")
_WEIGHT_CLASS = None


# -- bitsandbytes -------------------------------------------------------------------------------------
def _import_bnb():
    """Import bitsandbytes with its import-time chatter (warnings, log lines) silenced."""
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
    finally:
        bnb_log.setLevel(level)
    return bitsandbytes


def backend_status(device=None) -> dict:
    """Whether bitsandbytes can quantize on DEVICE (default: cuda if there is one, else cpu).

    Plain data: ``{"available": bool, "device": str, "bitsandbytes": version or None,
    "reason": str}``; the check runs a real 4-bit round trip on the device (cached)."""
    import torch

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    key = dev.type
    if key in _BACKEND_CACHE:
        return dict(_BACKEND_CACHE[key])
    status = {"available": False, "device": key, "bitsandbytes": None, "reason": ""}
    try:
        bnb = _import_bnb()
    except Exception as exc:  # ImportError, or a broken native library raising on import
        status["reason"] = f"bitsandbytes cannot be imported ({first_line(exc)})"
        _BACKEND_CACHE[key] = status
        return dict(status)
    status["bitsandbytes"] = getattr(bnb, "__version__", "?")
    supported = getattr(bnb, "supported_torch_devices", None)
    if supported is not None and key not in supported:
        status["reason"] = f"bitsandbytes {status['bitsandbytes']} has no {key} backend"
    else:
        try:
            import bitsandbytes.functional as F

            with torch.no_grad():
                w = torch.linspace(-1, 1, 128, device=dev).reshape(2, 64)
                packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
                back = F.dequantize_4bit(packed, state)
            if not torch.allclose(back.float(), w.float(), atol=0.2):
                status["reason"] = f"bitsandbytes 4-bit round trip on {key} gives wrong values"
            else:
                status["available"] = True
        except Exception as exc:
            status["reason"] = f"bitsandbytes 4-bit does not run on {key} ({first_line(exc)})"
    _BACKEND_CACHE[key] = status
    return dict(status)


def require_backend(device=None) -> dict:
    """:func:`backend_status`, or a one-line :class:`MoetoolError` saying why not."""
    status = backend_status(device)
    if not status["available"]:
        raise MoetoolError(f"4-bit/8-bit quantization is not available here: {status['reason']}")
    return status


# -- the quantized weight --------------------------------------------------------------------------------
def _weight_class():
    """QuantizedExpertWeight (moetool.runtime.quant.weight), imported on first use: it imports torch."""
    global _WEIGHT_CLASS
    if _WEIGHT_CLASS is None:
        from moetool.runtime.quant.weight import QuantizedExpertWeight

        _WEIGHT_CLASS = QuantizedExpertWeight
    return _WEIGHT_CLASS


def __getattr__(name: str):  # PEP 562: `from moetool.runtime.quant.bnb import QuantizedExpertWeight` builds it lazily
    if name == "QuantizedExpertWeight":
        return _weight_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_qweight(obj) -> bool:
    return _WEIGHT_CLASS is not None and isinstance(obj, _WEIGHT_CLASS)


# -- finding the experts --------------------------------------------------------------------------------
def expert_modules(model, skip_modules=()) -> list[tuple[str, Any, list[str]]]:
    """(module name, module, names of its fused expert weights) for every fused-experts module:
    any module holding a 3-D ``gate_up_proj`` or ``down_proj`` (a parameter, or already
    quantized). ``skip_modules``: module name patterns to leave out, matched like bitsandbytes'
    ``llm_int8_skip_modules``."""
    found = []
    for name, module in model.named_modules():
        if _is_qweight(module) or _skipped(name, skip_modules):
            continue
        names = []
        for wname in EXPERT_WEIGHT_NAMES:
            p = module._parameters.get(wname)
            if (p is not None and p.ndim == 3) or _is_qweight(module._modules.get(wname)):
                names.append(wname)
        if any(n in _MARKERS for n in names):
            found.append((name, module, names))
    return found


def _skipped(name: str, skip_modules) -> bool:
    """bitsandbytes' ``llm_int8_skip_modules`` matching (transformers' should_convert_module): a
    pattern matches from the start up to a module boundary, as a regex with that boundary, or
    as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(key and (re.match(rf"(?:{key}){boundary}", name) or name.endswith(key)) for key in (skip_modules or ()))


# accelerate's offload hooks and transformers' experts dispatch: moetool.runtime.hf_compat
_offload_hook = hf_compat.offload_hook
_execution_device = hf_compat.execution_device
_drop_offloaded = hf_compat.drop_offloaded
_EagerForward = hf_compat.EagerForward  # the old name, for models pickled before the move
_force_eager = hf_compat.force_eager
_unforce_eager = hf_compat.unforce_eager


class _RefuseSave:
    """Stands in for ``save_pretrained`` on a model with quantized experts: transformers would
    write the codes under names no loader knows (``...gate_up_proj.packed``) next to a
    bitsandbytes quantization_config, and reloading would silently give random experts."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        raise MoetoolError("this model's experts are quantized by moetool.runtime.quant.bnb, which transformers cannot "
                           "save or reload; call moetool.runtime.quant.bnb.dequantize_experts(model) first, or save the "
                           "original checkpoint")


def _guard_save(model) -> None:
    if hasattr(type(model), "save_pretrained") and not isinstance(model.__dict__.get("save_pretrained"), _RefuseSave):
        model.save_pretrained = _RefuseSave(model)


def _unguard_save(model) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), _RefuseSave):
        del model.__dict__["save_pretrained"]


# -- quantizing a model in memory ------------------------------------------------------------------------
def _check_args(bits: int, quant_type: str, blocksize: int) -> None:
    if bits not in (4, 8):
        raise MoetoolError(f"bits must be 4 or 8 (got {bits})")
    if bits == 4 and quant_type not in QUANT_TYPES:
        raise MoetoolError(f"quant_type must be one of {', '.join(QUANT_TYPES)} (got {quant_type!r})")
    if bits == 4 and blocksize not in BLOCKSIZES:
        raise MoetoolError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))} (got {blocksize})")


def _quantize_tensor(weight, bits, quant_type, blocksize, dtype, device):
    """A QuantizedExpertWeight holding the 3-D WEIGHT (read expert by expert)."""
    from moetool.runtime.quant.weight import CHUNK_ELEMENTS

    cls = _weight_class()
    q = cls(weight.shape, bits=bits, quant_type=quant_type, blocksize=blocksize, dtype=dtype, device=device)
    per_expert = max(1, weight[0].numel())
    group = max(1, CHUNK_ELEMENTS // per_expert)  # several small experts per call, one big one at a time
    for e in range(0, weight.shape[0], group):
        q.set_experts(e, weight[e:e + group])
    return q


def quantize_experts(model, bits: int = 4, quant_type: str = "nf4", blocksize: int = 64,
                     compute_dtype=None, skip_modules=()) -> dict:
    """Replace every fused 3-D expert weight of MODEL by 4-bit (NF4/FP4) or int8 codes, in place.

    Each experts module found by :func:`expert_modules` gets, for each 3-D weight, a
    :class:`QuantizedExpertWeight` sub-module under the same name, and is switched to its eager
    forward. Weights are read and quantized one expert at a time and each full-precision tensor
    is dropped as soon as it is quantized, so memory never grows above the model as it was. A
    weight already quantized is left as it is (calling this twice is harmless). The model's
    ``save_pretrained`` then raises :class:`MoetoolError` (transformers would write a checkpoint
    it cannot reload) until :func:`dequantize_experts`. Offloaded experts
    (accelerate hook with a weights map: device_map "cpu"/"disk" next to a GPU) are read from the
    offload and their codes kept in CPU memory; they are dequantized per expert on the device the
    forward runs on.

    ``compute_dtype``: the dtype experts are dequantized to; None keeps each weight's own dtype
    (the hidden states' dtype, which ``F.linear`` needs to match). ``skip_modules``: experts
    modules to leave in full precision (see :func:`expert_modules`).

    4-bit needs bitsandbytes on every device involved (a one-line :class:`MoetoolError`
    otherwise); int8 is plain torch.

    Returns plain data: what was quantized, bytes before and after, the ratio to bf16, time.
    """
    import torch

    _check_args(bits, quant_type, blocksize)
    start = time.perf_counter()
    modules = expert_modules(model, skip_modules)
    if bits == 4:
        for dev in _devices_involved(modules):
            require_backend(dev)
    report: dict[str, Any] = {
        "quantization": f"experts-{quant_type if bits == 4 else 'int8'}",
        "bits": bits, "quant_type": quant_type if bits == 4 else "int8",
        "blocksize": blocksize if bits == 4 else None,
        "modules": len(modules), "tensors": 0, "already_quantized": 0, "experts": 0,
        "expert_params": 0, "bytes_before": 0, "bytes_after": 0,
        "offloaded_modules": [], "forward": {}, "compute_dtype": None,
    }
    if not modules:
        report.update(seconds=round(time.perf_counter() - start, 4), ratio_vs_bf16=None, ratio_vs_before=None)
        return report
    devices = set()
    for mname, module, wnames in modules:
        for wname in wnames:
            current = getattr(module, wname)
            if _is_qweight(current):
                report["already_quantized"] += 1
                report["expert_params"] += current.numel()
                report["bytes_before"] += current.nbytes
                report["bytes_after"] += current.nbytes
                continue
            devices.add(current.device.type)
            hook = _offload_hook(module)
            source = current
            storage = current.device
            if current.device.type == "meta":
                if hook is None or wname not in hook.weights_map:
                    raise MoetoolError(f"{mname}.{wname} is on the meta device and no offload holds its values")
                source = hook.weights_map[wname]  # a CPU tensor or a memory-mapped file
                storage = torch.device("cpu")
                if mname not in report["offloaded_modules"]:
                    report["offloaded_modules"].append(mname)
            dtype = compute_dtype or (source.dtype if source.is_floating_point() else torch.bfloat16)
            report["compute_dtype"] = str(dtype).replace("torch.", "")
            if bits == 4 and source.dtype not in (torch.float32, torch.float16, torch.bfloat16) and \
                    not source.is_floating_point():
                raise MoetoolError(f"{mname}.{wname}: cannot quantize a {source.dtype} tensor")
            q = _quantize_tensor(source, bits, quant_type, blocksize, dtype, storage)
            report["tensors"] += 1
            report["experts"] += int(source.shape[0])
            report["expert_params"] += source.numel()
            report["bytes_before"] += source.numel() * source.element_size()
            report["bytes_after"] += q.nbytes
            _install(module, wname, q)
            if hook is not None:
                _drop_offloaded(hook, wname)
            del source, current, q
        report["forward"][mname] = _force_eager(module)
    hf_compat.set_eager_experts(model)  # the public switch; _force_eager keeps quantized modules eager whatever it says later
    _guard_save(model)
    after = report["bytes_after"]
    report["ratio_vs_bf16"] = round(after / (2 * report["expert_params"]), 4) if report["expert_params"] else None
    report["ratio_vs_before"] = round(after / report["bytes_before"], 4) if report["bytes_before"] else None
    report["forward"] = _summarize_forward(report["forward"])
    report["seconds"] = round(time.perf_counter() - start, 4)
    report["devices"] = sorted(devices)
    return report


def quantize_experts_4bit(model, quant_type: str = "nf4", blocksize: int = 64, compute_dtype=None,
                          skip_modules=()) -> dict:
    """:func:`quantize_experts` with bitsandbytes 4-bit (NF4 by default, FP4 possible)."""
    return quantize_experts(model, bits=4, quant_type=quant_type, blocksize=blocksize, compute_dtype=compute_dtype,
                            skip_modules=skip_modules)


def quantize_experts_8bit(model, compute_dtype=None, skip_modules=()) -> dict:
    """:func:`quantize_experts` with int8 codes, one absmax scale per output row (the weight
    format of bitsandbytes' LLM.int8, without its outlier decomposition); plain torch, so it
    runs wherever torch does."""
    return quantize_experts(model, bits=8, compute_dtype=compute_dtype, skip_modules=skip_modules)


def _devices_involved(modules) -> list:
    """Where 4-bit codes will be made (the weights' devices; CPU for offloaded ones) and read
    (the hooks' execution devices)."""
    import torch

    devs = {}
    for _, module, wnames in modules:
        for wname in wnames:
            w = getattr(module, wname)
            dev = torch.device("cpu") if w.device.type == "meta" else w.device
            devs[dev.type] = dev
        exec_dev = _execution_device(module)
        if exec_dev is not None:
            exec_dev = torch.device(exec_dev) if not isinstance(exec_dev, int) else torch.device("cuda", exec_dev)
            devs.setdefault(exec_dev.type, exec_dev)
    return list(devs.values())


def _install(module, name: str, qweight) -> None:
    if name in module._parameters:
        del module._parameters[name]
    module.add_module(name, qweight)


def _summarize_forward(per_module: dict) -> str:
    kinds = sorted(set(per_module.values()))
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds)


def dequantize_experts(model) -> int:
    """Undo :func:`quantize_experts`: every QuantizedExpertWeight becomes a full 3-D
    ``nn.Parameter`` again (dequantized values, so the quantization error stays) and the experts
    modules get back their class forward. Returns how many tensors were restored."""
    from torch import nn

    count = 0
    for _, module, wnames in expert_modules(model):
        for wname in wnames:
            q = module._modules.get(wname)
            if not _is_qweight(q):
                continue
            full = q.dequantize()
            del module._modules[wname]
            module.register_parameter(wname, nn.Parameter(full, requires_grad=False))
            count += 1
        _unforce_eager(module)
    if not any(_is_qweight(m) for m in model.modules()):
        _unguard_save(model)
    return count


# -- sizes ----------------------------------------------------------------------------------------------
def tensor_bytes(t) -> int:
    """Bytes a tensor holds, with bitsandbytes' quantization state beside its codes."""
    n = t.numel() * t.element_size()
    qs = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: absmax (nested too) beside the codes
    if qs is not None:
        for attr in ("absmax", "code", "offset"):
            extra = getattr(qs, attr, None)
            if extra is not None and hasattr(extra, "numel"):
                n += extra.numel() * extra.element_size()
        nested = getattr(qs, "state2", None)
        if nested is not None:
            for attr in ("absmax", "code"):
                extra = getattr(nested, attr, None)
                if extra is not None and hasattr(extra, "numel"):
                    n += extra.numel() * extra.element_size()
    scb = getattr(t, "SCB", None)  # bitsandbytes Int8Params row scales
    if scb is not None and hasattr(scb, "numel"):
        n += scb.numel() * scb.element_size()
    return n


def _unique_tensors(module):
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        yield t


def _linear_quantization(model) -> str:
    kinds = set()
    for m in model.modules():
        cls = type(m).__name__
        if cls in ("Linear4bit", "LinearNF4", "LinearFP4"):
            qs = getattr(getattr(m, "weight", None), "quant_state", None)
            kinds.add(getattr(qs, "quant_type", None) or getattr(m.weight, "quant_type", None) or "4bit")
        elif cls == "Linear8bitLt":
            kinds.add("int8")
    if not kinds:
        return "none"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _label(linear: str, experts: str, expert_dtype: str | None, has_experts: bool = True) -> str:
    if linear == "none" and experts == "none":
        return "none"
    if experts == "none" and not has_experts:
        return f"bnb-{linear}"
    if experts == "none":
        return f"bnb-{linear}, experts {expert_dtype or 'full precision'}"  # the trap, spelled out
    if linear == "none":
        return f"experts-{experts}"
    if linear == experts:
        return f"bnb-{linear}"
    return f"bnb-{linear}, experts {experts}"


def expert_weight_bytes(model) -> dict:
    """Bytes of MODEL's weights as held in memory, the fused experts' share, and what is
    quantized. Plain data:

    ``weight_bytes`` every parameter and buffer (bitsandbytes quantization state included; an
    offloaded tensor counts at its dtype), ``expert_weight_bytes`` the experts modules' tensors
    (codes and scales when quantized, biases included), ``expert_params`` / ``expert_bf16_bytes``
    the experts' element count and its size in bf16, ``expert_ratio_vs_bf16``,
    ``experts_quantized`` ("nf4", "fp4", "int8", "none", "mixed"), ``linear_quantization``
    (bitsandbytes ``nn.Linear`` replacements), ``quantization`` a label ("bnb-nf4" when both are
    4-bit; "bnb-nf4, experts bfloat16" is the trap), ``offloaded_bytes`` (tensors on meta).
    """
    total = sum(tensor_bytes(t) for t in _unique_tensors(model))
    offloaded = sum(tensor_bytes(t) for t in _unique_tensors(model) if t.device.type == "meta")
    expert_bytes = 0
    expert_params = 0
    kinds = set()
    dtypes = set()
    modules = expert_modules(model)
    for _, module, wnames in modules:
        expert_bytes += sum(tensor_bytes(t) for t in _unique_tensors(module))
        for t in module.parameters(recurse=False):
            expert_params += t.numel()
            if t.ndim == 3:
                dtypes.add(str(t.dtype).replace("torch.", ""))
        for wname in wnames:
            w = module._modules.get(wname)
            if _is_qweight(w):
                expert_params += w.numel()
                kinds.add(w.quant_type)
            else:
                kinds.add("none")
    experts = "none" if not kinds else (kinds.pop() if len(kinds) == 1 else "mixed")
    linear = _linear_quantization(model)
    bf16 = 2 * expert_params
    return {
        "weight_bytes": int(total),
        "expert_weight_bytes": int(expert_bytes),
        "expert_params": int(expert_params),
        "expert_bf16_bytes": int(bf16),
        "expert_ratio_vs_bf16": round(expert_bytes / bf16, 4) if bf16 else None,
        "expert_share": round(expert_bytes / total, 4) if total else None,
        "expert_modules": len(modules),
        "experts_quantized": experts,
        "linear_quantization": linear,
        "quantization": _label(linear, experts, ",".join(sorted(dtypes)) or None, bool(modules)),
        "offloaded_bytes": int(offloaded),
    }


# -- nn.Linear layers bitsandbytes cannot run -------------------------------------------------------------
# bitsandbytes 0.50 (nn/modules.py, Linear4bit.forward): on a CPU with AVX512-BF16, in eval mode and
# without grad, the first forward repacks the 4-bit weight for its CPU kernel
# (functional._convert_weight_packed_for_cpu), which needs out_features in tiles of 32 rows and
# in_features a whole number of quantization blocks (Params4bit's default block, 64, which
# transformers' integration uses); other layers fail there with a shape error. Other CPUs take a
# generic path that runs any shape. So that a model is quantized the same way on every CPU (and
# runs on all of them), the rule applies to every CPU load, whatever the CPU's features.
LINEAR4BIT_BLOCKSIZE = 64
CPU_REPACK_ROWS = 32


CPU_KERNEL_NEEDS = (f"bitsandbytes' 4-bit CPU kernel (AVX512-BF16 path) needs in_features a multiple of "
                    f"{LINEAR4BIT_BLOCKSIZE} and out_features a multiple of {CPU_REPACK_ROWS}")


def linear4bit_problem(out_features: int, in_features: int, device_type: str) -> str | None:
    """Why bitsandbytes' 4-bit ``nn.Linear`` cannot run an [out_features, in_features] weight on
    DEVICE_TYPE ("cpu", "cuda", ...), or None when it can (see CPU_KERNEL_NEEDS)."""
    if device_type != "cpu":
        return None
    if in_features % LINEAR4BIT_BLOCKSIZE:
        return f"in_features {in_features} is not a multiple of {LINEAR4BIT_BLOCKSIZE}"
    if out_features % CPU_REPACK_ROWS:
        return f"out_features {out_features} is not a multiple of {CPU_REPACK_ROWS}"
    return None


def linear_exclusions(model, bits: int, device_type: str, skip_modules=()) -> list[dict]:
    """The ``nn.Linear`` layers of MODEL (a skeleton on the meta device is enough) that
    bitsandbytes would quantize to BITS but cannot run on DEVICE_TYPE: each
    ``{"module": name, "shape": [out, in], "reason": str}``. Layers SKIP_MODULES already leaves
    alone (transformers' matching) are not listed. int8 runs every shape (inputs of more than 3
    dimensions are handled by :func:`flatten_int8_inputs`), so for 8 bits the list is empty."""
    from torch import nn

    if bits != 4:
        return []
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _skipped(name, skip_modules):
            continue
        reason = linear4bit_problem(module.out_features, module.in_features, device_type)
        if reason:
            out.append({"module": name, "shape": [int(module.out_features), int(module.in_features)],
                        "reason": reason})
    return out


def _summarize_exclusions(kept: list[dict], dtype: str) -> str:
    names = ", ".join(f"{k['module']} [{k['shape'][0]}x{k['shape'][1]}]" for k in kept[:3])
    more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
    return (f"{len(kept)} nn.Linear layer{'s' if len(kept) != 1 else ''} kept in {dtype}, not 4-bit "
            f"({names}{more}): {CPU_KERNEL_NEEDS}")


def _flatten_pre_hook(module, args):
    x = args[0] if args else None
    if x is None or getattr(x, "ndim", 0) <= 3:
        module._moetool_input_shape = None
        return None
    module._moetool_input_shape = tuple(x.shape[:-1])
    return (x.reshape(-1, x.shape[-1]), *args[1:])


def _flatten_post_hook(module, args, output):
    shape = getattr(module, "_moetool_input_shape", None)
    if shape is None:
        return None
    module._moetool_input_shape = None
    return output.reshape(*shape, output.shape[-1])


def flatten_int8_inputs(model) -> int:
    """bitsandbytes' int8 matmul (``MatMul8bitLt``, 0.50) flattens 3-D inputs only and fails on
    a 4-D one (DeepSeek's ``kv_b_proj`` gets [batch, 1, seq, rank]). Give every bitsandbytes int8
    layer its input as [tokens, features] when it has more than 3 dimensions (the same rows
    bitsandbytes quantizes for a 3-D input) and the output back in the input's shape: plain
    torch forward hooks, once per layer. Returns how many layers got them."""
    count = 0
    for module in model.modules():
        if type(module).__name__ != "Linear8bitLt" or getattr(module, "_moetool_flatten", False):
            continue
        module.register_forward_pre_hook(_flatten_pre_hook)
        module.register_forward_hook(_flatten_post_hook)
        module._moetool_flatten = True
        count += 1
    return count


def _contiguous_pre_hook(module, args):
    x = args[0] if args else None
    if x is None or not hasattr(x, "is_contiguous") or x.is_contiguous():
        return None
    return (x.contiguous(), *args[1:])


def contiguous_4bit_inputs(model) -> int:
    """bitsandbytes' AVX512-BF16 CPU kernel for 4-bit ``nn.Linear`` (``gemv_4bit``, 0.50) reads a
    non-contiguous input as if it were contiguous: Jamba's Mamba ``out_proj`` gets a transposed
    view and returned values off by up to 2.6 on a random [22, 64] input. Give every bitsandbytes
    4-bit layer a contiguous input (a forward pre-hook, once per layer; a copy only where the
    input is a view). Returns how many layers got it."""
    count = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" or getattr(module, "_moetool_contiguous", False):
            continue
        module.register_forward_pre_hook(_contiguous_pre_hook)
        module._moetool_contiguous = True
        count += 1
    return count


def _skeleton(model_id_or_path, kwargs: dict):
    """MODEL built on the meta device from its config (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    opts = {k: kwargs[k] for k in ("local_files_only", "trust_remote_code", "revision", "cache_dir", "token")
            if k in kwargs}
    config = AutoConfig.from_pretrained(model_id_or_path, **opts)
    with torch.device("meta"):  # keeps fused expert params on meta (init_empty_weights does not)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=opts.get("trust_remote_code", False))


def _default_skips(skeleton) -> list[str]:
    """What transformers' bitsandbytes integration leaves unquantized when not told (lm_head,
    tied and last modules): passing ``llm_int8_skip_modules`` replaces that default."""
    from moetool.runtime import hf_compat

    return hf_compat.default_skip_modules(skeleton)


# -- loading ----------------------------------------------------------------------------------------------
class _ExpertClaim:
    """What one 4-/8-bit load does with the fused expert weights transformers' loader hands to
    moetool's registered bitsandbytes quantizer (moetool.runtime.quant.bnb_quantizer): each arrives after any
    checkpoint conversion (e.g. per-expert w1/w3 -> fused gate_up_proj), is quantized and
    installed as a QuantizedExpertWeight at once, so only one fused tensor is ever held in full
    precision."""

    def __init__(self, bits: int, quant_type: str, blocksize: int, compute_dtype=None, skip_modules=()):
        self.bits, self.quant_type, self.blocksize = bits, quant_type, blocksize
        self.compute_dtype = compute_dtype
        self.skip_modules = list(skip_modules or ())
        self.tensors = 0

    def __deepcopy__(self, memo):  # transformers copies the config: the copy shares this load's claim
        return self

    def __copy__(self):
        return self

    def wants(self, module, name: str, param_name: str) -> bool:
        if name not in EXPERT_WEIGHT_NAMES or _skipped(param_name.rpartition(".")[0], self.skip_modules):
            return False
        current = getattr(module, name, None)
        if _is_qweight(current):
            return True
        if current is None or getattr(current, "ndim", 0) != 3:
            return False
        return any(getattr(module._parameters.get(m), "ndim", 0) == 3 or _is_qweight(module._modules.get(m))
                   for m in _MARKERS)

    def take(self, module, name: str, tensor) -> None:
        dtype = self.compute_dtype or (tensor.dtype if tensor.is_floating_point() else None)
        q = _quantize_tensor(tensor, self.bits, self.quant_type, self.blocksize, dtype, tensor.device)
        del tensor
        _install(module, name, q)
        self.tensors += 1


def _bnb_config(bits: int, claim, bnb_kwargs: dict):
    """moetool's registered quantizer's config (moetool.runtime.quant.bnb_quantizer), or, where transformers
    lacks what it needs, a plain BitsAndBytesConfig (the experts are then quantized after the
    load, loudly). Returns (config, claim or None)."""
    key = "load_in_4bit" if bits == 4 else "load_in_8bit"
    if claim is not None:
        try:
            from moetool.runtime.quant.bnb_quantizer import MoetoolBnbConfig
        except ImportError:
            pass
        else:
            return MoetoolBnbConfig(**{key: True}, claim=claim, **bnb_kwargs), claim
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**{key: True}, **bnb_kwargs), None


def _resolve_dtype(dtype):
    import torch

    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise MoetoolError(f"unknown dtype '{dtype}'")
        return getattr(torch, dtype)
    return dtype


def _target_device(device_map):
    """The device the model will compute on, to check the bitsandbytes backend for."""
    import torch

    if isinstance(device_map, dict):
        devs = [str(v) for v in device_map.values() if str(v) not in ("cpu", "disk", "meta")]
        if devs:
            d = devs[0]
            return torch.device(f"cuda:{d}" if d.isdigit() else d)
        return torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device(f"cuda:{device_map}")
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device(device_map)
    if isinstance(device_map, torch.device):
        return device_map
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_quantized(model_id_or_path, bits: int, dtype, device_map, quant_type: str, blocksize: int,
                    double_quant: bool, quantize_experts_too: bool, quantization_config_kwargs: dict | None,
                    kwargs: dict):
    import torch
    from transformers import AutoModelForCausalLM

    _check_args(bits, quant_type, blocksize)
    target = _target_device(device_map)
    backend = require_backend(target)
    torch_dtype = _resolve_dtype(dtype)
    bnb_kwargs = dict(quantization_config_kwargs or {})
    skip = list(bnb_kwargs.get("llm_int8_skip_modules") or [])  # the user's: honoured for experts too
    if bits == 4:
        bnb_kwargs.setdefault("bnb_4bit_quant_type", quant_type)
        bnb_kwargs.setdefault("bnb_4bit_use_double_quant", double_quant)
        if isinstance(torch_dtype, torch.dtype):
            bnb_kwargs.setdefault("bnb_4bit_compute_dtype", torch_dtype)
    claim = _ExpertClaim(bits, quant_type, blocksize, None, skip) if quantize_experts_too else None
    config, claim = _bnb_config(bits, claim, bnb_kwargs)
    notes = []
    if isinstance(device_map, dict):
        values = set(map(str, device_map.values()))
        if values != {"cpu"} and values & {"cpu", "disk"}:
            _allow_offload(config, notes)
    kept: list[dict] = []
    if bits == 4 and target.type == "cpu":
        # layers bitsandbytes' 4-bit CPU kernel cannot run stay in the compute dtype (decided
        # from the model's structure, before any weight is read)
        skeleton = _skeleton(model_id_or_path, kwargs)
        base = skip if bnb_kwargs.get("llm_int8_skip_modules") is not None else _default_skips(skeleton)
        kept = linear_exclusions(skeleton, bits, target.type, base)
        del skeleton
        if kept:
            config.llm_int8_skip_modules = list(base) + [k["module"] for k in kept]
    kwargs = dict(kwargs)
    kwargs.pop("quantization_config", None)
    if quantize_experts_too:
        for key, value in hf_compat.eager_experts_kwargs().items():
            kwargs.setdefault(key, value)
    if device_map is not None:
        kwargs["device_map"] = device_map
    start = time.perf_counter()
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for attempt in (1, 2):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r".*MatMul8bitLt.*")
                    model = AutoModelForCausalLM.from_pretrained(model_id_or_path, dtype=torch_dtype,
                                                                 quantization_config=config, **kwargs)
                break
            except ValueError as exc:
                # a computed device map ("auto" with max_memory...) that spills to cpu/disk:
                # bitsandbytes wants to be told those modules' nn.Linear stay unquantized
                if attempt == 2 or "llm_int8_enable_fp32_cpu_offload" not in str(exc) or \
                        getattr(config, "llm_int8_enable_fp32_cpu_offload", False):
                    raise
                _allow_offload(config, notes)
                if claim is not None:
                    claim.tensors = 0
    finally:
        quiet.setLevel(level)
        if claim is not None:
            config._moetool_claim = None  # per-load state: not kept on the model's config
    load_seconds = time.perf_counter() - start
    model.eval()
    flattened = flatten_int8_inputs(model) if bits == 8 else 0
    if bits == 4:
        contiguous_4bit_inputs(model)
    if quantize_experts_too:
        after = quantize_experts(model, bits=bits, quant_type=quant_type, blocksize=blocksize, skip_modules=skip)
    else:
        after = None
    sizes = expert_weight_bytes(model)
    report = {
        "quantization": sizes["quantization"],
        "bits": bits,
        "linear": sizes["linear_quantization"],
        "experts": sizes["experts_quantized"],
        "quant_type": quant_type if bits == 4 else "int8",
        "blocksize": blocksize if bits == 4 else None,
        "double_quant": bool(double_quant) if bits == 4 else None,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": str(target),
        "backend": backend,
        "experts_quantized_while_loading": int(claim.tensors) if claim is not None else 0,
        "experts_quantized_after_loading": int(after["tensors"]) if after else 0,
        "experts_forward": after["forward"] if after else None,
        "offloaded_expert_modules": after["offloaded_modules"] if after else [],
        "kept_in_compute_dtype": kept,
        "int8_flatten_hooks": flattened,
        "load_seconds": round(load_seconds, 4),
        "seconds": round(time.perf_counter() - start, 4),
        **{k: sizes[k] for k in ("weight_bytes", "expert_weight_bytes", "expert_params", "expert_bf16_bytes",
                                  "expert_ratio_vs_bf16", "offloaded_bytes")},
    }
    if not quantize_experts_too:
        notes.append("experts left in full precision (quantize_experts=False)")
    kept_note = _summarize_exclusions(kept, "the checkpoint's dtype" if report["dtype"] == "auto"
                                      else report["dtype"]) if kept else None
    if kept_note:
        notes.append(kept_note)
    warnings_ = []
    if report["experts_quantized_after_loading"]:
        why = ("moetool's bitsandbytes quantizer could not be registered with this transformers"
               if claim is None else "transformers did not hand them to the quantizer while loading")
        warnings_.append(f"{report['experts_quantized_after_loading']} fused expert tensors were quantized after a "
                         f"full-precision load ({why}): peak memory was the full-precision model's")
    report["warnings"] = warnings_
    for line in warnings_:  # on stderr (logging's last-resort handler) unless the application routes it
        _log.warning("warning: %s", line)
    if kept_note:
        _log.warning("note: %s", kept_note)
    remote = _experts_away_from_execution(model)
    report["offloaded_expert_modules"] = sorted(set(report["offloaded_expert_modules"]) | set(remote))
    if report["offloaded_expert_modules"]:
        notes.append("experts the device map puts on cpu/disk are held quantized in CPU memory and "
                     "dequantized per expert on the execution device")
    report["notes"] = notes
    model.moetool_quantization = report["quantization"]
    model.moetool_quant_report = report
    return model, report


def _experts_away_from_execution(model) -> list[str]:
    """Experts modules whose codes live on another device than the one their forward runs on."""
    import torch

    away = []
    for name, module, wnames in expert_modules(model):
        exec_dev = _execution_device(module)
        for wname in wnames:
            w = module._modules.get(wname)
            if _is_qweight(w) and exec_dev is not None and torch.device(exec_dev) != w.device:
                away.append(name)
                break
    return away


def _allow_offload(config, notes: list) -> None:
    config.llm_int8_enable_fp32_cpu_offload = True
    notes.append("nn.Linear layers the device map puts on cpu/disk stay in full precision "
                 "(bitsandbytes' llm_int8_enable_fp32_cpu_offload)")


def load_in_4bit(model_id_or_path, dtype="bfloat16", device_map=None, *, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, quantize_experts: bool = True,
                 quantization_config_kwargs: dict | None = None, **kwargs):
    """Load a causal LM with every ``nn.Linear`` (except what bitsandbytes skips: ``lm_head``)
    AND every fused expert weight in 4-bit. Returns ``(model, report)``.

    ``dtype`` is the dtype of what stays in full precision (embeddings, norms, routers, lm_head,
    expert biases) and the dtype experts are dequantized to ("auto" keeps the checkpoint's).
    ``device_map`` and ``kwargs`` (``local_files_only``, ``trust_remote_code``,
    ``offload_folder``, ``max_memory``...) go to ``from_pretrained``. ``blocksize`` applies to the
    experts (Linear layers use bitsandbytes' own, 64); ``double_quant`` to the Linear layers.
    ``quantize_experts=False`` reproduces plain ``BitsAndBytesConfig(load_in_4bit=True)``
    (experts left in full precision) for comparison.

    Raises :class:`MoetoolError` (one line) where bitsandbytes is missing or cannot run on the
    target device.
    """
    return _load_quantized(model_id_or_path, 4, dtype, device_map, quant_type, blocksize, double_quant,
                           quantize_experts, quantization_config_kwargs, kwargs)


def load_in_8bit(model_id_or_path, dtype="bfloat16", device_map=None, *, quantize_experts: bool = True,
                 quantization_config_kwargs: dict | None = None, **kwargs):
    """Load with bitsandbytes LLM.int8 ``nn.Linear`` layers and int8 experts (one absmax scale
    per output row; :func:`quantize_experts_8bit`). Returns ``(model, report)``;
    ``quantize_experts=False`` leaves the experts in full precision, as plain
    ``BitsAndBytesConfig(load_in_8bit=True)`` does."""
    return _load_quantized(model_id_or_path, 8, dtype, device_map, "nf4", 64, False,
                           quantize_experts, quantization_config_kwargs, kwargs)
