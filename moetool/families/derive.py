"""Derived families: a family spec written from transformers' own model (level 1 support).

For a config whose ``model_type`` no curated ``moetool/families/*.json`` knows, moetool builds
transformers' model for that exact config on the meta device (no memory, no weights) and reads
off everything a family spec holds:

- every tensor of the checkpoint as ``save_pretrained`` writes it (transformers' reverse
  checkpoint conversion, so per-expert names where the disk is per-expert and fused names where
  it is fused), with its shape, its layer, its expert and its role;
- which layers are MoE, the experts per layer (the experts module's leading dimension) and the
  top-k (the router's or block's ``top_k``), and the config keys that hold them (so surgery can
  rewrite them);
- the runtime layout: the MoE block, router and experts module paths of the loaded model, and
  whether the experts module takes ``(hidden_states, top_k_index, top_k_weights)``
  (``"routing": "experts_input"``) or the routing must be read from the router's output
  (``"routing": "router_output"``).

The result is a family spec in the curated JSON format, with literal shapes and ``when``
conditions listing the layers each tensor template occurs in. It is cached under
``$MOETOOL_CACHE_DIR`` (or ``$XDG_CACHE_HOME/moetool``, ``~/.cache/moetool``) in
``families/<model_type>-<hash>.json``, keyed by the model type, the config fields that shape the
model and the transformers version, so a repeated call never imports transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError

DERIVE_VERSION = 4  # bump when the derived spec format changes (invalidates caches)

# config keys that never change a model's parameters: left out of the cache key
_NON_SHAPING = {
    "architectures", "auto_map", "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "use_cache", "output_router_logits", "router_aux_loss_coef",
    "quantization_config", "rms_norm_eps", "layer_norm_eps", "attention_dropout", "hidden_dropout",
    "routed_scaling_factor", "norm_topk_prob", "sliding_window", "max_window_layers", "use_sliding_window",
    "id2label", "label2id", "bos_token", "eos_token", "_attn_implementation", "_experts_implementation",
}
# class names of token mixers that are not softmax attention (linear attention, SSM, convolution)
_MIXER_RX = re.compile(r"(Mamba|DeltaNet|GatedDelta|DeltaAttention|LinearAttention|Lightning|ShortConv|SSM|"
                       r"Mixer|Conv1d|Recurrent|Rwkv|Retention|Hyena)", re.I)
_ATTN_RX = re.compile(r"(Attention|Attn|MLA$)", re.I)  # MLA: LongCat-Flash's LongcatFlashMLA
_LAYER_RX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TOPK_ATTRS = ("top_k", "num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k", "topk", "num_experts_per_token",
               "experts_per_token", "moe_top_k", "k")


def cache_dir() -> Path:
    if os.environ.get("MOETOOL_CACHE_DIR"):
        return Path(os.environ["MOETOOL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moetool"


def transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def cache_key(config: dict) -> str:
    shaping = {k: v for k, v in config.items() if k not in _NON_SHAPING}
    blob = json.dumps([DERIVE_VERSION, transformers_version(), shaping], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_path(config: dict) -> Path:
    mt = re.sub(r"[^A-Za-z0-9_.-]", "_", str(config.get("model_type")))
    return cache_dir() / "families" / f"{mt}-{cache_key(config)}.json"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def derived_spec(config: dict, use_cache: bool = True) -> dict:
    """The family spec derived for CONFIG (from the cache when it was derived before)."""
    path = _cache_path(config)
    if use_cache and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache entry is derived again
    spec = derive_spec(config)
    if use_cache:
        try:
            write_atomic(path, json.dumps(spec, indent=1))
        except OSError:
            pass  # a read-only cache is not an error
    return spec


# -- building transformers' model on the meta device ---------------------------------------------------------
def _quiet_transformers():
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    return transformers


def hf_config_for(config: dict):
    """transformers' config object for CONFIG (a plain dict), or a MoetoolError saying why not."""
    _quiet_transformers()
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise MoetoolError(f"unsupported model family '{model_type}': not a curated family and not a model type "
                           f"the installed transformers ({transformers_version()}) knows")
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config", "auto_map")}
    cls = CONFIG_MAPPING[model_type]
    decode = getattr(cls, "_decode_special_floats", None)  # config.json's {"__float__": "Infinity"}
    if decode is not None:
        kwargs = decode(kwargs)
    try:
        return cls(**kwargs)
    except Exception as exc:  # transformers validates configs strictly
        raise MoetoolError(f"transformers refuses this {model_type} config: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def causal_lm_class(hf_config):
    """transformers' causal-LM class for HF_CONFIG when AutoModelForCausalLM does not map it: the
    ``<Name>ForCausalLM`` class of the config's own model (Mistral 4 has one that transformers 5.24 does not list
    for AutoModelForCausalLM, its checkpoints shipping inside a multimodal wrapper). None: use the Auto classes."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_class = hf_config if isinstance(hf_config, type) else type(hf_config)
    if config_class in AutoModelForCausalLM._model_mapping:
        return None
    name = config_class.__name__
    if name.endswith("Config"):
        cls = getattr(transformers, name[: -len("Config")] + "ForCausalLM", None)
        if cls is not None and getattr(cls, "config_class", None) is config_class:
            return cls
    return None


def build_meta_model(hf_config):
    """transformers' causal-LM model for HF_CONFIG on the meta device (no memory); the base model where
    transformers has no causal-LM class for it."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    errors = []
    direct = causal_lm_class(hf_config)
    for auto in ((direct,) if direct is not None else (AutoModelForCausalLM, AutoModel)):
        try:
            with torch.device("meta"):
                return auto._from_config(hf_config) if auto is direct else auto.from_config(hf_config)
        except ValueError as exc:  # no mapping for this config class
            errors.append(_one_line(exc))
        except Exception as exc:
            raise MoetoolError(f"transformers cannot build a {hf_config.model_type} model from this config: "
                               f"{_one_line(exc)}") from None
    raise MoetoolError(f"transformers has no model class for {hf_config.model_type}: {errors[0]}")


def meta_count(model) -> int:
    """Parameters plus persistent buffers (what checkpoints store) of a built model."""
    state = model.state_dict()
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name in state)


