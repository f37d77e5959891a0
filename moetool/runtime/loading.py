"""Load a MoE checkpoint for running it: one loader shared by every command that runs a model
(trace, prune, eval, distill, plan).

``load_model`` resolves MODEL like every other command (local directory or a Hub id already in
the local cache; never downloads), checks the family (a dense model is a one-line error), and
loads with transformers with the options a user can give on the command line: dtype, device
map, a memory budget with disk offload through accelerate, 4-bit/8-bit loading. What the
machine cannot do (a CUDA device in a device map without CUDA, bitsandbytes missing) is a
one-line :class:`MoetoolError` before anything heavy happens.

``moe_blocks`` finds each MoE layer's block, router and experts from the family's
``runtime.layouts`` templates (transformers 5 ``mlp.gate``, the 4.x / remote-code
``block_sparse_moe.gate``, gpt-oss ``mlp.router``): the first layout whose modules exist wins.

torch and transformers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError, first_line
from moetool.units import parse_size

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

@dataclass
class LoadedModel:
    """A model ready to run, with what was asked and what was actually done."""

    model: Any  # a transformers PreTrainedModel (CausalLM)
    tokenizer: Any  # a transformers tokenizer, or None for an in-memory model without one
    source: Any  # moetool.checkpoint.source.ModelSource
    rc: Any  # moetool.families.ResolvedConfig
    family: Any  # moetool.families.Family
    quantization: str = "none"  # "none" | "bnb-nf4" | "bnb-int8" | what the 4-bit helper reports
    dtype: str = "float32"  # dtype of the floating-point weights as loaded
    weight_bytes: int = 0  # every parameter and buffer as held (in memory, offloaded or not)
    expert_weight_bytes: int = 0  # the routed experts' share of weight_bytes
    device_map: dict = field(default_factory=dict)  # module -> device actually used
    offload_folder: str | None = None
    quant_report: dict | None = None  # what the 4-bit helper returned, if it ran
    layer_reader: Any = None  # moetool.runtime.streaming.LayerReader when the model is streamed layer by layer
    run_options: dict = field(default_factory=dict)  # executor defaults: run_dir, resume, activation budget

    @property
    def name(self) -> str:
        return self.source.name

    def load_info(self) -> dict:
        """Plain data for reports (`load` in `moetool trace --json`)."""
        devices: dict[str, int] = {}
        for dev in self.device_map.values():
            devices[str(dev)] = devices.get(str(dev), 0) + 1
        return {
            "quantization": self.quantization,
            "dtype": self.dtype,
            "weight_bytes": int(self.weight_bytes),
            "expert_weight_bytes": int(self.expert_weight_bytes),
            "device_map": {str(k): str(v) for k, v in self.device_map.items()},
            "devices": devices,
            "offloaded": self.layer_reader is None and (
                any(str(v) in ("disk", "meta") for v in self.device_map.values())
                or (len(devices) > 1 and "cpu" in devices)),
            "streamed": self.layer_reader is not None,
            # what 4-/8-bit loading left in the compute dtype and why, and any fallback it took
            "quantization_notes": list((self.quant_report or {}).get("warnings") or [])
            + list((self.quant_report or {}).get("notes") or []),
        }

    @property
    def input_device(self):
        """Where input ids go: the device of the embedding (CPU when it is offloaded)."""
        import torch

        emb = self.model.get_input_embeddings()
        for param in emb.parameters():
            if param.device.type != "meta":
                return param.device
        for dev in self.device_map.values():
            if isinstance(dev, int) or str(dev).startswith(("cuda", "xpu", "mps")):
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        return torch.device("cpu")


# -- option parsing ------------------------------------------------------------------------------
def parse_max_memory(spec: str | dict | None) -> dict | None:
    """'0=20GiB,cpu=64GiB' -> {0: 21474836480, 'cpu': 68719476736} (GPU indices as ints)."""
    if spec is None or spec == "":
        return None
    items = spec.items() if isinstance(spec, dict) else []
    if isinstance(spec, str):
        parsed = []
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise MoetoolError(f"--max-memory: expected DEVICE=SIZE pairs like '0=20GiB,cpu=64GiB', got '{part.strip()}'")
            key, value = part.split("=", 1)
            parsed.append((key.strip(), value.strip()))
        items = parsed
    out: dict = {}
    for key, value in items:
        key = _device_key(key, "--max-memory")
        out[key] = parse_size(value, f"--max-memory {key}")
    if not out:
        raise MoetoolError("--max-memory: empty budget")
    return out


def _device_key(key, what: str):
    """Normalise a device name of a device map / memory budget: GPU index as int."""
    if isinstance(key, int):
        return key
    key = str(key).strip().lower()
    if key.isdigit():
        return int(key)
    if key.startswith("cuda:") and key[5:].isdigit():
        return int(key[5:])
    if key in ("cuda", "gpu"):
        return 0
    if key in ("cpu", "disk", "mps") or re.fullmatch(r"(xpu|npu|mlu|hpu)(:\d+)?", key):
        return key
    raise MoetoolError(f"{what}: unknown device '{key}' (use a GPU index, cuda:N, cpu or disk)")


def _check_devices_exist(devices, what: str) -> None:
    import torch

    for dev in devices:
        if isinstance(dev, int):
            if not torch.cuda.is_available():
                raise MoetoolError(f"{what} uses CUDA device {dev}, but this machine has no CUDA device "
                                   "(use cpu, disk, or device map 'auto')")
            if dev >= torch.cuda.device_count():
                raise MoetoolError(f"{what} uses CUDA device {dev}, but this machine has "
                                   f"{torch.cuda.device_count()} (0..{torch.cuda.device_count() - 1})")
        elif dev == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise MoetoolError(f"{what} uses 'mps', which this machine does not have")
        elif isinstance(dev, str) and dev.split(":")[0] in ("xpu", "npu", "mlu", "hpu"):
            backend = getattr(torch, dev.split(":")[0], None)
            if backend is None or not backend.is_available():
                raise MoetoolError(f"{what} uses '{dev}', which this machine does not have")


def parse_device_map(spec) -> str | dict | None:
    """None | 'auto' | 'balanced' | 'cpu' | 'cuda:0' | dict | path to a JSON file -> what
    transformers' ``device_map`` takes, with every named device checked to exist here."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        mapping = spec
    else:
        text = str(spec).strip()
        if text in DEVICE_MAP_STRATEGIES:
            return text
        path = Path(text).expanduser()
        if path.is_file() or text.endswith(".json"):
            if not path.is_file():
                raise MoetoolError(f"--device-map: {text}: no such file")
            try:
                mapping = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise MoetoolError(f"--device-map: {text}: not valid JSON ({exc})") from None
            if not isinstance(mapping, dict):
                raise MoetoolError(f"--device-map: {text}: expected a JSON object of module -> device")
        elif text.startswith("{"):
            try:
                mapping = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MoetoolError(f"--device-map: not valid JSON ({exc})") from None
        else:
            mapping = {"": text}
    out = {str(k): _device_key(v, "--device-map") for k, v in mapping.items()}
    if not out:
        raise MoetoolError("--device-map: empty device map")
    _check_devices_exist(set(out.values()), "the device map")
    return out


