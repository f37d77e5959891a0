"""A model held one decoder layer at a time: the skeleton on the meta device, the parts outside
the decoder layers (embeddings, final norm, head, rotary tables) in memory, and each layer's
weights read from the safetensors shards when the executor runs it, then freed.

``load_streamed`` builds the skeleton with transformers' own class (``with torch.device("meta")``,
which keeps fused expert parameters on meta) and a :class:`LayerReader` that knows, for every
parameter of a layer, which on-disk tensors hold it: the same name, the same name under another
of the family's runtime layouts (Mixtral's ``block_sparse_moe`` on disk, ``mlp`` in memory), or
per-expert matrices fused into transformers' 3-D ``gate_up_proj`` [E, 2I, H] (gate rows, then
up rows) and ``down_proj`` [E, H, I] (the family spec's ``proj`` of each expert tensor). A
parameter with no source on disk is an error naming it, never a random initialisation.

Tensors are read with plain file reads at the offsets of the safetensors header (no mmap: the
resident set stays one layer), and counted in ``LayerReader.bytes_read``.
"""

from __future__ import annotations

import contextlib

import os
import threading
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def decoder_layers(model, rc) -> tuple[str, Any]:
    """(prefix, ModuleList) of the decoder layers: the runtime layouts' block path up to {L}."""
    for layout in rc.family.runtime_layouts:
        prefix = layout["block"].split(".{L}")[0]
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:
            continue
        if len(mod) == rc.num_layers:
            return prefix, mod
    prefix = "model.layers"
    try:
        mod = model.get_submodule(prefix)
    except AttributeError:
        raise MoetoolError(f"cannot find the decoder layers of this {rc.family.name} model") from None
    return prefix, mod


def rebuilt_buffers(layers, model, dtype) -> list[dict[str, Any]]:
    """Per decoder layer, its buffers that are computed at construction rather than stored (a rotary
    table inside an attention compressor), built for real on the CPU: a fresh instance of the owning
    module's class from the model's config (its __init__ takes the config, and a device, only; its
    parameters stay on meta), constructed once per class under the model's dtype, its buffer checked
    against the skeleton's name, shape and dtype. A buffer that cannot be rebuilt so is a one-line error."""
    import inspect

    import torch
    from accelerate import init_empty_weights

    config = getattr(model.config, "get_text_config", lambda: model.config)()
    built: dict[type, Any] = {}
    out: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        persistent = set(layer.state_dict(keep_vars=True))
        mine: dict[str, Any] = {}
        for bname, buf in layer.named_buffers():
            if bname in persistent:
                continue
            path, _, leaf = bname.rpartition(".")
            cls = type(layer.get_submodule(path) if path else layer)
            if cls not in built:
                built[cls] = None
                params = list(inspect.signature(cls.__init__).parameters)[1:]
                if params[:1] == ["config"] and set(params[1:]) <= {"device"}:
                    old = torch.get_default_dtype()
                    try:  # as from_config(dtype=...) builds it
                        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                            torch.set_default_dtype(dtype)
                        with torch.device("cpu"), init_empty_weights(include_buffers=False):
                            built[cls] = cls(config)
                    except Exception:  # noqa: BLE001 - not buildable from the config alone: the error below
                        pass
                    finally:
                        torch.set_default_dtype(old)
            got = getattr(built[cls], "_buffers", {}).get(leaf)
            if got is None or tuple(got.shape) != tuple(buf.shape) or got.dtype != buf.dtype:
                raise MoetoolError(f"layer {i}: buffer {bname} is computed at construction, not stored, and cannot be "
                                   "rebuilt from the config; this model cannot be streamed (run it with --no-stream)")
            mine[bname] = got
        out.append(mine)
    return out


