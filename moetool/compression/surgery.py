"""Checkpoint surgery on safetensors files, streaming: the machinery `prune` and `merge-experts`
share.

A surgery is a :class:`SurgeryPlan`: for every MoE layer, the list of output experts, each a
weighted combination of input experts (pruning: one source with weight 1; merging: a group
with usage weights, optionally with a neuron permutation per member). Everything else follows
from the family spec (``moetool/families/*.json``):

- per-expert tensors (``expert`` templates, ``{E}`` in the name) are renamed to the output
  expert's index (pruning: the bytes are copied unchanged) or combined (merging);
- tensors with one row per routed expert (``"expert_rows": true``: router weight, DeepSeek's
  ``e_score_correction_bias``, gpt-oss router bias) and fused expert tensors
  (``"fused": true``, first dim = expert) keep the rows of the output experts, in order
  (merging: the same weighted combination of rows); the expert dimension may come after
  dimensions of size 1 (ERNIE 4.5's ``[1, E]`` bias), which lays the bytes out as ``[E]`` does;
- companions of per-expert tensors that the spec does not name (quantization scales such as
  ``...gate_proj.weight_scale_inv``) follow their expert;
- every other tensor (attention, norms, embeddings, shared experts, dense layers) is copied
  byte for byte;
- DeepSeek multi-token-prediction layers (beyond ``num_hidden_layers``; transformers does not
  load them) are dropped and ``num_nextn_predict_layers`` set to 0.

Streaming: output shard i holds what came from input shard i. Its header is computed before
any data is read (every output name, dtype and shape is known from the plan), then each tensor
is produced and written in turn: copied tensors and kept rows go from file to file with
``os.copy_file_range`` (no Python buffer at all), combined tensors are computed from the
group's source tensors, read as needed from whichever shard holds them. Peak memory is one
merged group, never a shard and never the model.

Safety: the input is only read. The output is written to a temporary directory beside
``--out`` and renamed into place when complete (``os.replace``); an existing ``--out`` is
refused unless ``force``; any failure (an exception, Ctrl-C, SIGTERM, a full disk) removes the
temporary directory, so nothing complete-looking is ever left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moetool.checkpoint.checks import check_complete, pickled_files
from moetool.errors import MoetoolError
from moetool.families.resolve import config_keys, field_keys_to_write
from moetool.checkpoint.outdir import MARKER, atomic_output_dir, check_disk_space, check_output, fsync_dir, marker
from moetool.checkpoint.safetensors_header import DTYPE_BYTES, HeaderEntry, checkpoint_files, read_header

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
NOT_COPIED = {INDEX_NAME, "config.json", "README.md", "pytorch_model.bin.index.json", MARKER}
COPY_CHUNK = 64 * 2**20
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# -- the plan ---------------------------------------------------------------------------------------
@dataclass
class OutExpert:
    """One expert of the output: a weighted combination of input experts of the same layer.

    ``perms[i]`` (merging with alignment) reorders the hidden neurons of source i before
    averaging: row n of the aligned gate/up projection is row ``perms[i][n]`` of the source.
    """

    sources: list[int]
    weights: list[float] = field(default_factory=lambda: [1.0])
    perms: list | None = None
    row_weights: list[float] | None = None  # router rows (and biases): default = weights

    @property
    def anchor(self) -> int:
        return self.sources[0]

    @property
    def is_copy(self) -> bool:
        return (len(self.sources) == 1 and self.weights[0] == 1.0 and self.perms is None
                and (self.row_weights is None or self.row_weights[0] == 1.0))


@dataclass
class SurgeryPlan:
    layers: dict[int, list[OutExpert]]  # MoE decoder layer -> output experts (index = new id)
    config_updates: dict[str, Any]  # language-model config key -> new value
    method: str  # "prune" | "merge-experts"
    details: dict = field(default_factory=dict)  # what the card records about the method

    @property
    def num_experts(self) -> int:
        counts = {len(v) for v in self.layers.values()}
        if len(counts) != 1:
            raise MoetoolError(f"every MoE layer must keep the same number of experts (got {sorted(counts)})")
        return counts.pop()


# -- reading the input ------------------------------------------------------------------------------------
class Checkpoint:
    """A local safetensors checkpoint: config, family, and where every tensor's bytes are."""

    def __init__(self, model: str):
        from moetool.families.resolve import resolve_family
        from moetool.checkpoint.source import read_json, resolve

        source = resolve(model)
        if source.kind != "checkpoint" or source.path is None:
            raise MoetoolError(f"{model}: a {source.kind} has no weights; give a checkpoint directory")
        self.name = model
        self.path = Path(source.path)
        self.source = source
        self.rc = resolve_family(source)
        self.family = self.rc.family
        refusal = (self.family.spec.get("surgery") or {}).get("unsupported")
        if refusal:  # from the family spec (curated) or found while deriving it
            raise MoetoolError(f"{model}: moetool cannot cut experts out of a {self.family.name} checkpoint safely: "
                               f"{refusal}")
        self.raw_config = read_json(self.path / "config.json")
        files = checkpoint_files(self.path)
        if not files:
            pickled = pickled_files(self.path)
            if pickled:
                raise MoetoolError(f"{model}: only pickled weights ({pickled[0]}); checkpoint surgery reads and "
                                   "writes safetensors only (it never unpickles weights): convert it first")
            raise MoetoolError(f"{model}: no safetensors files in this checkpoint")
        self.files = files
        self.entries: dict[str, HeaderEntry] = {}
        self.file_entries: dict[Path, list[HeaderEntry]] = {}
        self.file_metadata: dict[Path, dict] = {}
        for path in files:
            header, metadata = read_header(path)  # validates sizes and offsets
            entries = []
            for ent in header:
                if ent.name in self.entries:
                    raise MoetoolError(f"{model}: tensor {ent.name} is in both {self.entries[ent.name].file} and "
                                       f"{path.name}")
                self.entries[ent.name] = ent
                entries.append(ent)
            entries.sort(key=lambda x: x.offset)
            self.file_entries[path] = entries
            self.file_metadata[path] = metadata
        check_complete(model, self.rc, self.entries)  # before any plan: never write a model with holes
        self._fds: dict[Path, int] = {}

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def largest_shard(self) -> int:
        return max(p.stat().st_size for p in self.files)

    def fd(self, file: str | Path) -> int:
        """An open read-only descriptor of FILE (a name in the checkpoint, or a path), kept open."""
        path = self.path / file
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, name: str, rows: tuple[int, int] | None = None, buffer: bytearray | None = None,
             axis: int = 0):
        """The tensor NAME as a torch tensor in its own dtype (``rows``: only rows a..b of
        dimension AXIS, which only dimensions of size 1 may precede). With BUFFER (large
        enough), the bytes are read into it and the tensor is a view of it (valid until the
        buffer is reused): no allocation per read."""
        import torch

        ent = self.entries[name]
        dtype = torch_dtype(ent.dtype)
        begin, nbytes, shape = ent.offset, ent.nbytes, ent.shape
        if rows is not None:
            if any(n != 1 for n in ent.shape[:axis]):
                raise MoetoolError(f"internal: {name}: rows of dimension {axis} of {list(ent.shape)} are not contiguous")
            per_row = ent.nbytes // ent.shape[axis]
            begin += rows[0] * per_row
            nbytes = (rows[1] - rows[0]) * per_row
            shape = ent.shape[:axis] + (rows[1] - rows[0],) + ent.shape[axis + 1:]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if buffer is None:
            buffer = bytearray(nbytes)
        elif len(buffer) < nbytes:
            raise ValueError("buffer too small")
        view = memoryview(buffer)[:nbytes]
        fd, got = self.fd(ent.file), 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], begin + got)
            if n <= 0:
                raise MoetoolError(f"{self.path / ent.file}: truncated while reading {name}")
            got += n
        return torch.frombuffer(buffer, dtype=dtype, count=nbytes // torch.empty((), dtype=dtype).element_size()
                                ).reshape(shape)

    def lm_config(self, config: dict) -> dict:
        """The dict inside CONFIG that holds the language model's keys (text_config of a wrapper)."""
        if self.source.wrapper and isinstance(config.get("text_config"), dict):
            return config["text_config"]
        return config