# -- loading ---------------------------------------------------------------------------------------
_TEMP_DIRS: list[str] = []


def _cleanup_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_temp_dirs)


def temporary_dir(prefix: str) -> str:
    """A directory removed when the process exits (offload folders, a streamed teacher's cache)."""
    d = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(d)
    return d


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise MoetoolError(f"--dtype: unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_model(
    model: str,
    dtype: str = "auto",
    device_map=None,
    max_memory=None,
    offload_folder: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    stream: bool | None = False,
    run_dir: str | None = None,
    resume: bool = False,
) -> LoadedModel:
    """Load MODEL (checkpoint directory or cached Hub id) with its tokenizer, offline.

    Before anything heavy, ``moetool.checkpoint.checks.check_weights`` reads the safetensors headers: an
    incomplete or damaged checkpoint is a one-line error, and pickled weights are refused
    unless ALLOW_PICKLE (then read with torch's ``weights_only``). A load that transformers
    reports with missing, unexpected or mismatched keys is an error, never a random init.

    STREAM: True = keep only the skeleton and read each decoder layer's weights when the
    executor runs it (moetool.runtime.streaming); None = do so when the weights do not fit the
    memory given (the MAX_MEMORY total, else the free memory; an explicit DEVICE_MAP means
    accelerate's placement). RUN_DIR / RESUME: where a layer-by-layer run checkpoints, and
    continuing it."""
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    source = resolve(model)
    if source.name != model:  # a cached Hub id resolves through its snapshot directory: keep the id
        source = dataclasses.replace(source, name=model)
    rc = resolve_family(source)  # dense / unknown family: one-line error before torch is imported
    if source.kind != "checkpoint" or source.path is None:
        raise MoetoolError(
            f"{model}: a {source.kind} has no weights to run; give a checkpoint directory or a cached Hub id"
        )
    if load_in_4bit and load_in_8bit:
        raise MoetoolError("choose one of --load-in-4bit and --load-in-8bit")
    from moetool.checkpoint.checks import check_weights

    entries = check_weights(model, source.path, rc, allow_pickle=allow_pickle)
    if (load_in_4bit or load_in_8bit) and not _has_module("bitsandbytes"):
        raise MoetoolError("4-bit/8-bit loading needs bitsandbytes, which is not installed (pip install bitsandbytes)")

    if resume and not run_dir:
        raise MoetoolError("--resume needs --run-dir DIR (where the interrupted run kept its checkpoints)")
    torch_dtype = _torch_dtype(dtype)
    from moetool.runtime.hf_compat import register_causal_lm

    register_causal_lm(source.config.get("model_type"))
    budget = parse_max_memory(max_memory)
    no_layerwise = rc.family.layerwise_unsupported or rc.family.stream_unsupported
    if stream and no_layerwise:
        raise MoetoolError(f"{model}: a {rc.family.name} model cannot run one layer at a time: {no_layerwise} "
                           "(run it with --no-stream)")
    unloadable = _zero_expert_rows_missing(rc, entries)
    if unloadable and not stream:
        if stream is False or no_layerwise:
            raise MoetoolError(f"{model}: {unloadable}; transformers cannot load it whole: run it with --stream "
                               "(the layer reader fills those never-used rows with zeros)")
        from moetool.errors import warn

        warn(f"{model}: {unloadable}; running it one layer at a time, which fills those never-used rows with zeros")
        stream = True
    if stream is None:
        stream = not no_layerwise and _choose_stream(model, source, budget, device_map, load_in_4bit or load_in_8bit)
    run = {"run_dir": run_dir, "resume": bool(resume)}
    if budget is not None:
        run["activation_budget"] = int(sum(v for k, v in budget.items() if k != "disk"))
    if stream:
        if isinstance(parse_device_map(device_map), dict):
            raise MoetoolError("--stream places each layer itself; give no explicit --device-map")
        bits = 4 if load_in_4bit else 8 if load_in_8bit else None
        return _load_streamed(model, source, rc, torch_dtype, device_map, trust_remote_code, run, bits)
    kwargs, offload_folder = _placement(source, device_map, budget, offload_folder, torch_dtype, allow_pickle,
                                        trust_remote_code)
    path = str(source.path)
    hf_model, quantization, quant_report = _from_pretrained(model, path, kwargs, torch_dtype, load_in_4bit,
                                                            load_in_8bit)
    tokenizer = _tokenizer(path, trust_remote_code)
    loaded = LoadedModel(
        model=hf_model, tokenizer=tokenizer, source=source, rc=rc, family=rc.family,
        quantization=quantization, offload_folder=offload_folder, quant_report=quant_report,
    )
    _fill_load_info(loaded)
    loaded.run_options = run
    moe_blocks(loaded)  # fail now, with a clear message, if the layout is not found
    return loaded