class LayerReader:
    """Which on-disk tensors make each parameter of a decoder layer, and reading them."""

    def __init__(self, path: Path, model, rc, dtype, device):
        from moetool.checkpoint.safetensors_header import read_checkpoint_headers

        self.path = Path(path)
        self.model, self.rc, self.dtype, self.device = model, rc, dtype, device
        self.entries = {e.name: e for e in read_checkpoint_headers(self.path)}
        self.prefix, self.layers = decoder_layers(model, rc)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._prefetch: dict[int, Any] = {}
        self.quant_bits: int | None = None  # 4 / 8: quantize each layer's experts as it is read (moetool.runtime.quant.bnb)
        self.quant_report: dict | None = None
        self._quantized: dict[int, dict] = {}
        from moetool.runtime.hf_compat import disk_name_function

        self._disk_name = disk_name_function(model)  # transformers' own renamings, reversed
        self._loader_sources: dict | None = None  # transformers' own renamings and conversions, forward (lazily)
        self.rebuilt = rebuilt_buffers(self.layers, model, dtype)  # per layer: buffers computed at construction

    def loader_sources(self) -> dict[str, tuple]:
        """{parameter name: (converter or None, first target, [(pattern, disk name), ...])}: what transformers' loader
        makes each parameter from (moetool.runtime.hf_compat.checkpoint_sources), computed once."""
        if self._loader_sources is None:
            from moetool.runtime.hf_compat import checkpoint_sources

            self._loader_sources = checkpoint_sources(self.model, self.entries)
        return self._loader_sources

    def entry_for(self, target: str, loader: bool = True):
        """The on-disk tensor that holds parameter TARGET as it is (renamed at most), or None: the same
        name, another runtime layout's, transformers' renamings reversed, and (LOADER) forward."""
        src = self.entries.get(target)
        if src is not None:
            return src
        for alt in self._alternatives(target) + [self._disk_name(target)]:
            if alt in self.entries:
                return self.entries[alt]
        return self._renamed_on_load(target) if loader else None

    def _renamed_on_load(self, target: str):
        """The one on-disk tensor transformers' loader renames (without converting) into TARGET, or None."""
        conv, _, pairs = self.loader_sources().get(target, (None, None, []))
        if conv is None and len(pairs) == 1:
            return self.entries[pairs[0][1]]
        return None

    # -- the plan: target parameter -> how to build it from disk --------------------------------------
    def _alternatives(self, name: str) -> list[str]:
        """NAME under the family's other runtime layouts (block, router and experts paths)."""
        import re

        out = []
        lays = self.rc.family.runtime_layouts
        lays = [lay for lay in lays if "{L}" in lay["block"]]  # a layout of one fixed layer renames nothing
        for mem in lays:
            rx = "^" + re.escape(mem["block"]).replace(r"\{L\}", r"(\d+)") + r"\.(.+)$"
            m = re.match(rx, name)
            if not m:
                continue
            num, tail = m.group(1), m.group(2)
            for disk in lays:
                if disk is mem:
                    continue
                t = tail
                for key in ("router", "experts"):
                    if t.startswith(mem[key] + ".") and mem[key] != disk[key]:
                        t = disk[key] + t[len(mem[key]):]
                out.append(disk["block"].replace("{L}", num) + "." + t)
        return out

    def _expert_entries(self, layer: int) -> dict[str, dict[int, Any]]:
        fam = self.rc.family
        groups: dict[str, dict[int, Any]] = {}
        for name, ent in self.entries.items():
            m = fam.classify(name)
            if m is None or m.layer != layer or m.expert is None or m.role != "routed_experts":
                continue
            spec = next((t for g in fam.spec["tensors"].values() for t in g if t["name"] == m.template), {})
            proj = spec.get("proj")
            if proj:
                groups.setdefault(proj, {})[m.expert] = ent
        return groups

    def plan(self, layer: int) -> dict[str, tuple]:
        """{parameter name inside the layer: ("copy", entry) | ("fuse", [entries...], kind) |
        ("convert", converter, first target, [(pattern, entry), ...])}."""
        module = self.layers[layer]
        full = f"{self.prefix}.{layer}."
        plan: dict[str, tuple] = {}
        experts = None
        state = dict(module.state_dict(keep_vars=True))
        for name, tensor in state.items():
            target = full + name
            src = self.entry_for(target, loader=False)
            if src is not None:
                plan[name] = ("copy", src)
                continue
            leaf = name.rsplit(".", 1)[-1]
            # a fused 3-D experts tensor named after its projections: gate_up_proj (gate rows, then up rows),
            # up_proj, down_proj, ... from each expert's matrices (the family spec's proj of each expert tensor)
            projs = leaf[:-len("_proj")].split("_") if leaf.endswith("_proj") else []
            if projs and tensor.dim() == 3:
                if experts is None:
                    experts = self._expert_entries(layer)
                E = tensor.shape[0]
                if all(len(experts.get(p, {})) == E for p in projs):
                    plan[name] = ("fuse", [tuple(experts[p][e] for p in projs) for e in range(E)], leaf)
                    continue
                routed = int(self.rc.num_experts)
                if E == self.rc.router_width > routed and all(len(experts.get(p, {})) == routed for p in projs):
                    # rows transformers allocates for zero-computation experts (never used), not on disk: zeros
                    plan[name] = ("fuse", [tuple(experts[p][e] for p in projs) for e in range(routed)]
                                  + [None] * (E - routed), leaf)
                    continue
            src = self._renamed_on_load(target)
            if src is not None:
                plan[name] = ("copy", src)
                continue
            conv, first, pairs = self.loader_sources().get(target, (None, None, []))
            if conv is not None:  # transformers' own conversion on load (Concatenate, MergeModulelist, ...)
                plan[name] = ("convert", conv, first, [(p, self.entries[k]) for p, k in pairs])
                continue
            raise MoetoolError(f"{self.path}: no tensor for {target} in the checkpoint (looked for "
                               f"{', '.join([target] + self._alternatives(target))}); it is incomplete or laid out "
                               "in a way moetool cannot stream")
        return plan

    # -- reading ---------------------------------------------------------------------------------------------------
    def _read(self, ent, out=None):
        """ENT's tensor, read into OUT (a contiguous tensor of its dtype and size) when given."""
        import torch

        if ent.dtype not in _DTYPES:
            raise MoetoolError(f"{ent.name}: {ent.dtype} tensors cannot be streamed (plain float weights only)")
        dtype = getattr(torch, _DTYPES[ent.dtype])
        if out is not None and out.dtype == dtype and out.numel() == ent.numel and out.is_contiguous():
            t = out
        else:
            t = torch.empty(ent.shape, dtype=dtype)
        view = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
        if view is not None:
            fd = os.open(self.path / ent.file, os.O_RDONLY)
            try:
                got, mv = 0, memoryview(view)
                while got < ent.nbytes:
                    n = os.preadv(fd, [mv[got:]], ent.offset + got)
                    if n <= 0:
                        raise MoetoolError(f"{self.path / ent.file}: truncated while reading {ent.name}")
                    got += n
            finally:
                os.close(fd)
        with self._lock:
            self.bytes_read += ent.nbytes
        return t

    def read(self, layer: int) -> dict[str, Any]:
        """Every parameter and persistent buffer of LAYER as CPU tensors in the model's dtype."""
        import torch

        module = self.layers[layer]
        state = dict(module.state_dict(keep_vars=True))
        out = {}
        converted: dict[str, Any] = {}  # a conversion's outputs (a Chunk gives several) until each is taken
        done: set[str] = set()
        for name, (kind, src, *rest) in self.plan(layer).items():
            want = state[name]
            dtype = want.dtype if want.dtype.is_floating_point else None
            if kind == "copy":
                t = self._read(src)
            elif kind == "convert":
                first, pairs = rest
                if first not in done:
                    done.add(first)
                    from moetool.runtime.hf_compat import convert_checkpoint_tensors

                    read = [(p, self._read(e)) for p, e in pairs]
                    if dtype is not None:  # cast before converting, as transformers' loader does
                        read = [(p, t.to(dtype) if t.dtype.is_floating_point else t) for p, t in read]
                    converted.update(convert_checkpoint_tensors(self.model, src, first, read))
                t = converted.pop(f"{self.prefix}.{layer}.{name}", None)
                if t is None:
                    raise MoetoolError(f"{self.prefix}.{layer}.{name}: transformers' conversion of "
                                       f"{', '.join(e.name for _, e in pairs)} did not give it")
            else:  # fused in place: each expert's matrices read straight into their slice
                first = src[0]
                parts = [e.shape for e in first]
                rows = sum(p[0] for p in parts)
                t = torch.empty((len(src), rows, *parts[0][1:]), dtype=getattr(torch, _DTYPES[first[0].dtype]))
                for e, ents in enumerate(src):
                    if ents is None:  # a zero-computation expert's rows: never used
                        t[e].zero_()
                        continue
                    at = 0
                    for ent in ents:
                        n = ent.shape[0]
                        piece = self._read(ent, t[e, at:at + n])
                        if piece is not None and piece.data_ptr() != t[e, at:at + n].data_ptr():
                            t[e, at:at + n].copy_(piece)
                        at += n
            if tuple(t.shape) != tuple(want.shape):
                if t.dim() == 3 and tuple(t.transpose(1, 2).shape) == tuple(want.shape):
                    t = t.transpose(1, 2).contiguous()
                else:
                    raise MoetoolError(f"{self.prefix}.{layer}.{name}: {list(t.shape)} on disk, the model expects "
                                       f"{list(want.shape)}")
            out[name] = t.to(dtype) if dtype is not None and t.dtype != dtype else t
        return out

    def prefetch(self, layer: int) -> None:
        """Start reading LAYER in a background thread (the next layer while this one computes)."""
        if layer >= len(self.layers) or layer in self._prefetch:
            return
        box: dict = {}

        def work():
            try:
                tensors = self.read(layer)
                if self.device.type == "cuda":
                    tensors = {k: v.pin_memory() for k, v in tensors.items()}
                box["tensors"] = tensors
            except BaseException as exc:  # handed to the main thread
                box["error"] = exc

        th = threading.Thread(target=work, daemon=True)
        th.start()
        self._prefetch[layer] = (th, box)

    def materialise(self, layer: int) -> None:
        """Fill LAYER's parameters (prefetched if it was)."""
        job = self._prefetch.pop(layer, None)
        if job is not None:
            th, box = job
            th.join()
            if "error" in box:
                raise box["error"]
            tensors = box["tensors"]
        else:
            tensors = self.read(layer)
        if self.device.type != "cpu":
            tensors = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
        module = self.layers[layer]
        module.load_state_dict(tensors, strict=True, assign=True)
        del tensors
        for bname, t in self.rebuilt[layer].items():
            path, _, leaf = bname.rpartition(".")
            (module.get_submodule(path) if path else module).register_buffer(leaf, t.to(self.device, copy=True),
                                                                             persistent=False)
        if self.quant_bits:
            self._quantize(layer, module)

    def _quantize(self, layer: int, module) -> None:
        """The layer's fused experts to 4-bit / int8 codes (moetool.runtime.quant.bnb), as --load-in-4bit does."""
        from moetool.runtime.quant import bnb as quant

        self._quantized[layer] = {f"{m}.{w}": (tuple(getattr(mod, w).shape), getattr(mod, w).dtype)
                                  for m, mod, ws in quant.expert_modules(module) for w in ws}
        rep = quant.quantize_experts(module, bits=self.quant_bits)
        if self.quant_report is None:
            self.quant_report = {k: rep.get(k) for k in ("quantization", "bits", "quant_type", "forward")}
            self.quant_report.update(bytes_before=0, bytes_after=0)
        self.quant_report["bytes_before"] += rep.get("bytes_before", 0)
        self.quant_report["bytes_after"] += rep.get("bytes_after", 0)

    def free(self, layer: int) -> None:
        import torch

        module = self.layers[layer]
        shapes = self._quantized.pop(layer, None)
        if shapes is not None:  # back to plain meta parameters, so the layer can be read again
            from moetool.runtime.quant import bnb as quant

            for mname, mod, wnames in quant.expert_modules(module):
                for w in wnames:
                    if w in mod._modules:
                        del mod._modules[w]
                        shape, dtype = shapes[f"{mname}.{w}"]
                        mod.register_parameter(w, torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                                                     requires_grad=False))
                quant._unforce_eager(mod)
        module.to_empty(device="meta")


