"""The one place moetool runs a model over text: batching, padding, devices, the no-grad /
no-cache context, ``logits_to_keep``, progress, and the layer-by-layer (streaming) mode.
Commands bring observers (``moetool.runtime.observers``) that record what they need.

    ex = Executor(loaded, batch_size=8)                  # mode "whole" or "layerwise" (auto: the
    ex.run(sequences, [RoutingRecorder(...), ...])       # latter for a streamed model)

An observer declares ``needs_logits``, registers its hooks in ``attach(executor, hooks)``
(removed after the run), and is told ``batch_end(batch, layer, logits)`` after each batch
passed decoder layer ``layer`` (``None``: the whole forward / the head, with logits when some
observer needs them) and ``layer_end(layer)`` once every batch has passed it. ``layer_end`` may
change the layer's weights (``executor.layer_module(layer)``) and return True: the layer's
outputs are then recomputed with the changed weights before the next layer runs. Hooks must
ignore calls made while ``executor.busy`` is set (the stub passes below, and observers running a
module themselves); ``executor.current`` is the batch being run, ``executor.layer`` the layer.

Layerwise mode: one forward per batch runs the model's own embedding, mask and position code
with every decoder layer replaced by a stub that records the arguments the model passes it
(hidden states, masks by layer type, position ids and rotary embeddings, cache off) and stops
at the last layer; then each decoder layer runs over every batch with exactly those
arguments, and its weights are read from disk just before (a streamed model) and freed after.
When an observer needs logits, a last forward runs the model's own final norm and head on the
last layer's outputs (stubs return them). Hidden states stay in memory, or in a run directory
on disk when ``max_memory`` says they do not fit; with a ``run_dir`` every finished layer is
checkpointed (observer state and the next layer's inputs, written atomically) and ``resume``
continues from the last one.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moetool.errors import MoetoolError, first_line


@dataclass
class Batch:
    """What every hook may read about the batch being run."""

    index: int
    input_ids: Any  # LongTensor [B, S] (CPU)
    attention_mask: Any  # LongTensor [B, S] (CPU), 1 = real token
    valid: Any  # BoolTensor [B * S] (CPU): rows that count (not padding)
    rows: np.ndarray  # input-sequence index of each batch row
    positions: Any  # LongTensor [B, S]: position of each token in its sequence
    left_pad: bool = False

    @property
    def keep(self):
        return self.attention_mask.bool()

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


class Observer:
    """Base observer: every method optional (see the module docstring)."""

    needs_logits = False

    def attach(self, executor: "Executor", hooks: "Hooks") -> None:
        pass

    def batch_end(self, batch: Batch, layer: int | None, logits) -> None:
        pass

    def layer_end(self, layer: int) -> bool | None:
        return None

    # resume: plain tensors / JSON-able values only (no pickle)
    def state(self) -> tuple[dict, dict]:
        return {}, {}

    def load_state(self, tensors: dict, meta: dict) -> None:
        pass


class Hooks:
    """Hook handles owned by the run that registered them; all removed at its end."""

    def __init__(self):
        self.handles: list = []

    def forward(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def pre(self, module, fn, with_kwargs: bool = False):
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _Stop(Exception):
    pass


@contextlib.contextmanager
def quiet_bitsandbytes():
    """bitsandbytes int8 logs a warning on every matmul that casts float32 inputs to float16."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _signature(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def pad_id_of(loaded) -> int:
    tok = getattr(loaded, "tokenizer", None)
    model = loaded.model
    for cand in (getattr(tok, "pad_token_id", None), getattr(getattr(model, "config", None), "pad_token_id", None),
                 getattr(tok, "eos_token_id", None)):
        if isinstance(cand, int):
            return cand
    return 0