def torch_dtype(dtype: str):
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    if dtype not in table:
        raise MoetoolError(f"tensors of dtype {dtype} cannot be computed on (only copied)")
    return table[dtype]


# -- what each tensor is ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    kind: str  # "expert" | "rows" | "fused" | "mtp" | "plain"
    layer: int | None = None
    expert: int | None = None
    template: str | None = None  # output name template ({E} for experts)
    proj: str | None = None  # gate | up | down for expert matrices


def _spec_index(family) -> dict[str, dict]:
    out = {}
    for group in family.spec["tensors"].values():
        for spec in group:
            out[spec["name"]] = spec
    for spec in family.spec.get("aliases", []):
        out.setdefault(spec["name"], {**spec, "alias": True})
    return out


def classify(ckpt: Checkpoint, name: str) -> Kind:
    """What NAME is for surgery (see the module docstring)."""
    fam, rc = ckpt.family, ckpt.rc
    if fam.is_mtp_name(name):
        return Kind("mtp", _layer_of(name))
    specs = getattr(ckpt, "_specs", None)
    if specs is None:
        specs = ckpt._specs = _spec_index(fam)
    m = fam.classify(name)
    template = m.template if m is not None else None
    if m is None:
        # a companion of a per-expert tensor the spec does not name (...gate_proj.weight_scale_inv)
        base, _, last = name.rpartition(".")
        cand = fam.classify(base + ".weight") if base and last != "weight" else None
        if cand is not None and cand.expert is not None:
            m, template = cand, cand.template.rpartition(".")[0] + "." + last
    if m is None:
        # a companion of a fused expert tensor (gpt-oss MXFP4 ..._blocks / ..._scales)
        for spec_name, spec in specs.items():
            if spec.get("fused") and "{L}" in spec_name:
                rx = re.escape(spec_name).replace(r"\{L\}", r"(?P<L>\d+)") + r"_[A-Za-z0-9_]+$"
                mm = re.match(rx, name)
                if mm:
                    layer = int(mm.group("L"))
                    return Kind("mtp", layer) if layer >= rc.num_layers else Kind("fused", layer, template=name)
        layer = _layer_of(name)
        if layer is not None and layer >= rc.num_layers and rc.mtp_layers:
            return Kind("mtp", layer)
        return Kind("plain")
    if m.layer is not None and m.layer >= rc.num_layers:
        if not rc.mtp_layers:
            raise MoetoolError(f"{name}: layer {m.layer} is beyond the config's {rc.num_layers} layers")
        return Kind("mtp", m.layer)
    spec = specs.get(m.template, {})
    if m.expert is not None:
        return Kind("expert", m.layer, m.expert, template.replace("{L}", str(m.layer)), spec.get("proj"))
    if m.layer is not None and rc.is_moe_layer(m.layer):
        if spec.get("expert_rows") or (spec.get("alias") and m.role == "router"):
            return Kind("rows", m.layer, template=name)
        if spec.get("fused") or (m.role == "routed_experts" and "{E}" not in m.template):
            return Kind("fused", m.layer, template=name)
    return Kind("plain", m.layer)