def _placement(source, device_map, budget, offload_folder, torch_dtype, allow_pickle: bool,
               trust_remote_code: bool) -> tuple[dict, str | None]:
    """from_pretrained's keyword arguments for where the weights go (device map, memory budget,
    offload folder: a temporary one when none is given) and how they are read (safetensors
    only, or torch's weights_only loader with --allow-pickle)."""
    dmap = parse_device_map(device_map)
    if budget is not None:
        _check_devices_exist([k for k in budget if k != "disk"], "--max-memory")
        if dmap is None:
            dmap = "auto"  # a memory budget only means something with a device map
        elif isinstance(dmap, dict):
            raise MoetoolError("--max-memory applies to a computed device map (auto, balanced, sequential), "
                               "not to an explicit one")
    if dmap is not None and offload_folder is None:
        offload_folder = temporary_dir("moetool-offload-")
    if isinstance(dmap, dict) and set(dmap) != {""}:
        dmap = _complete_device_map(str(source.path), dmap, trust_remote_code)
    kwargs: dict[str, Any] = dict(local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    if allow_pickle:
        kwargs["weights_only"] = True  # torch.load of tensors only: no arbitrary objects
    else:
        kwargs["use_safetensors"] = True  # never falls back to a pickle
    if dmap is not None:
        kwargs["device_map"] = dmap
        kwargs["offload_folder"] = offload_folder
    if budget is not None:
        kwargs["max_memory"] = budget
    return kwargs, offload_folder


def _from_pretrained(model: str, path: str, kwargs: dict, torch_dtype, load_in_4bit: bool, load_in_8bit: bool):
    """(the transformers model in eval mode, its quantization label, the quantization report);
    any loading failure is one line."""
    from transformers import AutoModelForCausalLM

    quantization = "none"
    quant_report = None
    restore = _quiet_transformers()
    try:
        if load_in_4bit:
            hf_model, quantization, quant_report = _load_with_quant_helper(path, 4, torch_dtype, kwargs)
        elif load_in_8bit and _quant_loader(8) is not None:
            hf_model, quantization, quant_report = _load_with_quant_helper(path, 8, torch_dtype, kwargs)
        else:
            if load_in_8bit:  # no quantization helper: transformers' own int8 (nn.Linear only)
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
                quantization = "bnb-int8, experts not quantized"
            hf_model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
            check_loading_info(model, info)
    except MoetoolError:
        raise
    except pickle.UnpicklingError as exc:  # --allow-pickle: torch's weights_only loader refused an object
        refused = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln]
        raise MoetoolError(f"{model}: cannot load: the pickle holds more than tensors, which moetool never unpickles"
                           + (f" ({refused[0]})" if refused else "")) from None
    except (ValueError, RuntimeError, OSError, KeyError, TypeError, ImportError, AttributeError) as exc:
        raise MoetoolError(f"{model}: cannot load ({first_line(exc)})") from None
    finally:
        restore()
    hf_model.eval()
    return hf_model, quantization, quant_report