@contextlib.contextmanager
def layer_in_memory(loaded, layer: int):
    """LAYER's weights readable inside the block: read from disk (and freed after) when LOADED is
    streamed; a resident model's are already there."""
    reader = getattr(loaded, "layer_reader", None)
    if reader is None:
        yield
        return
    reader.materialise(layer)
    try:
        yield
    finally:
        reader.free(layer)


def load_streamed(source, rc, dtype, device_map=None, trust_remote_code: bool = False):
    """(model skeleton with everything but the decoder layers in memory, LayerReader)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(source.path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise MoetoolError(f"{source.name}: cannot read its config ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.replace("torch.", ""))
    device = _stream_device(device_map)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    reader = LayerReader(source.path, model, rc, dtype, device)
    _materialise_outside_layers(model, reader, config, device)
    return model, reader


def _stream_device(device_map):
    import torch

    dm = device_map if isinstance(device_map, str) else None
    if dm and dm.startswith("cuda"):
        return torch.device(dm)
    if dm in (None, "auto", "balanced", "sequential", "balanced_low_0") and torch.cuda.is_available():
        return torch.device("cuda:0")
    return torch.device("cpu")


def _materialise_outside_layers(model, reader: LayerReader, config, device) -> None:
    """Embeddings, final norm, head (tied or not) and modules whose buffers are computed at
    construction (rotary tables: rebuilt with the model's config; such buffers beside weights read
    from disk: by transformers' ``_init_weights``, as its loader does) go to DEVICE."""
    import torch

    prefix = reader.prefix + "."
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for mname, module in list(model.named_modules()):
        if mname == reader.prefix or mname.startswith(prefix):
            continue
        own_p = dict(module.named_parameters(recurse=False))
        own_b = dict(module.named_buffers(recurse=False))
        if not own_p and not own_b:
            continue
        persistent = set(module.state_dict(keep_vars=True)) & set(own_b)
        if own_b and not own_p and not persistent:
            with torch.device(device):
                fresh = type(module)(config=getattr(model.config, "get_text_config", lambda: model.config)())
            parent, _, leaf = mname.rpartition(".")
            (model.get_submodule(parent) if parent else model).__setattr__(leaf, fresh)
            continue
        if set(own_b) - persistent:  # computed at construction beside loaded weights (Gemma 4's embedding scale)
            from moetool.runtime.hf_compat import init_computed_buffers

            try:
                init_computed_buffers(model, module, device, recurse=False)
            except MoetoolError as exc:
                raise MoetoolError(f"{reader.path}: cannot stream this model: {mname}: {exc}") from None
        state = {}
        for name in list(own_p) + sorted(persistent):
            full = f"{mname}.{name}" if mname else name
            head = tied and module is model.get_output_embeddings()  # the input embeddings' weight, tied below
            ent = reader.entry_for(full, loader=not head)  # (no index of transformers' conversions for a tied head)
            if ent is None:
                if head:
                    continue
                raise MoetoolError(f"{reader.path}: no tensor for {full} in the checkpoint")
            want = own_p.get(name, own_b.get(name))
            t = reader._read(ent)
            state[name] = t.to(device=device, dtype=want.dtype if want.dtype.is_floating_point else t.dtype)
        if state:
            module.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                if p.device.type == "meta" and not n.startswith(prefix)]
    if leftover:
        raise MoetoolError(f"{reader.path}: cannot place {leftover[0]} outside the decoder layers for streaming")