_LAYER_RX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_RX.search(name)
    return int(m.group(1)) if m else None


# -- config -------------------------------------------------------------------------------------------------
def set_config_field(config: dict, family, field_name: str, value) -> list[str]:
    """Set FIELD to VALUE under every key that holds it in CONFIG (the first key when none
    does); returns the keys written."""
    keys = field_keys_to_write(config, family, field_name)
    for k in keys:
        config[k] = value
    return keys


def grouped_routing(rc) -> tuple[int, int, int] | None:
    """(n_group, topk_group, min experts per group) when RC routes group-limited, else None.
    From the family spec's ``grouped_routing``: ``when`` (expression) and ``min_per_group``."""
    spec = rc.family.spec.get("grouped_routing")
    if not spec:
        return None
    from moetool.families.expr import evaluate

    if not evaluate(spec.get("when", "n_group > 1"), rc.names):
        return None
    n_group = int(rc.fields.get("n_group") or 1)
    topk_group = int(rc.fields.get("topk_group") or 1)
    if n_group <= 1:
        return None
    return n_group, topk_group, int(spec.get("min_per_group", 1))


# -- writing ---------------------------------------------------------------------------------------------------
@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Callable[[int], None]  # writes exactly nbytes at the fd's current position
    source_bytes: int = 0  # input bytes this tensor accounts for (progress)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int) -> None:
    """Copy NBYTES at OFFSET of SRC_FD to DST_FD's current position: in the kernel where the
    filesystem allows (copy_file_range), else through a bounded buffer."""
    global _COPY_FILE_RANGE
    left, pos = nbytes, offset
    if _COPY_FILE_RANGE:
        try:
            while left:
                n = os.copy_file_range(src_fd, dst_fd, min(left, 1 << 30), pos)
                if n == 0:
                    raise MoetoolError("input file ended early while copying")
                left -= n
                pos += n
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            _COPY_FILE_RANGE = False
    while left:
        chunk = os.pread(src_fd, min(left, COPY_CHUNK), pos)
        if not chunk:
            raise MoetoolError("input file ended early while copying")
        _write_all(dst_fd, chunk)
        left -= len(chunk)
        pos += len(chunk)