def _tokenizer(path: str, trust_remote_code: bool):
    """The checkpoint's tokenizer, or None (a checkpoint without one can still be traced from token ids)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError):
        return None


def check_loading_info(model: str, info: dict) -> None:
    """transformers initialises weights it did not find at random and only logs it: here a
    missing, unexpected or misshapen key is a one-line error."""
    from moetool.checkpoint.checks import SHOWN

    for key, what in (("missing_keys", "missing from the checkpoint (transformers would initialise them at random)"),
                      ("mismatched_keys", "of the wrong shape"),
                      ("unexpected_keys", "in the checkpoint but not in the model")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or ()))
        if names:
            more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
            raise MoetoolError(f"{model}: cannot load: {len(names)} weight{'s' if len(names) > 1 else ''} "
                               f"{what}: {', '.join(names[:SHOWN])}{more}")
    errors = [str(e) for e in (info.get("error_msgs") or ())]
    if errors:
        raise MoetoolError(f"{model}: cannot load: {errors[0].strip().splitlines()[0]}")


def _zero_expert_rows_missing(rc, entries) -> str | None:
    """Why transformers cannot load this checkpoint whole, when its model allocates rows for the
    zero-computation experts (LongCat-Flash's gate/up) that the checkpoint, as published, lacks."""
    if not rc.zero_experts or not entries:
        return None
    for name in entries:
        m = rc.family.classify(name)
        if m is not None and m.expert is not None and m.expert >= rc.num_experts:
            return None  # save_pretrained's layout: the rows are there
    return (f"the checkpoint has no expert rows for its {rc.zero_experts} zero-computation experts (the published "
            "layout), which transformers' model allocates")


def _choose_stream(model: str, source, budget: dict | None, device_map, quantized: bool) -> bool:
    """Neither --stream nor --no-stream: stream when the weights do not fit the memory the run is
    given: the --max-memory total (devices and cpu, not disk) when there is one, else three
    quarters of the free memory. An explicit --device-map, or a quantized load, keeps
    accelerate's placement."""
    if device_map is not None or quantized:
        return False
    if budget is not None:
        weights = _weights_bytes(source)
        given = sum(v for k, v in budget.items() if k != "disk")
        if weights is None or weights <= given:
            return False
        why = f"its weights ({weights:,} bytes) do not fit in --max-memory ({given:,} bytes)"
    elif _weights_exceed_memory(source):
        why = "its weights do not fit in the free memory"
    else:
        return False
    from moetool.errors import warn

    warn(f"{model}: {why}; running it one layer at a time (--no-stream for accelerate's placement"
         + (" and disk offload)" if budget is not None else ", loading it whole)"))
    return True


def _weights_bytes(source) -> int | None:
    from moetool.checkpoint.safetensors_header import checkpoint_files

    try:
        return sum(p.stat().st_size for p in checkpoint_files(source.path))
    except (MoetoolError, OSError):
        return None


def _weights_exceed_memory(source) -> bool:
    """Whether the checkpoint's weights need more than the memory this machine has free
    (MemAvailable, plus free GPU memory), with a quarter kept for activations and the rest."""
    weights = _weights_bytes(source)
    free = _available_memory()
    return weights is not None and free is not None and weights > 0.75 * free


def _available_memory() -> int | None:
    free = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            free = (free or 0) + sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    except Exception:  # no usable CUDA: the host memory alone
        pass
    return free


def _load_streamed(model: str, source, rc, torch_dtype, device_map, trust_remote_code: bool, run: dict,
                   bits: int | None = None) -> LoadedModel:
    """The skeleton of MODEL with a LayerReader (moetool.runtime.streaming), and its tokenizer. BITS:
    each layer's fused experts quantized to 4-bit / int8 as it is read (moetool.runtime.quant.bnb); the
    rest of the layer stays in the model's dtype."""
    from moetool.runtime.streaming import load_streamed

    restore = _quiet_transformers()
    try:
        hf_model, reader = load_streamed(source, rc, torch_dtype, device_map=parse_device_map(device_map),
                                         trust_remote_code=trust_remote_code)
    except MoetoolError:
        raise
    except (ValueError, RuntimeError, OSError, KeyError, TypeError, ImportError, AttributeError) as exc:
        raise MoetoolError(f"{model}: cannot load ({first_line(exc)})") from None
    finally:
        restore()
    loaded = LoadedModel(model=hf_model, tokenizer=_tokenizer(str(source.path), trust_remote_code), source=source, rc=rc, family=rc.family,
                         layer_reader=reader, run_options=run)
    _fill_load_info(loaded)
    if bits:
        from moetool.runtime.quant import bnb as quant

        if bits == 4:
            quant.require_backend(reader.device)
        reader.quant_bits = bits
        loaded.quantization = f"experts-{'nf4' if bits == 4 else 'int8'} (each layer as it is read)"
    loaded.device_map = {reader.prefix: "stream", "": str(reader.device)}
    moe_blocks(loaded)
    return loaded


def _complete_device_map(path: str, mapping: dict, trust_remote_code: bool) -> dict:
    """Check an explicit device map against the model's modules (built on the meta device:
    no weights read) and expand a default entry ``""`` into the modules it stands for, which
    transformers needs: every parameter must be placed, and every key must name a module."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):  # keeps fused expert params on meta (init_empty_weights does not)
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError, ImportError) as exc:
        raise MoetoolError(f"{path}: cannot read the model's structure ({first_line(exc)})") from None
    modules = dict(skeleton.named_modules())
    tensors = [n for n, _ in skeleton.named_parameters()] + [n for n, _ in skeleton.named_buffers()]
    unknown = [k for k in mapping if k and k not in modules and k not in tensors]
    if unknown:
        raise MoetoolError(f"--device-map: '{unknown[0]}' is not a module of this model")

    def inside(key: str, name: str) -> bool:
        return key == "" or name == key or name.startswith(key + ".")

    uncovered = [n for n in tensors if not any(inside(k, n) for k in mapping)]
    if uncovered:
        more = f" (+{len(uncovered) - 1} more)" if len(uncovered) > 1 else ""
        raise MoetoolError(f"--device-map does not place {uncovered[0]}{more}; map every module or add "
                           "a default entry \"\": DEVICE")
    if "" not in mapping:
        return mapping
    out: dict = {}

    def walk(prefix: str, module, device) -> None:
        device = mapping.get(prefix, device) if prefix else device
        if not any(k and k != prefix and inside(prefix, k) for k in mapping):
            out[prefix] = device
            return
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        for name in own:
            full = f"{prefix}.{name}" if prefix else name
            out[full] = mapping.get(full, device)
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child, device)

    walk("", skeleton, mapping[""])
    return out


def _quiet_transformers():
    """Silence transformers' progress bars and info/warning logs during a load (a CLI prints
    its own report); returns a function that restores the previous settings."""
    from transformers.utils import logging as hf_logging

    import logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    acc = logging.getLogger("accelerate")  # "Some parameters are on the meta device because ... offloaded"
    acc_level = acc.level
    acc.setLevel(logging.ERROR)

    def restore():
        hf_logging.set_verbosity(verbosity)
        acc.setLevel(acc_level)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _quant_loader(bits: int):
    """``moetool.runtime.quant.bnb.load_in_4bit`` / ``load_in_8bit`` if this installation has them."""
    try:
        from moetool.runtime.quant import bnb as quant
    except ImportError:
        return None
    return getattr(quant, f"load_in_{bits}bit", None)


def _load_with_quant_helper(path: str, bits: int, torch_dtype, kwargs: dict):
    """4-/8-bit loading is the quantization helper's (moetool.runtime.quant.bnb): it quantizes the fused
    3-D expert tensors too, which transformers' bitsandbytes integration leaves in full
    precision. Returns (model, quantization label, the helper's report)."""
    loader = _quant_loader(bits)
    if loader is None:
        raise MoetoolError(f"--load-in-{bits}bit needs moetool.runtime.quant.bnb ({bits}-bit expert quantization), "
                           "which this installation does not have")
    extra = {k: v for k, v in kwargs.items() if k not in ("dtype", "device_map")}
    result = loader(path, dtype=torch_dtype, device_map=kwargs.get("device_map"), **extra)
    report = None
    if isinstance(result, tuple):  # (model, report); a bare model is accepted too
        result, report = result[0], (result[1] if len(result) > 1 else None)
    quantization = f"bnb-{'nf4' if bits == 4 else 'int8'}"
    if isinstance(report, dict) and report.get("quantization"):
        quantization = str(report["quantization"])
    elif getattr(result, "moetool_quantization", None):
        quantization = str(result.moetool_quantization)
    return result, quantization, report


# -- sizes, device map --------------------------------------------------------------------------------
def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers as held (offloaded ones counted at their dtype)."""
    from moetool.runtime.quant.bnb import tensor_bytes

    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def _float_dtype(model) -> str:
    import torch

    counts: dict = {}
    for p in model.parameters():
        if p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return "unknown"
    best = max(counts, key=counts.get)
    return str(best).replace("torch.", "") if isinstance(best, torch.dtype) else str(best)


def _fill_load_info(loaded: LoadedModel) -> None:
    model = loaded.model
    loaded.dtype = _float_dtype(model)
    loaded.weight_bytes = module_bytes(model)
    experts_bytes = None
    if loaded.quantization != "none":  # the quantization helper knows its packed expert weights
        try:
            from moetool.runtime.quant import bnb as quant
        except ImportError:
            quant = None
        fn = getattr(quant, "expert_weight_bytes", None)
        if fn is not None:
            report = fn(model)
            if isinstance(report, dict):
                if isinstance(report.get("expert_weight_bytes"), int):
                    experts_bytes = report["expert_weight_bytes"]
                if isinstance(report.get("weight_bytes"), int):
                    loaded.weight_bytes = report["weight_bytes"]
    if experts_bytes is None:
        experts_bytes = sum(module_bytes(experts) for _, _, _, experts in _find_blocks(model, loaded.rc))
    loaded.expert_weight_bytes = int(experts_bytes)
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        loaded.device_map = {str(k): v for k, v in dmap.items()}
    else:
        devices = {str(p.device) for p in model.parameters()}
        loaded.device_map = {"": devices.pop() if len(devices) == 1 else "mixed"}


def loaded_from_model(model, tokenizer=None, name: str = "in-memory", quantization: str = "none") -> LoadedModel:
    """Wrap a transformers model already in memory (tests, benchmarks, other commands' pipelines)."""
    from moetool.families import family_for_config
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import ModelSource

    config = model.config.to_dict()
    source = ModelSource(name, "checkpoint", config, None)
    family_for_config(config)
    rc = resolve_family(source)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source=source, rc=rc, family=rc.family,
                         quantization=quantization)
    _fill_load_info(loaded)
    moe_blocks(loaded)
    return loaded


# -- finding the MoE blocks -------------------------------------------------------------------------------
def _get(root, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _find_blocks(model, rc) -> list[tuple[int, Any, Any, Any]]:
    layers = rc.moe_layers
    if not layers:
        return []
    names = dict(model.named_modules())
    for layout in rc.family.runtime_layouts:
        found = []
        for L in layers:
            path = layout["block"].replace("{L}", str(L))
            block = names.get(path)
            if block is None:  # a wrapper (e.g. a multimodal model) may nest the language model deeper
                tail = "." + path.split(".", 1)[1] if path.startswith("model.") else "." + path
                hits = [m for n, m in names.items() if n.endswith(tail)]
                block = hits[0] if len(hits) == 1 else None
            if block is None:
                break
            router = _get(block, layout["router"])
            experts = _get(block, layout["experts"])
            if router is None or experts is None:
                break
            found.append((L, block, router, experts))
        if len(found) == len(layers):
            return found
    return []


def moe_blocks(loaded: LoadedModel) -> list[tuple[int, Any, Any, Any]]:
    """(decoder layer index, block, router, experts) for every MoE layer, by the family's
    runtime layouts (the first layout whose modules exist in every MoE layer)."""
    found = _find_blocks(loaded.model, loaded.rc)
    if not found:
        tried = ", ".join(f"{lay['block']}.{lay['router']}" for lay in loaded.family.runtime_layouts)
        raise MoetoolError(
            f"{loaded.name}: cannot find the MoE blocks of this {loaded.family.name} model (tried {tried})"
        )
    return found
