"""Every place moetool touches transformers' or accelerate's internals, in one module.

Version note: written against transformers 5.24 and accelerate 1.16 (the versions in
requirements.lock). pyproject.toml allows transformers 5.24.x, accelerate 1.16.x and
bitsandbytes 0.50.x: what the suite passed with at both ends (`make test-lowest`, `make
test-latest`). Not tested below that: transformers 5.0.0 does not load a model with the
accelerate 1.1 it asks for (`get_module_size_with_ties` is missing), and these internals changed
between 5.0 and 5.25; a wider range needs both targets run again. Each function says what it relies
on and what it does when that is gone.
Importing this module is cheap (transformers is imported inside the functions).
"""

from __future__ import annotations

import types


def default_skip_modules(model) -> list[str]:
    """The modules transformers' bitsandbytes integration leaves unquantized by default (the
    output embedding, tied weights, the last module). Passing ``llm_int8_skip_modules`` replaces
    that default, so whoever extends the list starts from this.

    Relies on ``get_keys_to_not_convert`` (``transformers.quantizers.base`` in 5.2x,
    ``transformers.integrations.bitsandbytes`` before); without it: the output embedding's name."""
    fn = None
    try:
        from transformers.quantizers.base import get_keys_to_not_convert as fn
    except ImportError:
        try:
            from transformers.integrations.bitsandbytes import get_keys_to_not_convert as fn
        except ImportError:
            fn = None
    if fn is not None:
        try:
            return sorted(set(fn(model)))
        except (AttributeError, TypeError, IndexError):
            pass
    out = model.get_output_embeddings()
    return sorted(name for name, module in model.named_modules() if out is not None and module is out)


# -- transformers: the bitsandbytes quantizers ------------------------------------------------------------
# moetool/runtime/quant/bnb_quantizer.py subclasses transformers' Bnb4BitHfQuantizer / Bnb8BitHfQuantizer
# (transformers.quantizers.quantizer_bnb_4bit / _8bit) and registers them with the public
# register_quantization_config / register_quantizer; it overrides param_needs_quantization and
# get_quantize_ops, and its op follows the loader's ConversionOps call convention
# (convert(input_dict, model=..., missing_keys=...)). Where that module cannot be imported,
# moetool.runtime.quant.bnb loads with a plain BitsAndBytesConfig and quantizes the experts after the load,
# with a warning.


def eager_experts_kwargs() -> dict:
    """``from_pretrained`` keyword that makes every experts module run its eager, per-expert
    forward (transformers 5.x's public ``experts_implementation``; the default ``grouped_mm``
    reads the whole 3-D weight at once, which a quantized weight is not)."""
    return {"experts_implementation": "eager"}


def set_eager_experts(model) -> bool:
    """The same on a model already built (``PreTrainedModel.set_experts_implementation``);
    False where the model has no such switch (its experts forward is then its class's own)."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return False
    try:
        setter("eager")
    except (ValueError, TypeError):
        return False
    return True


def mark_initialized(module) -> None:
    """Tell transformers' weight initialisation (``_init_weights``, run on modules it thinks
    were not loaded) to leave MODULE alone: the ``_is_hf_initialized`` flag of transformers 5."""
    module._is_hf_initialized = True


def init_computed_buffers(model, module, device, recurse: bool = True) -> list[str]:
    """MODULE's non-persistent buffers still on the meta device (computed at construction, never
    on disk: rotary tables, a scaled embedding's factor) built on DEVICE the way transformers' own
    loader builds them: an empty tensor of the buffer's shape and dtype, then the model's
    ``_init_weights`` on the module that owns it. Done twice from two different fills: a buffer
    that ``_init_weights`` does not set is an error naming it, never uninitialised memory. Only
    buffers are made; parameters still on meta stay there (initialising them there is a no-op).
    Returns the names of the buffers built."""
    import torch

    from moetool.errors import MoetoolError

    init = getattr(model, "_init_weights", None)
    built: list[str] = []
    mods = module.named_modules() if recurse else [("", module)]
    for mname, sub in list(mods):
        names = [b for b in sorted(sub._non_persistent_buffers_set)
                 if sub._buffers.get(b) is not None and sub._buffers[b].device.type == "meta"]
        if not names:
            continue
        full = [f"{mname}.{b}" if mname else b for b in names]
        if init is None:
            raise MoetoolError(f"buffer {full[0]} is computed at construction and this model has no "
                               "_init_weights to rebuild it")
        runs = []
        for fill in (0, 1):
            for b in names:
                sub._buffers[b] = torch.full_like(sub._buffers[b], fill, device=device)
            try:
                init(sub)
            except Exception as exc:  # noqa: BLE001 - transformers' own code: one line, never a traceback
                raise MoetoolError(f"buffer {full[0]} is computed at construction and transformers' "
                                   f"_init_weights cannot rebuild it here ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            runs.append([sub._buffers[b].clone() for b in names])
        for name, x, y in zip(full, *runs):
            same = x.eq(y)
            if x.dtype.is_floating_point:
                same |= x.isnan() & y.isnan()
            if not bool(same.all()):
                raise MoetoolError(f"buffer {name} is computed at construction and transformers' _init_weights "
                                   "does not rebuild it")
        built.extend(full)
    return built


# -- accelerate: offload hooks (AlignDevicesHook attributes: offload, weights_map, execution_device) ------
# and transformers' experts dispatch (@use_experts_implementation keeps the class's own forward as
# forward.__wrapped__; accelerate's hook calls module._old_forward)
def offload_hook(module):
    """The accelerate AlignDevicesHook that offloads MODULE's own weights, if any."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def execution_device(module):
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    for h in hooks:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return dev
    return None