class Executor:
    """Runs LOADED (a ``moetool.runtime.loading.LoadedModel``, or a bare transformers model) over token
    sequences in batches; see the module docstring."""

    def __init__(self, loaded, batch_size: int = 8, mode: str | None = None, order: str = "length",
                 pad_id: int | None = None, left_pad: bool = False, full_mask: bool = True,
                 max_memory: int | None = None, run_dir: str | os.PathLike | None = None, resume: bool = False,
                 progress=None, description: str = "running", device=None):
        if batch_size < 1:
            raise MoetoolError("--batch-size must be at least 1")
        self.loaded = loaded
        self.model = loaded.model if hasattr(loaded, "rc") else loaded  # a LoadedModel, or a bare model
        self._device = device
        self.reader = getattr(loaded, "layer_reader", None)
        streamed = self.reader is not None
        ro = getattr(loaded, "run_options", None) or {}
        self.max_memory = max_memory if max_memory is not None else ro.get("activation_budget")
        run_dir = run_dir or ro.get("run_dir")
        if run_dir and ro.get("run_dir") and hasattr(loaded, "name"):  # one subdirectory per model (eval runs several)
            run_dir = Path(run_dir) / _slug(loaded.name)
        self.run_dir = Path(run_dir) if run_dir else None
        self.resume = resume or bool(ro.get("resume"))
        if mode is None:  # checkpointed runs go layer by layer: that is what can be resumed
            mode = "layerwise" if streamed or self.run_dir is not None else "whole"
        if mode not in ("whole", "layerwise"):
            raise MoetoolError(f"internal: unknown executor mode {mode!r}")
        if streamed and mode == "whole":
            raise MoetoolError("a streamed model runs one layer at a time (mode layerwise)")
        self.mode = mode
        rc = getattr(loaded, "rc", None)
        self.unpadded = rc.family.unpadded if rc is not None else None  # padding would change its results
        self.batch_size = 1 if self.unpadded else batch_size
        self.order = order
        self.pad_id = pad_id if pad_id is not None else (pad_id_of(loaded) if hasattr(loaded, "rc") else 0)
        self.left_pad = left_pad
        self.full_mask = full_mask
        self.progress = progress
        self.description = description
        self.current: Batch | None = None
        self.busy = False  # an observer is calling a module itself: other hooks must ignore that call
        self.layer: int | None = None
        self.batches: list[Batch] = []
        fkw = _signature(self.model.forward)
        self.forward_params = fkw
        self._extra_kw = {}
        if "use_cache" in fkw or "kwargs" in fkw:
            self._extra_kw["use_cache"] = False
        if "output_router_logits" in fkw:  # the auxiliary loss is training's business
            self._extra_kw["output_router_logits"] = False
        self._has_logits_to_keep = "logits_to_keep" in fkw
        self.stats: dict[str, Any] = {}

    # -- devices and batches ----------------------------------------------------------------------------
    @property
    def device(self):
        if self._device is not None:
            return self._device
        dev = getattr(self.loaded, "input_device", None)
        if dev is not None:
            return dev
        import torch

        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    def make_batches(self, sequences: Sequence[Sequence[int]]) -> list[Batch]:
        import torch

        seqs = [list(map(int, s)) for s in sequences]
        if self.order == "length":
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
        else:
            order = list(range(len(seqs)))
        out = []
        for bi, start in enumerate(range(0, len(order), self.batch_size)):
            rows = order[start:start + self.batch_size]
            lens = torch.tensor([len(seqs[i]) for i in rows])
            S = int(lens.max())
            ids = torch.full((len(rows), S), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), S), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(seqs[i])
                sl = slice(S - n, S) if self.left_pad else slice(0, n)
                ids[r, sl] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, sl] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0) if self.left_pad else torch.arange(S).expand(len(rows), S)
            out.append(Batch(bi, ids, mask, mask.bool().reshape(-1), np.asarray(rows, dtype=np.int64), pos,
                             self.left_pad))
        return out

    def forward_kwargs(self, batch: Batch, logits: bool, **extra) -> dict:
        dev = self.device
        kw = dict(input_ids=batch.input_ids.to(dev), **self._extra_kw)
        if self.full_mask or not bool(batch.attention_mask.all()):
            kw["attention_mask"] = batch.attention_mask.to(dev)
        if batch.left_pad:
            kw["position_ids"] = batch.positions.to(dev)
        if self._has_logits_to_keep:
            kw["logits_to_keep"] = 0 if logits else 1
        kw.update(extra)
        return kw

    def forward(self, batch: Batch, logits: bool = True, **extra):
        """One forward of the whole model on BATCH (whole mode; decoding passes its cache in EXTRA)."""
        self.current = batch
        return self.model(**self.forward_kwargs(batch, logits, **extra))

    def context(self):
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(quiet_bitsandbytes())
        return stack

    def layer_module(self, layer: int):
        from moetool.runtime.streaming import decoder_layers

        return decoder_layers(self.model, self.loaded.rc)[1][layer] if hasattr(self.loaded, "rc") else \
            self.model.model.layers[layer]

    # -- the run ----------------------------------------------------------------------------------------
    def run(self, sequences: Sequence[Sequence[int]], observers: Sequence[Observer]) -> None:
        """Run every sequence through the model, telling OBSERVERS (see the module docstring)."""
        from moetool.runtime.progress import NULL, open_progress

        if not sequences:
            raise MoetoolError("nothing to run: no token sequences")
        if any(len(s) == 0 for s in sequences):
            raise MoetoolError("empty prompt: nothing to run")
        self.batches = self.make_batches(sequences)
        total = sum(b.tokens for b in self.batches)
        own = self.progress is None
        prog = open_progress() if own else self.progress
        hooks = Hooks()
        try:
            with self.context():
                for o in observers:
                    o.attach(self, hooks)
                if self.mode == "whole":
                    self._run_whole(observers, prog, total)
                else:
                    self._run_layerwise(observers, prog, total)
        finally:
            hooks.remove()
            self.current = None
            if own and prog is not NULL:
                prog.close()

    def _run_whole(self, observers, prog, total: int) -> None:
        need = any(o.needs_logits for o in observers)
        task = prog.task(self.description, total)
        for b in self.batches:
            out = self.forward(b, logits=need)
            for o in observers:
                o.batch_end(b, None, out.logits if need else None)
            del out
            task.advance(b.tokens)
        layers = self._num_layers()
        for L in range(layers):
            for o in observers:
                o.layer_end(L)

    def _num_layers(self) -> int:
        rc = getattr(self.loaded, "rc", None)
        if rc is not None:
            return int(rc.num_layers)
        model = self.model
        while not hasattr(model, "config") and hasattr(model, "module"):  # DDP / FSDP wrappers (distill)
            model = model.module
        return int(model.config.num_hidden_layers)

    # -- layerwise ------------------------------------------------------------------------------------------
    def _layers(self):
        from moetool.runtime.streaming import decoder_layers

        if hasattr(self.loaded, "rc"):
            return decoder_layers(self.model, self.loaded.rc)[1]
        return self.model.model.layers

    @contextlib.contextmanager
    def _stubs(self, fn):
        """Every decoder layer's forward replaced by FN(index, hidden, args, kwargs) for a while."""
        layers = self._layers()
        for i, layer in enumerate(layers):
            layer.forward = (lambda *a, _i=i, **k: fn(_i, a[0] if a else k.pop("hidden_states"), a[1:], k))
        try:
            yield layers
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    def _capture(self, batch: Batch):
        """(hidden states entering layer 0, per layer (args, kwargs)) for BATCH, by the model's own forward."""
        n = len(self._layers())
        seen: dict = {}

        def stub(i, hidden, args, kwargs):
            if i == 0:
                seen["h"] = hidden
            seen[i] = (args, kwargs)
            if i == n - 1:
                raise _Stop
            return hidden

        self.busy = True  # hooks on the layers must not take the stubs' pass for a real one
        try:
            with self._stubs(stub):
                try:
                    self.forward(batch, logits=False)
                except _Stop:
                    pass
                except (TypeError, ValueError) as exc:  # the model wants more than hidden states back
                    raise MoetoolError("the model's decoder layers pass more than hidden states to each other "
                                       f"({first_line(exc)}); it cannot run one layer at a time: run it with "
                                       "--no-stream") from exc
        finally:
            self.busy = False
        if "h" not in seen or (n - 1) not in seen:
            raise MoetoolError("the model did not call its decoder layers as expected; run it with --no-stream")
        return seen["h"], [seen[i] for i in range(n)]

    def _run_layerwise(self, observers, prog, total: int) -> None:
        import torch

        rc = getattr(self.loaded, "rc", None)
        why = rc.family.layerwise_unsupported if rc is not None else None
        if why:
            raise MoetoolError(f"a {rc.family.name} model cannot run one layer at a time: {why}")

        layers = self._layers()
        n = len(layers)
        need = any(o.needs_logits for o in observers)
        store = _Store(self, n)
        start = 0
        if self.resume:
            start = store.load_checkpoint(observers)
        task = prog.task(f"{self.description} (layer by layer)", total * (n - start) + (total if need else 0))
        args: list = []
        self.args = args  # args[batch][layer] = (args, kwargs) the model passes the layer (observers may reuse them)
        for b in self.batches:  # embeddings and the arguments every layer gets
            h, per_layer = self._capture(b)
            args.append(per_layer)
            if start == 0:
                store.put(b.index, h)
        store.swap()
        reader = self.reader
        if reader is not None:
            reader.prefetch(start)
        for L in range(start, n):
            self.layer = L
            task.update(info=f"layer {L + 1}/{n}")
            if reader is not None:
                reader.materialise(L)
                reader.prefetch(L + 1)
            layer = layers[L]
            for b in self.batches:
                self.current = b
                a, kw = args[b.index][L]
                out = layer(store.get(b.index), *a, **kw)
                store.put(b.index, out[0] if isinstance(out, tuple) else out)
                for o in observers:
                    o.batch_end(b, L, None)
                task.advance(b.tokens)
            changed = False
            for o in observers:
                changed = bool(o.layer_end(L)) or changed
            if changed:  # an observer changed the layer: its outputs come from the new weights
                self.busy = True
                try:
                    for b in self.batches:
                        a, kw = args[b.index][L]
                        out = layer(store.get(b.index), *a, **kw)
                        store.put(b.index, out[0] if isinstance(out, tuple) else out)
                finally:
                    self.busy = False
            if reader is not None:
                reader.free(L)
            store.swap()
            store.checkpoint(L + 1, observers)
        self.layer = None
        if need:
            task.update(info="head")

            def stub(i, hidden, a, kw):
                return final if i == n - 1 else hidden

            with self._stubs(stub):
                for b in self.batches:
                    final = store.get(b.index)
                    self.busy = True
                    try:
                        out = self.forward(b, logits=True)
                    finally:
                        self.busy = False
                    for o in observers:
                        o.batch_end(b, None, out.logits)
                    del out
                    task.advance(b.tokens)
        self.stats["bytes_read"] = getattr(reader, "bytes_read", 0) if reader is not None else 0
        self.stats["activation_store"] = store.kind
        store.close()
        _ = torch


