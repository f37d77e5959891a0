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
Values a layer hands to a later one besides the hidden states (GLM-5's indexer top-k) are found
in that same pass (the stubs return placeholders where the model's loop takes more outputs) and
carried: the real outputs are kept per batch beside the hidden states and passed there.
When an observer needs logits, a last forward runs the model's own final norm and head on the
last layer's outputs (stubs return them). Hidden states stay in memory, or in a run directory
on disk when ``max_memory`` says they do not fit; with a ``run_dir`` every finished layer is
checkpointed (observer state and the next layer's inputs, carried values included, written atomically) and ``resume``
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
        # layerwise: what the model's loop takes from a layer (None: the hidden states alone; K: a K-tuple)
        # and which arguments of a layer are outputs of an earlier one ({layer: [(where, source, index)]})
        self.out_arity: int | None = None
        self._arity_known = False
        self.carry: dict[int, list] = {}
        self._last_use: dict[tuple, int] = {}
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

    def _stub_output(self, hidden, i: int, slots: dict | None = None):
        """What a stub for layer I returns in place of the real layer: HIDDEN alone, or (HIDDEN, one
        placeholder per further output) when the layers return a tuple (``self.out_arity``)."""
        import torch

        if self.out_arity is None:
            return hidden
        marks = tuple(torch.empty(0) for _ in range(self.out_arity - 1))
        if slots is not None:
            for k, t in enumerate(marks, start=1):
                slots[id(t)] = (t, i, k)
        return (hidden, *marks)

    def _capture(self, batch: Batch):
        """(hidden states entering layer 0, per layer (args, kwargs)) for BATCH, by the model's own forward.

        The stubs return what the model's loop expects of a layer: the hidden states alone, or a tuple
        whose further items are placeholders (GLM-5's layers return the attention indexer's top-k with
        the hidden states). The first shape for which every layer gets the previous layer's hidden
        states unchanged is the one; where a placeholder comes back as an argument of a later layer,
        that argument is carried: the layerwise loop passes the real output there (``self.carry``)."""
        n = len(self._layers())
        shapes = [self.out_arity] if self._arity_known else [None, 1, 2, 3, 4]
        first_error = None
        for arity in shapes:
            self.out_arity = arity
            seen: dict = {}
            outs: dict = {}
            slots: dict = {}

            def stub(i, hidden, args, kwargs):
                seen[i] = (hidden, args, kwargs)
                if i == n - 1:
                    raise _Stop
                outs[i] = self._stub_output(hidden, i, slots)
                return outs[i]

            self.busy = True  # hooks on the layers must not take the stubs' pass for a real one
            try:
                with self._stubs(stub):
                    try:
                        self.forward(batch, logits=False)
                    except _Stop:
                        pass
                    except Exception as exc:  # noqa: BLE001 - the model wants other outputs of its layers
                        first_error = first_error or exc
                        continue
            finally:
                self.busy = False
            if len(seen) != n:
                raise MoetoolError("the model did not call its decoder layers as expected; run it with --no-stream")
            chained = all(seen[i][0] is (outs[i - 1] if arity is None else outs[i - 1][0]) for i in range(1, n))
            if not chained:
                first_error = first_error or ValueError("a layer's hidden states are not the previous layer's "
                                                         "output")
                continue
            carry = self._carried(seen, slots, n)
            if carry is None:
                first_error = first_error or ValueError("a layer's output is passed on inside another value")
                continue
            if self._arity_known and carry != self.carry:
                raise MoetoolError("the model passes its layers' outputs on differently from one batch to the next; "
                                   "it cannot run one layer at a time: run it with --no-stream")
            self.carry, self._arity_known = carry, True
            return seen[0][0], [seen[i][1:] for i in range(n)]
        raise MoetoolError("the model's decoder layers pass more than hidden states to each other "
                           f"({first_line(first_error) if first_error else 'unknown shape'}); it cannot run one "
                           "layer at a time: run it with --no-stream")

    @staticmethod
    def _carried(seen: dict, slots: dict, n: int):
        """{layer: [(argument position or keyword, source layer, output index)]}: the arguments of each
        layer that are outputs of an earlier one (placeholders the stubs returned); None when a
        placeholder is inside another value (a tuple, a dict), which cannot be swapped."""
        import torch

        carry: dict[int, list] = {}
        for i in range(n):
            _h, args, kwargs = seen[i]
            for where, v in [(j, a) for j, a in enumerate(args)] + sorted(kwargs.items()):
                if isinstance(v, torch.Tensor) and id(v) in slots and slots[id(v)][0] is v:
                    _t, src, k = slots[id(v)]
                    carry.setdefault(i, []).append((where, src, k))
                elif _holds_slot(v, slots):
                    return None
        return {i: sorted(c, key=str) for i, c in carry.items()}

    def _layer_args(self, b: int, L: int, carried: dict):
        """(args, kwargs) of layer L for batch B: the captured ones with carried outputs in place."""
        a, kw = self.args[b][L]
        feeds = self.carry.get(L)
        if not feeds:
            return a, kw
        a, kw = list(a), dict(kw)
        for where, src, k in feeds:
            v = carried.get((src, k))
            if isinstance(where, int):
                a[where] = v
            else:
                kw[where] = v
        return tuple(a), kw

    def _split_output(self, L: int, out, carried: dict):
        """(hidden states, the values carried past layer L) from layer L's real output."""
        if self.out_arity is None:
            if isinstance(out, tuple):  # a layer returning a tuple the model's loop takes as one value
                raise MoetoolError(f"layer {L} returned {len(out)} values where the model's loop takes one; "
                                   "it cannot run one layer at a time: run it with --no-stream")
            h = out
        else:
            if not isinstance(out, tuple) or len(out) != self.out_arity:
                raise MoetoolError(f"layer {L} returned other values than the model's loop takes; it cannot run one "
                                   "layer at a time: run it with --no-stream")
            h = out[0]
        keep = {key: v for key, v in carried.items() if self._last_use.get(key, -1) > L}
        if self.out_arity is not None:
            for k in range(1, self.out_arity):
                if self._last_use.get((L, k), -1) > L:
                    keep[(L, k)] = out[k]
        return h, keep

    def _run_layerwise(self, observers, prog, total: int) -> None:
        rc = getattr(self.loaded, "rc", None)
        why = rc.family.layerwise_unsupported if rc is not None else None
        if why:
            raise MoetoolError(f"a {rc.family.name} model cannot run one layer at a time: {why}")

        layers = self._layers()
        n = len(layers)
        need = any(o.needs_logits for o in observers)
        self.out_arity, self._arity_known, self.carry = None, False, {}
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
                store.put(b.index, h, {})
        self._last_use = {}  # (source layer, output index) -> the last layer that takes it
        for L, feeds in self.carry.items():
            for _where, src, k in feeds:
                self._last_use[(src, k)] = max(self._last_use.get((src, k), -1), L)
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
                h, carried = store.get(b.index)
                a, kw = self._layer_args(b.index, L, carried)
                store.put(b.index, *self._split_output(L, layer(h, *a, **kw), carried))
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
                        h, carried = store.get(b.index)
                        a, kw = self._layer_args(b.index, L, carried)
                        store.put(b.index, *self._split_output(L, layer(h, *a, **kw), carried))
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
                return self._stub_output(final if i == n - 1 else hidden, i)

            with self._stubs(stub):
                for b in self.batches:
                    final = store.get(b.index)[0]
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


def _holds_slot(v, slots: dict) -> bool:
    """True when V (a tuple, list or dict, at any depth) holds one of the stubs' placeholders."""
    if isinstance(v, (tuple, list)):
        return any(_holds_slot(x, slots) for x in v)
    if isinstance(v, dict):
        return any(_holds_slot(x, slots) for x in v.values())
    return id(v) in slots and slots[id(v)][0] is v


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

    def put(self, i: int, t, carried: dict | None = None) -> None:
        """Batch I's inputs of the next layer: hidden states T and CARRIED {(source layer, output index):
        value} (outputs of earlier layers a later one takes; a None value is kept as None)."""
        carried = carried or {}
        if self.kind == "disk":
            from safetensors.torch import save_file

            p = self._path("next", i)
            p.parent.mkdir(parents=True, exist_ok=True)
            save_file({"h": t.detach().contiguous().cpu(), **_carried_tensors(carried)}, str(p),
                      metadata={"carried": json.dumps(_carried_keys(carried))})
            self.nxt[i] = p
        else:
            self.nxt[i] = (t, carried)

    def get(self, i: int):
        """(hidden states, carried values) entering this layer for batch I."""
        v = self.cur[i]
        if self.kind == "disk":
            from safetensors import safe_open

            with safe_open(str(v), framework="pt") as f:
                keys = json.loads((f.metadata() or {}).get("carried", "[]"))
                h = f.get_tensor("h").to(self.ex.device)
                return h, _carried_from(keys, {k: f.get_tensor(k) for k in f.keys() if k != "h"}, self.ex.device)
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
        carried_keys = {}
        for i in self.cur:
            h, carried = self.get(i)
            tensors[f"h.{i}"] = h.detach().contiguous().cpu()
            tensors.update({f"c.{i}.{k}": v for k, v in _carried_tensors(carried).items()})
            carried_keys[str(i)] = _carried_keys(carried)
        meta: dict = {"next_layer": next_layer, "batches": len(self.ex.batches), "observers": [],
                      "carried": carried_keys}
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
            pre = f"c.{b.index}."
            carried = _carried_from(meta.get("carried", {}).get(str(b.index), []),
                                    {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, self.ex.device)
            self.put(b.index, tensors[f"h.{b.index}"].to(self.ex.device), carried)
        return int(meta["next_layer"])

    def close(self) -> None:
        if getattr(self, "_own_dir", False) and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _carried_keys(carried: dict) -> list:
    """[[source layer, output index, has a tensor], ...] of CARRIED, for a file's JSON metadata."""
    return [[src, k, carried[(src, k)] is not None] for src, k in sorted(carried)]


def _carried_tensors(carried: dict) -> dict:
    """CARRIED's tensors by name ``{source}.{index}`` (None values are named in the keys only)."""
    out = {}
    for (src, k), v in carried.items():
        if v is None:
            continue
        if not hasattr(v, "detach"):
            raise MoetoolError(f"layer {src} passes a {type(v).__name__} to a later layer; it cannot be kept between "
                               "layers: run it with --no-stream")
        out[f"{src}.{k}"] = v.detach().contiguous().cpu()
    return out


def _carried_from(keys: list, tensors: dict, device) -> dict:
    return {(int(src), int(k)): (tensors[f"{src}.{k}"].to(device) if has else None) for src, k, has in keys}


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