def write_tensor_bytes(fd: int, tensor) -> None:
    """Write a torch tensor's bytes (C order) to FD."""
    t = tensor.contiguous()
    if t.numel() == 0:
        return
    import torch

    _write_all(fd, t.reshape(-1).view(torch.uint8).numpy())


def _dtype_align(dtype: str) -> int:
    b = DTYPE_BYTES.get(dtype, 1)
    return max(1, int(b)) if b >= 1 else 1


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict | None = None,
                      on_tensor: Callable[[OutTensor], None] | None = None) -> int:
    """Write one safetensors file: the header first (computed from names, dtypes and shapes),
    then each tensor's bytes as its writer produces them; fsync at the end. Tensors are laid
    out widest dtype first so every tensor starts aligned to its element size."""
    order = sorted(tensors, key=lambda t: -_dtype_align(t.dtype))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw)
        start = 8 + len(raw)
        for t in order:
            before = os.lseek(fd, 0, os.SEEK_CUR)
            t.write(fd)
            wrote = os.lseek(fd, 0, os.SEEK_CUR) - before
            if wrote != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {wrote} bytes, expected {t.nbytes}")
            if on_tensor:
                on_tensor(t)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        if size != start + offset:
            raise RuntimeError(f"{path.name}: wrote {size} bytes, expected {start + offset}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


# -- atomic output directory: moetool.checkpoint.outdir (shared with distill) -----------------------------------------------
_fsync_dir = fsync_dir


# -- the surgery ---------------------------------------------------------------------------------------------------
class _Combiner:
    """Computes merged tensors: a float32 accumulator per output tensor, the sources read one at
    a time into one reusable buffer (peak memory: accumulator + one source + the buffer)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.buffer = bytearray(0)

    def _read(self, name: str, rows=None, axis: int = 0):
        ent = self.ckpt.entries[name]
        need = ent.nbytes if rows is None else (rows[1] - rows[0]) * (ent.nbytes // ent.shape[axis])
        if len(self.buffer) < need:
            self.buffer = bytearray(need)
        return self.ckpt.read(name, rows=rows, buffer=self.buffer, axis=axis)

    def expert_tensor(self, template: str, out: OutExpert, proj: str | None, dtype: str):
        import torch

        acc = scratch = None
        for i, (src, w) in enumerate(zip(out.sources, out.weights)):
            t = self._read(template.replace("{E}", str(src)))
            if out.perms is not None and out.perms[i] is not None:
                perm = torch.as_tensor(out.perms[i], dtype=torch.long)
                if proj in ("gate", "up"):
                    t = t.index_select(0, perm)
                elif proj == "down":
                    t = t.index_select(1, perm)
                else:
                    raise MoetoolError(f"cannot align {template}: the family spec gives it no proj (gate/up/down)")
            if acc is None:  # same-dtype kernels: mixed bf16/f32 arithmetic is several times slower
                acc = torch.empty(t.shape, dtype=torch.float32)
                acc.copy_(t)
                acc.mul_(w)
            else:
                if scratch is None:
                    scratch = torch.empty(t.shape, dtype=torch.float32)
                scratch.copy_(t)
                acc.add_(scratch, alpha=w)
        return acc.to(torch_dtype(dtype))

    def rows(self, name: str, outs: list[OutExpert], dtype: str, axis: int = 0):
        import torch

        pieces = []
        for out in outs:
            acc = None
            for src, w in zip(out.sources, out.row_weights or out.weights):
                t = self._read(name, rows=(src, src + 1), axis=axis).to(torch.float32, copy=True)  # not a view of the buffer
                acc = t.mul_(w) if acc is None else acc.add_(t, alpha=w)
            pieces.append(acc)
        return torch.cat(pieces, dim=axis).to(torch_dtype(dtype))


def _check_plan(ckpt: Checkpoint, plan: SurgeryPlan) -> None:
    rc = ckpt.rc
    if sorted(plan.layers) != list(rc.moe_layers):
        raise MoetoolError(f"internal: plan covers layers {sorted(plan.layers)}, the model's MoE layers are {rc.moe_layers}")
    E = rc.num_experts
    for L, outs in plan.layers.items():
        if not outs:
            raise MoetoolError(f"layer {L}: no experts left")
        seen: set[int] = set()
        for o in outs:
            if len(o.sources) != len(o.weights) or not o.sources:
                raise MoetoolError(f"internal: layer {L}: malformed output expert {o}")
            for s in o.sources:
                if not 0 <= s < E:
                    raise MoetoolError(f"internal: layer {L}: expert {s} is not in 0..{E - 1}")
                if s in seen:
                    raise MoetoolError(f"internal: layer {L}: expert {s} used twice")
                seen.add(s)


def _plan_outputs(ckpt: Checkpoint, plan: SurgeryPlan) -> tuple[list[tuple[Path, list[OutTensor]]], dict]:
    """Per input shard, the output tensors (with writers) it gives rise to."""
    combiner = _Combiner(ckpt)
    merging = any(not o.is_copy for outs in plan.layers.values() for o in outs)
    # where each merged expert's tensors are written: beside its anchor's tensors
    shards: list[tuple[Path, list[OutTensor]]] = []
    stats = {"copied": 0, "renamed": 0, "rows": 0, "merged": 0, "dropped": 0, "mtp_dropped": 0, "unclassified": 0}
    needed_expert_names: set[str] = set()
    for path in ckpt.files:
        outs: list[OutTensor] = []
        for ent in ckpt.file_entries[path]:
            kind = classify(ckpt, ent.name)
            if kind.kind == "mtp":
                stats["mtp_dropped"] += 1
                continue
            if kind.kind == "plain":
                outs.append(_copy_tensor(ckpt, ent, ent.name))
                stats["copied"] += 1
                if ckpt.family.classify(ent.name) is None:
                    stats["unclassified"] += 1
                continue
            layer_plan = plan.layers.get(kind.layer)
            if layer_plan is None:
                raise MoetoolError(f"{ent.name}: an expert tensor of layer {kind.layer}, which is not a MoE layer of this config")
            zero = ckpt.rc.zero_experts
            if kind.kind == "expert" and kind.expert >= ckpt.rc.num_experts:
                # a zero-computation expert's rows (LongCat): kept, numbered after the output's routed experts
                if kind.expert >= ckpt.rc.router_width:
                    raise MoetoolError(f"{ent.name}: expert {kind.expert} is beyond the config's "
                                       f"{ckpt.rc.router_width} router rows")
                out_name = kind.template.replace("{E}", str(len(layer_plan) + kind.expert - ckpt.rc.num_experts))
                outs.append(_copy_tensor(ckpt, ent, out_name))
                stats["renamed"] += 1
                continue
            if kind.kind == "expert":
                for j, o in enumerate(layer_plan):
                    if o.anchor != kind.expert:
                        continue
                    out_name = kind.template.replace("{E}", str(j))
                    for s in o.sources:
                        needed_expert_names.add(kind.template.replace("{E}", str(s)))
                    if o.is_copy:
                        outs.append(_copy_tensor(ckpt, ent, out_name))
                        stats["renamed" if j != kind.expert else "copied"] += 1
                    else:
                        _require_float(ent)
                        outs.append(_merged_tensor(combiner, ent, out_name, kind, o))
                        stats["merged"] += 1
                    break
                else:
                    if not any(kind.expert in o.sources for o in layer_plan):
                        stats["dropped"] += 1
                continue
            # rows / fused: one row per input expert (dim 0, or after dimensions of size 1); a router that
            # also scores zero-computation experts has their rows after the routed ones: kept, in order
            axis = expert_axis(ent.shape, ckpt.rc.num_experts)
            if axis is None and zero:
                axis = expert_axis(ent.shape, ckpt.rc.router_width)
                layer_plan = layer_plan + [OutExpert([ckpt.rc.num_experts + z]) for z in range(zero)]
            if axis is None:
                raise MoetoolError(f"{ent.name}: expected {ckpt.rc.num_experts} rows (one per expert), "
                                   f"shape is {list(ent.shape)}")
            if all(o.is_copy for o in layer_plan):
                outs.append(_row_copy_tensor(ckpt, ent, [o.anchor for o in layer_plan], axis))
            else:
                _require_float(ent)
                outs.append(_row_merge_tensor(combiner, ent, layer_plan, axis))
            stats["rows"] += 1
        shards.append((path, outs))
    missing = sorted(n for n in needed_expert_names if n not in ckpt.entries)
    if missing:
        raise MoetoolError(f"{ckpt.name}: {missing[0]} is missing from the checkpoint ({len(missing)} expert tensors missing)")
    if merging:
        stats["merged_groups"] = sum(1 for outs in plan.layers.values() for o in outs if not o.is_copy)
    return shards, stats


def _require_float(ent: HeaderEntry) -> None:
    if ent.dtype not in FLOAT_DTYPES:
        raise MoetoolError(f"{ent.name} is {ent.dtype}: merging averages weights and needs float tensors "
                           "(dequantize the checkpoint first)")


def _copy_tensor(ckpt: Checkpoint, ent: HeaderEntry, out_name: str) -> OutTensor:
    def write(fd: int) -> None:
        copy_range(ckpt.fd(ent.file), fd, ent.offset, ent.nbytes)

    return OutTensor(out_name, ent.dtype, ent.shape, ent.nbytes, write, ent.nbytes)


def expert_axis(shape, num_experts: int) -> int | None:
    """The dimension of SHAPE with one entry per expert: the first one that is not 1, if it
    has NUM_EXPERTS entries (a [1, E] tensor holds its bytes as an [E] one does), else None."""
    for d, n in enumerate(shape):
        if n != 1:
            return d if n == num_experts else None
    return None


def _row_copy_tensor(ckpt: Checkpoint, ent: HeaderEntry, rows: list[int], axis: int = 0) -> OutTensor:
    per_row = ent.nbytes // ent.shape[axis]

    def write(fd: int) -> None:
        src = ckpt.fd(ent.file)
        # consecutive rows in one copy
        i = 0
        while i < len(rows):
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
                j += 1
            copy_range(src, fd, ent.offset + rows[i] * per_row, (j - i + 1) * per_row)
            i = j + 1

    shape = ent.shape[:axis] + (len(rows),) + ent.shape[axis + 1:]
    return OutTensor(ent.name, ent.dtype, shape, per_row * len(rows), write, ent.nbytes)


def _row_merge_tensor(combiner: _Combiner, ent: HeaderEntry, outs: list[OutExpert], axis: int = 0) -> OutTensor:
    per_row = ent.nbytes // ent.shape[axis]

    def write(fd: int) -> None:
        write_tensor_bytes(fd, combiner.rows(ent.name, outs, ent.dtype, axis))

    shape = ent.shape[:axis] + (len(outs),) + ent.shape[axis + 1:]
    return OutTensor(ent.name, ent.dtype, shape, per_row * len(outs), write, ent.nbytes)


def _merged_tensor(combiner: _Combiner, ent: HeaderEntry, out_name: str, kind: Kind, out: OutExpert) -> OutTensor:
    def write(fd: int) -> None:
        write_tensor_bytes(fd, combiner.expert_tensor(kind.template, out, kind.proj, ent.dtype))

    return OutTensor(out_name, ent.dtype, ent.shape, ent.nbytes, write, ent.nbytes * len(out.sources))


def _shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _new_config(ckpt: Checkpoint, plan: SurgeryPlan, mtp_dropped: bool) -> tuple[dict, dict]:
    config = json.loads(json.dumps(ckpt.raw_config))
    lm = ckpt.lm_config(config)
    updates = dict(plan.config_updates)
    if mtp_dropped:  # transformers does not load the MTP layers; their experts are not in the plan
        for key in config_keys(ckpt.family, "mtp_layers")[:1]:
            updates[key] = 0
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        old = lm.get(key)
        lm[key] = value
        if old != value:
            changes[key] = {"from": old, "to": value}
    return config, changes


def _copy_side_files(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    copied, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            skipped.append(p.name + "/")
            continue
        if p.name in NOT_COPIED or p.suffix in WEIGHT_SUFFIXES:
            # the index, config, model card and provenance are written anew; other weight formats would be stale
            if p.name not in (INDEX_NAME, "config.json", "README.md", MARKER) and p.suffix != ".safetensors":
                skipped.append(p.name)
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied, skipped


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)


def run_surgery(ckpt: Checkpoint, plan: SurgeryPlan, out: str | Path, force: bool = False,
                card: Callable[[dict], str] | None = None, progress: bool = True) -> dict:
    """Write the checkpoint PLAN describes to OUT (atomically). Returns plain data: files,
    bytes, timings, config changes, what happened to each tensor."""
    started = time.perf_counter()
    out = check_output(out, [ckpt.path], force)
    _check_plan(ckpt, plan)
    num_out = plan.num_experts
    shards, stats = _plan_outputs(ckpt, plan)
    shards = [(p, ts) for p, ts in shards if ts]
    names = _shard_names(len(shards))
    out_bytes = sum(t.nbytes for _, ts in shards for t in ts)
    check_disk_space(out.resolve().parent, out_bytes + sum(64 * 2**10 for _ in shards))
    config, changes = _new_config(ckpt, plan, stats["mtp_dropped"] > 0)
    weight_map: dict[str, str] = {}
    files_written = []
    input_total = sum(t.source_bytes for _, ts in shards for t in ts)
    mark = marker(plan.method, source=str(ckpt.name), family=ckpt.family.name, lineage=lineage(ckpt),
                  experts={str(L): [o.sources for o in outs] for L, outs in sorted(plan.layers.items())})
    with atomic_output_dir(out, force, mark) as tmp:
        bar = _progress() if progress else None
        task = None
        if bar is not None:
            bar.start()
            task = bar.add_task(f"{plan.method}: writing", total=input_total)

        def advance(t: OutTensor) -> None:
            if bar is not None:
                bar.advance(task, t.source_bytes)

        try:
            for (src, tensors), fname in zip(shards, names):
                meta = dict(ckpt.file_metadata.get(src) or {})
                meta["format"] = meta.get("format", "pt")
                size = write_safetensors(tmp / fname, tensors, meta, on_tensor=advance)
                files_written.append({"file": fname, "bytes": size, "tensors": len(tensors), "from": src.name})
                for t in tensors:
                    weight_map[t.name] = fname
        finally:
            if bar is not None:
                bar.stop()
            ckpt.close()
        index = {"metadata": {"total_size": out_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copied, skipped = _copy_side_files(ckpt.path, tmp)
        check = _verify_names(ckpt, config, weight_map, tmp)
        result = {
            "model": ckpt.name,
            "family": ckpt.family.name,
            "out": str(out),
            "method": plan.method,
            "num_experts": {"before": int(ckpt.rc.num_experts), "after": int(num_out)},
            "config_changes": changes,
            "tensors": stats,
            "files": files_written,
            "copied_files": copied,
            "skipped_files": skipped,
            "bytes": {"input": ckpt.total_bytes, "output": out_bytes,
                      "largest_input_shard": ckpt.largest_shard,
                      "largest_output_shard": max((f["bytes"] for f in files_written), default=0)},
            "layout_check": check,
        }
        result["seconds"] = round(time.perf_counter() - started, 3)
        if card is not None:
            (tmp / "README.md").write_text(card(result))
        _fsync_tree(tmp)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _fsync_tree(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors"):  # shards were synced when written
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
    _fsync_dir(d)


def _verify_names(ckpt: Checkpoint, new_config: dict, weight_map: dict, tmp: Path) -> str:
    """Compare the output's tensor names with what the family spec expects of the new config
    (when the input matched its own spec exactly): a wrong rename fails here, not at load."""
    from moetool.checkpoint.source import unwrap_text_config

    expected_in = {t.name for t in ckpt.family.tensors(ckpt.rc, include_mtp=True)}
    actual_in = set(ckpt.entries)
    if expected_in != actual_in:
        return "skipped (the input has tensors the family spec does not list)"
    new_rc = ckpt.family.resolve(unwrap_text_config(new_config)[0])
    expected = {t.name: t.shape for t in ckpt.family.tensors(new_rc, include_mtp=True)}
    got = set(weight_map)
    if set(expected) != got:
        extra = sorted(got - set(expected))
        missing = sorted(set(expected) - got)
        what = f"unexpected {extra[0]}" if extra else f"missing {missing[0]}"
        raise MoetoolError(f"internal: the output does not match the {ckpt.family.name} layout ({what})")
    return "ok"


# -- provenance ------------------------------------------------------------------------------------------------
def lineage(ckpt: Checkpoint) -> dict:
    """What moetool.json records about where an output of CKPT comes from: ``source`` = CKPT (name
    and model fingerprint, moetool.checkpoint.fingerprint: routing config and router bytes) and ``origin`` =
    the uncompressed model at the start of the chain (CKPT's own origin when CKPT is itself a
    moetool output, else CKPT). `moetool heal` checks its --ref against these."""
    from moetool.checkpoint.fingerprint import model_fingerprint

    src = {"name": ckpt.name, "fingerprint": model_fingerprint(ckpt.rc, ckpt.path)}
    before = read_provenance(ckpt.path)
    origin = before["lineage"].get("origin") if before else None
    return {"source": src, "origin": origin if isinstance(origin, dict) else src}


def read_provenance(path: str | Path) -> dict | None:
    """The moetool.json of a checkpoint directory when it records a lineage (None otherwise)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("lineage"), dict) else None