class _Store:
    """Hidden states between layers, per batch: in memory, or on disk in a run directory when
    the executor's memory budget says tokens x hidden x 2 does not fit. ``put`` writes the next
    layer's inputs, ``get`` reads this layer's; ``swap`` turns the first into the second."""

    def __init__(self, ex: Executor, n_layers: int):
        self.ex = ex
        self.n_layers = n_layers
        hidden = int(getattr(getattr(ex.model, "config", None), "hidden_size", 0) or 0)
        tokens = sum(int(b.input_ids.numel()) for b in ex.batches)
        elem = 4
        for p in ex.model.parameters():
            if p.dtype.is_floating_point:
                elem = p.element_size()
                break
        self.need = 2 * tokens * hidden * elem
        self.kind = "memory"
        self.dir: Path | None = None
        if ex.max_memory is not None and self.need > ex.max_memory:
            self.kind = "disk"
        if ex.run_dir is not None:
            ex.run_dir.mkdir(parents=True, exist_ok=True)
            self.dir = ex.run_dir
        elif self.kind == "disk":
            import tempfile

            self.dir = Path(tempfile.mkdtemp(prefix="moetool-activations-"))
            self._own_dir = True
        self.cur: dict[int, Any] = {}
        self.nxt: dict[int, Any] = {}

    def _path(self, which: str, i: int) -> Path:
        return self.dir / which / f"batch-{i:06d}.safetensors"

    def put(self, i: int, t) -> None:
        if self.kind == "disk":
            from safetensors.torch import save_file

            p = self._path("next", i)
            p.parent.mkdir(parents=True, exist_ok=True)
            save_file({"h": t.detach().contiguous().cpu()}, str(p))
            self.nxt[i] = p
        else:
            self.nxt[i] = t

    def get(self, i: int):
        v = self.cur[i]
        if self.kind == "disk":
            from safetensors.torch import load_file

            return load_file(str(v))["h"].to(self.ex.device)
        return v

    def swap(self) -> None:
        if self.kind == "disk":
            cur, nxt = self.dir / "current", self.dir / "next"
            shutil.rmtree(cur, ignore_errors=True)
            if nxt.exists():
                os.replace(nxt, cur)
            self.cur = {i: cur / p.name for i, p in self.nxt.items()}
        else:
            self.cur = self.nxt
        self.nxt = {}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint(self, next_layer: int, observers) -> None:
        """Atomically: the inputs of NEXT_LAYER and every observer's state, under run_dir/checkpoint."""
        if self.ex.run_dir is None:
            return
        from safetensors.torch import save_file

        root = self.ex.run_dir
        tmp = root / f".checkpoint.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {}
        for i in self.cur:
            h = self.get(i)
            tensors[f"h.{i}"] = h.detach().contiguous().cpu()
        meta: dict = {"next_layer": next_layer, "batches": len(self.ex.batches), "observers": []}
        for k, o in enumerate(observers):
            t, m = o.state()
            for name, v in t.items():
                tensors[f"o{k}.{name}"] = _as_tensor(v)
            meta["observers"].append(m)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**meta, "signature": self.signature()}))
        final = root / "checkpoint"
        old = root / f".checkpoint.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def signature(self) -> dict:
        """What a checkpoint must agree with to be resumed: the token batches and the model."""
        import hashlib

        h = hashlib.sha256()
        for b in self.ex.batches:
            h.update(b.input_ids.numpy().tobytes())
            h.update(b.attention_mask.numpy().tobytes())
        rc = getattr(self.ex.loaded, "rc", None)
        return {"tokens": h.hexdigest(), "layers": self.n_layers,
                "model": getattr(self.ex.loaded, "name", None), "config": None if rc is None else
                hashlib.sha256(json.dumps(rc.raw, sort_keys=True, default=str).encode()).hexdigest()}

    def load_checkpoint(self, observers) -> int:
        from safetensors.torch import load_file

        root = self.ex.run_dir
        if root is None:
            raise MoetoolError("--resume needs a run directory (--run-dir)")
        ck = root / "checkpoint"
        if not (ck / "state.json").is_file():
            return 0  # nothing finished yet: start from the first layer
        meta = json.loads((ck / "state.json").read_text())
        if meta.get("signature") != self.signature():
            raise MoetoolError(f"--resume: {ck} was made by a run on other text or another model; "
                               "use the same input or another --run-dir")
        if len(meta["observers"]) != len(observers):
            raise MoetoolError(f"--resume: {ck} was made by a different command")
        tensors = load_file(str(ck / "state.safetensors"))
        for k, o in enumerate(observers):
            pre = f"o{k}."
            o.load_state({name[len(pre):]: v for name, v in tensors.items() if name.startswith(pre)},
                         meta["observers"][k])
        for b in self.ex.batches:
            self.put(b.index, tensors[f"h.{b.index}"].to(self.ex.device))
        return int(meta["next_layer"])

    def close(self) -> None:
        if getattr(self, "_own_dir", False) and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _slug(name: str) -> str:
    import hashlib
    import re

    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(name)).name or "model").strip("-") or "model"
    return f"{base}-{hashlib.sha256(str(name).encode()).hexdigest()[:8]}"


def _as_tensor(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.detach().contiguous().cpu()
    return torch.from_numpy(np.ascontiguousarray(v))