def drop_offloaded(hook, name: str) -> None:
    """Forget an offloaded full-precision tensor (frees it when it was offloaded to CPU memory)."""
    wm = hook.weights_map
    key = getattr(wm, "prefix", "") + name
    ds = getattr(wm, "dataset", wm)
    for store in (ds, getattr(ds, "state_dict", None)):
        if isinstance(store, dict):
            store.pop(key, None)
    keys = getattr(ds, "all_keys", None)
    if isinstance(keys, list) and key in keys:
        keys.remove(key)


class EagerForward:
    """An experts module's own eager forward, bound to it: the class's ``forward`` as written,
    before ``@use_experts_implementation`` dispatched it to grouped_mm/batched_mm (which read
    the whole 3-D weight). A module-level class, so that deepcopy and pickling (torch.save of a
    whole model) keep it, where a bound method would come back as the dispatching forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return type(self.module).forward.__wrapped__(self.module, *args, **kwargs)


def force_eager(module) -> str:
    """Run MODULE with its class's own (eager, per-expert) forward, whatever experts
    implementation the config names. Returns what was done."""
    if getattr(type(module).forward, "__wrapped__", None) is None:
        return "class forward"  # not dispatched (remote code, older layouts): its forward is the one
    eager = EagerForward(module)
    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
        module._old_forward = eager  # accelerate's hook calls _old_forward
    else:
        module.forward = eager
    return "eager"


def unforce_eager(module) -> None:
    if isinstance(module.__dict__.get("forward"), EagerForward):
        del module.__dict__["forward"]
    elif isinstance(module.__dict__.get("_old_forward"), EagerForward):
        module._old_forward = types.MethodType(type(module).forward, module)


def disk_name_function(model):
    """name -> the name ``save_pretrained`` writes a parameter of MODEL under: transformers' own
    checkpoint renamings reversed (ERNIE 4.5 keeps ``mlp.gate.moe_statics`` at
    ``mlp.moe_statics`` on disk). The identity where the model has none or they cannot be read
    (transformers.conversion_mapping / core_model_loading, 5.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        renamings = [r for r in (c.reverse_transform() for c in conversions[::-1]) if isinstance(r, WeightRenaming)]
    except Exception:  # a transformers without these helpers: names as they are
        return lambda name: name
    if not renamings:
        return lambda name: name
    return lambda name: apply_renamings(name, renamings)


def register_causal_lm(model_type: str | None) -> None:
    """Make AutoModelForCausalLM find MODEL_TYPE's own causal-LM class where transformers does not list it
    (5.24: Mistral 4, whose checkpoints usually ship inside a multimodal wrapper), through the public
    ``AutoModelForCausalLM.register``; every loading path (whole, quantized, streamed) then builds it."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from moetool.families.derive import causal_lm_class

    if not model_type or model_type not in CONFIG_MAPPING:
        return
    config_class = CONFIG_MAPPING[model_type]
    cls = causal_lm_class(config_class)
    if cls is not None:
        AutoModelForCausalLM.register(config_class, cls, exist_ok=True)


def checkpoint_sources(model, disk_names) -> dict[str, tuple]:
    """Where transformers' loader takes each parameter of MODEL from: {parameter name: (converter or
    None, the converter's first target, [(source pattern, disk name), ...])} over the checkpoint tensors DISK_NAMES. Each disk name
    goes through the model's renamings and at most one WeightConverter (``rename_source_key``, in
    ``dot_natural_key`` order, as ``convert_and_load_state_dict_in_model`` does); a converter's other
    targets (a Chunk's k and v after q) share its entry. Empty where these helpers are missing
    (transformers.conversion_mapping / core_model_loading, 5.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
    except Exception:  # a transformers without these helpers: nothing beyond the names on disk
        return {}
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    wanted = dict.fromkeys(model.state_dict(keep_vars=True), True)
    out: dict[str, tuple] = {}
    for key in sorted(disk_names, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if target not in wanted and key in wanted:
            target, pattern = key, None
        if target not in wanted:
            continue
        conv = by_pattern[pattern] if pattern is not None else None
        entry = out.setdefault(target, (conv, target, []))
        entry[2].append((pattern if conv is not None else key, key))
        if conv is not None:
            for other in conv.target_patterns[1:]:
                out.setdefault(target.replace(conv.target_patterns[0], other), entry)
    return out


def convert_checkpoint_tensors(model, converter, target: str, tensors) -> dict[str, object]:
    """CONVERTER's operations (transformers' WeightConverter.convert: Concatenate, MergeModulelist,
    Chunk, ...) over TENSORS [(source pattern, tensor), ...] in checkpoint order: {full parameter
    name: tensor} for TARGET and the converter's other targets."""
    import copy

    conv = copy.deepcopy(converter)
    for pattern, tensor in tensors:
        conv.collected_tensors[pattern].append(tensor)
    out = conv.convert(target, model=model, config=model.config)
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}