# -- model card --------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def card_statistics(regrouped: bool, statistics: dict | None, empty: str | None = None) -> list[str]:
    """The model card's lines shared by prune and merge: `--regroup`, then where the routing
    statistics came from (EMPTY, if given, when there are none)."""
    lines = ["- Group-limited routing turned off (`--regroup`): n_group = topk_group = 1"] if regrouped else []
    lines += ["", "## Statistics", ""]
    lines += [f"- {k}: `{v}`" for k, v in statistics.items()] if statistics else ([empty] if empty else [])
    return lines


def card_header(result: dict, title: str, summary: str) -> list[str]:
    from moetool import __version__

    lines = [
        "---",
        f"base_model: {result['model']}",
        "tags:",
        "- moetool",
        f"- {result['method']}",
        "- mixture-of-experts",
        "---",
        "",
        f"# {title}",
        "",
        summary,
        "",
        f"- Source: `{result['model']}` ({result['family']})",
        f"- Written by: moetool {__version__} (`moetool {result['method']}`)",
        f"- Routed experts per MoE layer: {result['num_experts']['before']} -> {result['num_experts']['after']}",
    ]
    for key, ch in result["config_changes"].items():
        lines.append(f"- config `{key}`: {ch['from']} -> {ch['to']}")
    b = result["bytes"]
    lines.append(f"- Tensor bytes: {b['input']:,} -> {b['output']:,}")
    return lines