# -- finding the MoE parts -------------------------------------------------------------------------------------
def _is_experts_module(name: str, module) -> int:
    """Number of experts when MODULE is a routed-experts container, else 0."""
    import torch.nn as nn

    last = name.rsplit(".", 1)[-1].lower()
    if "shared" in last:
        return 0
    if isinstance(module, nn.ModuleList):
        if "expert" in last and len(module) > 1 and len({type(m) for m in module}) == 1:
            return len(module)
        return 0
    decorated = hasattr(module, "is_concatenated") and hasattr(module, "has_gate")  # @use_experts_implementation
    if not (decorated or "expert" in type(module).__name__.lower() or "expert" in last):
        return 0
    firsts = [int(p.shape[0]) for p in module.parameters(recurse=False) if p.dim() == 3]
    if not firsts or (not decorated and any(True for c in module.children() if any(True for _ in c.parameters()))):
        return 0
    for attr in ("num_experts", "num_routed_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value in firsts:
            return value
    return min(firsts)


def _takes_routing(module) -> bool:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "top_k_index" in params or "top_k_weights" in params


def _find_router(block, block_name: str, experts_name: str, n_experts: int):
    """(child name, rows) of the block's router: a direct child called gate/router whose weight
    has one row per expert (more rows: zero-computation experts)."""
    import torch.nn as nn

    best = None
    for child_name, child in block.named_children():
        low = child_name.lower()
        if child_name == experts_name or "shared" in low:
            continue
        if not ("gate" in low or "router" in low):
            continue
        weight = getattr(child, "weight", None)
        rows = int(weight.shape[0]) if isinstance(weight, nn.Parameter) and weight.dim() == 2 else None
        if rows is None:  # a router with inner layers: its output rows are the last matrix's
            mats = [int(p.shape[0]) for p in child.parameters() if p.dim() == 2]
            rows = n_experts if n_experts in mats else (mats[-1] if mats else None)
        if rows is not None and rows >= n_experts:
            if best is None or "router" in low or low == "gate":
                best = (child_name, rows)
    return best


def _top_k(block, router, experts, config) -> int | None:
    for mod in (router, block, experts):
        if mod is None:
            continue
        for attr in _TOPK_ATTRS:
            value = getattr(mod, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _config_key(raw: dict, text: dict, value, must_contain: tuple[str, ...]) -> str | None:
    """The config key holding VALUE whose name mentions one of MUST_CONTAIN (the raw config's
    key first, so surgery rewrites what the user's config.json has)."""
    for source in (raw, text):
        for key, v in source.items():
            low = key.lower()
            if low.endswith("token_id") or low.endswith("_ids"):
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v == value and any(s in low for s in must_contain):
                return key
    return None


# -- roles -----------------------------------------------------------------------------------------------------
def _role_of(pname: str, owners: list[tuple[str, Any]], moe: dict, model) -> str:
    """Role of the model-side parameter PNAME; OWNERS = [(module path, module)] from the root down."""
    import torch.nn as nn

    paths = [p for p, _ in owners]
    for path in paths:
        if path in moe["experts"]:
            return "routed_experts"
        if path in moe["routers"]:
            return "router"
    owner_path, owner = owners[-1]
    leaf = pname.rsplit(".", 1)[-1]
    if owner_path in moe["blocks"] and leaf.endswith(("correction_bias", "expert_bias")):
        return "router"
    if any("shared_expert" in p.rsplit(".", 1)[-1].lower() for p in paths[1:]) or "shared_expert" in leaf:
        return "shared_experts"
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and owner is out_emb:
        return "lm_head"
    if isinstance(owner, nn.Embedding):
        return "embeddings"
    cls = type(owner).__name__
    if "norm" in cls.lower() or "norm" in leaf.lower() or "norm" in owner_path.rsplit(".", 1)[-1].lower():
        return "norms"
    for path, mod in reversed(owners[1:]):
        mcls = type(mod).__name__
        if _MIXER_RX.search(mcls) and not isinstance(mod, (nn.Linear, nn.Embedding)):
            return "mixers"
        if _ATTN_RX.search(mcls):
            return "attention"
        if path in moe["blocks"]:
            # a parameter of the MoE block itself is part of the routing (a gating scale or bias); a
            # module of the block that is no router, experts or shared expert is "other"
            is_layer = re.search(r"(?:^|\.)layers\.\d+$", path) is not None  # Gemma 4: the block is the layer
            return "router" if path == owner_path and not is_layer else "other"
        if "mlp" in mcls.lower() or re.search(r"(mlp|feed_forward|ffn)$", path.rsplit(".", 1)[-1]):
            return "dense_mlp"
    return "other"


# -- on-disk names ---------------------------------------------------------------------------------------------
def disk_layout(model) -> list[tuple[str, tuple[int, ...], str]]:
    """[(disk name, shape, model-side name)] as save_pretrained would write MODEL: tied weights
    dropped, transformers' checkpoint conversion reversed (per-expert names where the disk has
    them). Falls back to the model-side names when the conversion cannot run on meta tensors."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    try:
        return _reverse_conversion(model, state)
    except Exception:  # pragma: no cover - depends on the family's conversion operations
        return [(k, tuple(v.shape), k) for k, v in state.items()]


def _reverse_conversion(model, state: dict) -> list[tuple[str, tuple[int, ...], str]]:
    # transformers.core_model_loading.revert_weight_conversion, keeping track of which model-side
    # tensor each disk tensor comes from
    from copy import deepcopy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange,
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
    )

    conversions = get_model_conversion_mapping(model, add_legacy=False)
    conversions = [x for x in conversions if not isinstance(x, PrefixChange)]
    if not conversions:
        return [(k, tuple(v.shape), k) for k, v in state.items()]
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    renamings = [e for e in reverse if isinstance(e, WeightRenaming)]
    converters = [e for e in reverse if isinstance(e, WeightConverter)]
    by_pattern = {k: c for c in converters for k in c.source_patterns}
    mapping: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, tensor in sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed, pattern = apply_converters(key, converters)
        if pattern is not None:
            conv = mapping.setdefault(renamed, deepcopy(by_pattern[pattern]))
        else:
            renamed = apply_renamings(key, renamings)
            conv = mapping.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        origin.setdefault(renamed, key)
        conv.add_tensor(renamed, key, pattern, tensor)
    out = []
    for first, conv in mapping.items():
        realized = conv.convert(first, model=model, config=model.config)
        for target, tensor in realized.items():
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            if isinstance(conv, WeightConverter):
                target = apply_renamings(target, renamings)
            out.append((target, tuple(tensor.shape), origin[first]))
    return out


# -- the derivation --------------------------------------------------------------------------------------------
def analyse(model, hf_config, raw: dict) -> dict:
    """Everything moetool needs about MODEL, as plain data (see the module docstring)."""
    modules = dict(model.named_modules())
    experts: dict[str, int] = {}
    for name, mod in modules.items():
        n = _is_experts_module(name, mod)
        if n and not any(name.startswith(e + ".") for e in experts):
            experts[name] = n
    blocks, routers, layouts, layers = {}, {}, {}, {}
    for ename, n in experts.items():
        bname, _, echild = ename.rpartition(".")
        block = modules.get(bname)
        found = _find_router(block, bname, echild, n) if block is not None else None
        m = _LAYER_RX.search(ename + ".")
        layer = int(m.group(1)) if m else None
        blocks[bname] = layer
        rname = f"{bname}.{found[0]}" if found else None
        if rname:
            routers[rname] = found[1]
        top_k = _top_k(block, modules.get(rname) if rname else None, modules[ename], hf_config)
        layers[layer] = {"experts": n, "router_rows": found[1] if found else None, "top_k": top_k,
                         "block": bname, "router": found[0] if found else None, "experts_child": echild,
                         "routing": "experts_input" if _takes_routing(modules[ename]) else "router_output"}
        template = _LAYER_RX.sub(lambda mm: mm.group(0).replace(mm.group(1), "{L}"), bname + ".", count=1)[:-1]
        layouts[(template, found[0] if found else None, echild)] = layers[layer]["routing"]
    moe = {"experts": experts, "routers": routers, "blocks": blocks}

    roles: dict[str, str] = {}
    for pname, _ in list(model.named_parameters()) + list(model.named_buffers()):
        parts = pname.split(".")
        owners = [("", model)] + [(".".join(parts[:i]), modules.get(".".join(parts[:i]))) for i in range(1, len(parts))]
        owners = [(p, m) for p, m in owners if m is not None]
        roles[pname] = _role_of(pname, owners, moe, model)
    return {"moe": moe, "layers": layers, "layouts": layouts, "roles": roles}


def derive_spec(config: dict) -> dict:
    """Build transformers' model for CONFIG on the meta device and write its family spec."""
    hf_config = hf_config_for(config)
    model = build_meta_model(hf_config)
    return spec_from_model(model, hf_config, config)


def spec_from_model(model, hf_config, raw: dict) -> dict:
    model_type = hf_config.model_type
    if getattr(hf_config, "is_encoder_decoder", False):
        raise MoetoolError(f"'{model_type}' is an encoder-decoder model; moetool handles decoder-only "
                           "language models")
    info = analyse(model, hf_config, raw)
    if not info["layers"]:
        raise MoetoolError(f"'{model_type}': transformers' model for this config has no routed experts "
                           "(a dense model, not a mixture of experts)")
    text = hf_config.get_text_config().to_dict() if hasattr(hf_config, "get_text_config") else hf_config.to_dict()
    per_layer = info["layers"]
    counts = {v["experts"] for v in per_layer.values()}
    topks = {v["top_k"] for v in per_layer.values()}
    rows = {v["router_rows"] for v in per_layer.values()}
    E = max(counts)
    top_k = next(iter(topks)) if len(topks) == 1 else None
    if top_k is None:
        cand = [text.get(k) for k in _TOPK_ATTRS if k != "k"]
        top_k = next((c for c in cand if isinstance(c, int)), None)
    notes, unsafe = [], []
    per_block = defaultdict(int)
    for name in info["moe"]["experts"]:
        per_block[_LAYER_RX.search(name + ".").group(1) if _LAYER_RX.search(name + ".") else name] += 1
    if any(n > 1 for n in per_block.values()):
        unsafe.append("a layer has several experts modules (mixture-of-attention or split experts), "
                      "which moetool's surgery does not cut")
    if len(counts) > 1:
        unsafe.append(f"the number of experts differs between layers ({sorted(counts)})")
    zero = 0
    if len(rows) == 1 and next(iter(rows)) is not None and next(iter(rows)) > E:
        zero = next(iter(rows)) - E
        notes.append(f"{zero} zero-computation experts: the router has {E + zero} rows for {E} experts; "
                     "choices of a zero expert compute nothing, so active counts every top-k choice as a real "
                     "expert (an upper bound)")
        unsafe.append(f"the router scores {zero} zero-computation experts beside the {E} real ones "
                      "(their rows would need renumbering)")
    if None in rows:
        unsafe.append("no router module with one row per expert was found beside the experts")

    layout = disk_layout(model)
    roles = info["roles"]
    moe_layers = sorted(L for L in per_layer if L is not None)
    layer_names = [n for n, _, _ in layout if _LAYER_RX.search(n)]
    layer_ids = sorted({int(_LAYER_RX.search(n).group(1)) for n in layer_names})
    num_layers = (max(layer_ids) + 1) if layer_ids else 0
    hidden = int(text.get("hidden_size") or 0)

    # templates: layer number -> {L}, expert number -> {E}
    groups: dict[tuple[str, str, tuple, str, bool], list[int | None]] = defaultdict(list)
    expert_shapes: dict[tuple[str, tuple, str], set[int]] = defaultdict(set)
    expert_ids: dict[tuple[str, tuple, str], dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    groups_extra: list[dict] = []
    for disk, shape, model_name in layout:
        role = roles.get(model_name, "other")
        m = _LAYER_RX.search(disk)
        layer = int(m.group(1)) if m else None
        template = disk
        if m:
            template = disk[: m.start(1)] + "{L}" + disk[m.end(1):]
        if role == "routed_experts" and layer in per_layer:
            ex = re.search(r"\.(\d+)\.", template[template.index("{L}") + 3:] if "{L}" in template else template)
            if ex:
                start = (template.index("{L}") + 3 if "{L}" in template else 0) + ex.start(1)
                etemplate = template[:start] + "{E}" + template[start + len(ex.group(1)):]
                expert_shapes[(etemplate, shape, role)].add(layer)
                expert_ids[(etemplate, shape, role)][layer].add(int(ex.group(1)))
                continue
        fused = role == "routed_experts" and len(shape) >= 2 and shape[0] == per_layer.get(layer, {}).get("experts")
        lead = next((n for n in shape if n != 1), None)  # [1, E] is laid out as [E] (ERNIE 4.5's bias)
        expert_rows = role == "router" and layer in per_layer and lead is not None and lead in (
            per_layer[layer]["experts"], per_layer[layer]["router_rows"])
        group = "model" if layer is None else ("moe_layer" if role in ("router", "routed_experts") and layer in per_layer else "layer")
        groups[(group, template, shape, role, bool(fused), bool(expert_rows))].append(layer)

    def when(layers: list[int], universe: list[int]) -> str | None:
        layers = sorted(set(layers))
        return None if layers == universe else f"L in {layers}"

    tensors: dict[str, list[dict]] = {"model": [], "layer": [], "moe_layer": [], "expert": []}
    all_layers = list(range(num_layers))
    for (group, template, shape, role, fused, expert_rows), lays in groups.items():
        entry: dict[str, Any] = {"name": template, "shape": list(shape), "role": role}
        if group != "model":
            cond = when(lays, moe_layers if group == "moe_layer" else all_layers)
            if cond:
                entry["when"] = cond
        if fused:
            entry["fused"] = True
        if expert_rows:
            entry["expert_rows"] = True
        tensors[group].append(entry)
    for (template, shape, role), lays in expert_shapes.items():
        seen = expert_ids[(template, shape, role)]
        if any(seen[L] != set(range(per_layer[L]["experts"])) for L in lays):
            # not one tensor per expert (transformers' LongCat allocates gate_up for its zero experts):
            # listed one by one, so the count stays exact
            for L in sorted(lays):
                for e in sorted(seen[L]):
                    name = template.replace("{E}", str(e))
                    groups_extra.append({"name": name, "shape": list(shape), "role": role, "when": f"L in [{L}]"})
            continue
        entry = {"name": template, "shape": list(shape), "role": role}
        cond = when(sorted(lays), moe_layers)
        if cond:
            entry["when"] = cond
        proj = re.search(r"(gate_up|gate|up|down|w1|w2|w3)(?:_proj)?\.weight$", template)
        if proj:
            entry["proj"] = {"w1": "gate", "w3": "up", "w2": "down"}.get(proj.group(1), proj.group(1))
        tensors["expert"].append(entry)
    for t in tensors["moe_layer"]:
        shape = t["shape"]
        if t["role"] in ("router", "routed_experts") and not (t.get("expert_rows") or t.get("fused")) \
                and E in shape[1:]:
            unsafe.append(f"{t['name']} holds one entry per expert along dimension {shape.index(E)} "
                          "(surgery cuts dimension 0)")
    merged: dict[tuple, list[int]] = defaultdict(list)
    for t in groups_extra:  # the same name template in several layers: one entry with their layers
        m = _LAYER_RX.search(t["name"])
        key = (t["name"][: m.start(1)] + "{L}" + t["name"][m.end(1):] if m else t["name"], tuple(t["shape"]), t["role"])
        merged[key].append(int(t["when"][6:-1]))
    for (name, shape, role), lays in merged.items():
        entry = {"name": name, "shape": list(shape), "role": role}
        cond = when(lays, moe_layers)
        if cond:
            entry["when"] = cond
        tensors["moe_layer"].append(entry)
    if not tensors["moe_layer"] or not any(t["role"] == "router" for t in tensors["moe_layer"]):
        unsafe.append("no router tensor with one row per expert")

    e_key = _config_key(raw, text, E, ("expert",))
    k_key = _config_key(raw, text, top_k, ("per_tok", "top", "_k", "per_token")) if top_k else None
    defaults = {}
    for key in (e_key, k_key):
        if key and key not in raw:
            defaults[key] = text.get(key)
    shared = [t for g in tensors.values() for t in g if t["role"] == "shared_experts"]
    shared_inter = 0
    for t in shared:
        if re.search(r"down_proj\.weight$", t["name"]) and len(t["shape"]) == 2:
            shared_inter = t["shape"][1]
            break
    expert_inter = int(getattr(model.get_submodule(next(iter(info["moe"]["experts"]))), "intermediate_dim", 0) or 0)
    if not expert_inter:
        for t in tensors["expert"]:
            if t.get("proj") == "down":
                expert_inter = t["shape"][-1]
        for t in tensors["moe_layer"]:
            if t.get("fused") and t["name"].endswith("down_proj") and len(t["shape"]) == 3:
                expert_inter = min(t["shape"][1:]) if hidden not in t["shape"][1:] else [d for d in t["shape"][1:] if d != hidden][0] if any(d != hidden for d in t["shape"][1:]) else hidden
    if not expert_inter:  # experts modules without gate/up/down names (JetMoE's input/output_linear)
        dims = [d for p in model.get_submodule(next(iter(info["moe"]["experts"]))).parameters(recurse=False)
                if p.dim() == 3 for d in p.shape[1:] if d != hidden]
        expert_inter = min(dims) if dims else 1
    heads = int(text.get("num_attention_heads") or 0)
    kv_heads = int(text.get("num_key_value_heads") or heads or 0)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    v_dim = int(text.get("v_head_dim") or head_dim)
    qk_dim = int(text.get("qk_head_dim") or head_dim)
    layouts = [{"block": t, "router": r, "experts": e, "routing": routing}
               for (t, r, e), routing in info["layouts"].items() if r]
    # where the disk names the block differently from the module tree (Mixtral-style conversions:
    # block_sparse_moe, gate vs router), a second layout that maps one onto the other
    origin = {m: d for d, _, m in layout}
    for lay in list(layouts):
        L = moe_layers[0] if moe_layers else None
        if L is None:
            break
        block = lay["block"].replace("{L}", str(L))
        rname = f"{block}.{lay['router']}."
        disk_router = next((origin[m] for m in origin if m.startswith(rname)), None)
        disk_expert = next((origin[m] for m in origin if m.startswith(f"{block}.{lay['experts']}.")), None)
        if not disk_router or not disk_expert:
            continue
        d_router_mod = disk_router[: len(disk_router) - len(next(m for m in origin if origin[m] == disk_router)[len(rname):]) - 1]
        d_block, _, d_router = d_router_mod.rpartition(".")
        if not disk_expert.startswith(d_block + "."):
            continue
        d_experts = disk_expert[len(d_block) + 1:].split(".", 1)[0]
        d_block_t = d_block.replace(f"layers.{L}.", "layers.{L}.", 1)
        if (d_block_t, d_router, d_experts) != (lay["block"], lay["router"], lay["experts"]):
            layouts.append({"block": d_block_t, "router": d_router, "experts": d_experts,
                            "routing": lay["routing"], "disk": True})
    shared_child = next((c for c in ("shared_experts", "shared_expert", "shared_mlp")
                         if any(f".{c}." in t["name"] for t in shared)), None)
    if shared_child:
        for lay in layouts:
            lay["shared"] = shared_child
    arch = list(getattr(hf_config, "architectures", None) or raw.get("architectures") or [type(model).__name__])
    ignore = [p for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []) if isinstance(p, str)]
    # hybrids: which layers cache keys and values (softmax attention) and which keep a fixed state (mixers)
    kinds: dict[str, set[int]] = defaultdict(set)
    for disk, _, model_name in layout:
        m = _LAYER_RX.search(disk)
        if m:
            kinds[roles.get(model_name, "other")].add(int(m.group(1)))
    cache = {}
    if kinds["mixers"]:
        cache = {"attention_layer": f"L in {sorted(kinds['attention'])}", "state_layer": f"L in {sorted(kinds['mixers'])}"}
    spec = {
        "name": model_type,
        "level": "derived",
        "description": f"derived from transformers {transformers_version()} {type(model).__name__} on the meta device",
        "model_types": [model_type],
        "architectures": arch,
        "transformers_model_type": model_type,
        "model_class": type(model).__name__,
        "derived_from": {"transformers": transformers_version(), "derive_version": DERIVE_VERSION,
                         "cache_key": cache_key(raw)},
        "defaults": defaults,
        "fields": {
            "num_layers": str(num_layers),
            "hidden_size": str(hidden),
            "vocab_size": str(int(text.get("vocab_size") or 0)),
            "num_experts": e_key or str(E),
            "top_k": k_key or str(top_k or 0),
            "expert_intermediate": str(expert_inter),
            "num_shared_experts": str(1 if shared else 0),
            "shared_intermediate": str(shared_inter),
            "tie_embeddings": str(bool(text.get("tie_word_embeddings"))),
            "scoring": repr(str(text.get("scoring_func") or text.get("score_func") or (
                "sigmoid" if any("correction_bias" in t["name"] for t in tensors["moe_layer"]) else "softmax"))),
            "kv_elements_per_layer": str(2 * kv_heads * head_dim if heads else 0),
            "attn_qk_width": str(heads * qk_dim),
            "attn_v_width": str(heads * v_dim),
            "zero_experts": str(zero),
        },
        "is_moe_layer": f"L in {moe_layers}",
        **({"cache": cache} if cache else {}),
        "tensors": tensors,
        "aliases": [],
        "runtime": {"layouts": layouts},
        "disk_extra_patterns": ignore,
        "notes": notes,
        "surgery": {"unsupported": "; ".join(unsafe)} if unsafe else {},
        "meta_total": meta_count(model),
    }
    return spec


def transformers_available() -> bool:
    from importlib.util import find_spec

    return find_spec("transformers") is not None
