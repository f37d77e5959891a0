"""Record which experts a MoE model routes every token to, and the trace file format.

Recording hooks each MoE layer's router (found from the family's runtime layouts) and keeps
exactly what the router returned to its block: ``(router_logits, top_k_weights, top_k_index)``
in transformers 5, so every family's scoring (softmax, DeepSeek-V3's sigmoid with
score-correction bias and group-limited top-k, gpt-oss's top-k-then-softmax) is captured as
the block used it, not re-derived. A hook only converts the router's tensors to compact dtypes
on their device and appends them to a list (no per-token Python); after each forward the
non-padding rows are selected in one indexing operation and moved to the CPU.

The trace file is one ``.safetensors`` file (header first, no pickle); see
docs/trace-format.md. ``Trace.load`` reads it with safetensors' numpy API: showing a saved
trace never imports torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from moetool.errors import MoetoolError

FORMAT = "moetool-trace"
VERSION = "1"
TOKEN_TEXTS_LIMIT = 4096  # token strings are stored in the metadata up to this many tokens
_INT_META = ("num_experts", "zero_experts", "top_k", "num_layers", "weight_bytes", "expert_weight_bytes", "generate")
_JSON_META = ("moe_layers", "texts", "token_texts", "devices", "options")
_REQUIRED_META = ("format", "version", "model", "family", "num_experts", "top_k", "num_layers", "moe_layers",
                  "texts", "quantization", "weight_bytes", "expert_weight_bytes", "dtype")


@dataclass
class Trace:
    """A routing trace: per token, and per MoE layer, the chosen experts and their weights.

    Tokens are ordered by input text (``sequence``), then ``position`` in it; generated tokens
    (``decode`` == 1) follow their prompt. ``experts[L]`` / ``weights[L]`` / ``logits[L]`` are
    keyed by the decoder-layer index L of each MoE layer.
    """

    token_ids: np.ndarray  # int32 [T]
    sequence: np.ndarray  # int32 [T]
    position: np.ndarray  # int32 [T]
    decode: np.ndarray  # uint8 [T]
    experts: dict[int, np.ndarray]  # uint8 (int16 if > 256 experts) [T, k]
    weights: dict[int, np.ndarray]  # float16 [T, k]
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # float16 [T, E], optional
    meta: dict[str, Any] = field(default_factory=dict)

    # -- convenience ---------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def zero_experts(self) -> int:
        """Zero-computation experts: ids num_experts .. num_experts + zero_experts - 1 in ``experts``."""
        return int(self.meta.get("zero_experts", 0) or 0)

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def moe_layers(self) -> list[int]:
        return [int(x) for x in self.meta["moe_layers"]]

    @property
    def texts(self) -> list[str]:
        return list(self.meta.get("texts", []))

    @property
    def token_texts(self) -> list[str] | None:
        return self.meta.get("token_texts")

    @property
    def has_logits(self) -> bool:
        return bool(self.logits)

    # -- file format ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        out = {
            "token_ids": np.ascontiguousarray(self.token_ids, dtype=np.int32),
            "sequence": np.ascontiguousarray(self.sequence, dtype=np.int32),
            "position": np.ascontiguousarray(self.position, dtype=np.int32),
            "decode": np.ascontiguousarray(self.decode, dtype=np.uint8),
        }
        id_dtype = np.uint8 if self.num_experts + self.zero_experts <= 256 else np.int16
        for L in self.moe_layers:
            out[f"layers.{L}.experts"] = np.ascontiguousarray(self.experts[L], dtype=id_dtype)
            out[f"layers.{L}.weights"] = np.ascontiguousarray(self.weights[L], dtype=np.float16)
            if L in self.logits:
                out[f"layers.{L}.logits"] = np.ascontiguousarray(self.logits[L], dtype=np.float16)
        return out

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.meta.items():
            if value is None:
                continue
            if key in _JSON_META or isinstance(value, (list, dict, bool)):
                out[key] = json.dumps(value, ensure_ascii=False)
            else:
                out[key] = str(value)
        out["format"] = FORMAT
        out["version"] = VERSION
        return out

    def save(self, path: str | os.PathLike) -> int:
        """Write the trace (atomically) and return the file's size in bytes."""
        from safetensors.numpy import save_file

        path = Path(path)
        if path.parent and not path.parent.exists():
            raise MoetoolError(f"{path}: directory {path.parent} does not exist")
        from moetool.checkpoint.outdir import file_mode, tmp_file_beside

        tmp = tmp_file_beside(path)
        try:
            save_file(self.tensors(), str(tmp), metadata=self.metadata())
            os.chmod(tmp, file_mode())  # safetensors creates 0600; an output follows the umask
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        """Read and validate a trace file; anything wrong is a one-line MoetoolError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MoetoolError(f"{path}: no such trace file")
        try:
            with safe_open(str(path), framework="np") as f:
                raw_meta = f.metadata() or {}
                names = set(f.keys())
                if raw_meta.get("format") != FORMAT:
                    raise MoetoolError(f"{path}: not a moetool trace (safetensors without format={FORMAT} metadata)")
                if raw_meta.get("version") != VERSION:
                    raise MoetoolError(
                        f"{path}: trace format version {raw_meta.get('version')!r} is not supported "
                        f"(this moetool reads version {VERSION})"
                    )
                meta = _decode_meta(path, raw_meta)
                tensors = {name: f.get_tensor(name) for name in names}
        except MoetoolError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a damaged header/body
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MoetoolError(f"{path}: corrupt trace file ({msg})") from None
        return _validate(path, tensors, meta)


def _decode_meta(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    missing = [k for k in _REQUIRED_META if k not in raw]
    if missing:
        raise MoetoolError(f"{path}: corrupt trace file (metadata lacks {', '.join(missing)})")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            if key in _INT_META:
                meta[key] = int(value)
            elif key in _JSON_META:
                meta[key] = json.loads(value)
            elif value in ("true", "false"):
                meta[key] = value == "true"
            else:
                meta[key] = value
        except (ValueError, json.JSONDecodeError):
            raise MoetoolError(f"{path}: corrupt trace file (metadata field {key} = {value[:40]!r})") from None
    if not isinstance(meta["moe_layers"], list) or not all(isinstance(x, int) for x in meta["moe_layers"]):
        raise MoetoolError(f"{path}: corrupt trace file (moe_layers is not a list of layer indices)")
    return meta


def _validate(path: Path, tensors: dict[str, np.ndarray], meta: dict) -> Trace:
    def bad(why: str):
        raise MoetoolError(f"{path}: corrupt trace file ({why})")

    for name, dtype in (("token_ids", np.int32), ("sequence", np.int32), ("position", np.int32), ("decode", np.uint8)):
        if name not in tensors:
            bad(f"no '{name}' tensor")
        if tensors[name].dtype != dtype or tensors[name].ndim != 1:
            bad(f"'{name}' should be {np.dtype(dtype).name} [T], is {tensors[name].dtype} {list(tensors[name].shape)}")
    T = tensors["token_ids"].shape[0]
    for name in ("sequence", "position", "decode"):
        if tensors[name].shape[0] != T:
            bad(f"'{name}' has {tensors[name].shape[0]} entries, token_ids has {T}")
    k, E = meta["top_k"], meta["num_experts"] + int(meta.get("zero_experts", 0) or 0)  # ids and logit columns
    id_dtype = np.uint8 if E <= 256 else np.int16
    experts, weights, logits = {}, {}, {}
    for L in meta["moe_layers"]:
        ids = tensors.get(f"layers.{L}.experts")
        w = tensors.get(f"layers.{L}.weights")
        if ids is None or w is None:
            bad(f"no routing tensors for MoE layer {L}")
        if ids.dtype != id_dtype or ids.shape != (T, k):
            bad(f"layers.{L}.experts should be {np.dtype(id_dtype).name} [{T}, {k}], is {ids.dtype} {list(ids.shape)}")
        if w.dtype != np.float16 or w.shape != (T, k):
            bad(f"layers.{L}.weights should be float16 [{T}, {k}], is {w.dtype} {list(w.shape)}")
        if T and (int(ids.max()) >= E or int(ids.min()) < 0):
            bad(f"layers.{L}.experts has expert ids outside 0..{E - 1}")
        experts[L], weights[L] = ids, w
        lg = tensors.get(f"layers.{L}.logits")
        if lg is not None:
            if lg.shape != (T, E):
                bad(f"layers.{L}.logits should be [{T}, {E}], is {list(lg.shape)}")
            logits[L] = lg
    extra = [n for n in tensors if n.startswith("layers.")
             and not (n.split(".")[1].isdigit() and int(n.split(".")[1]) in experts)]
    if extra:
        bad(f"tensors for layers not in moe_layers: {', '.join(sorted(extra)[:3])}")
    return Trace(tensors["token_ids"], tensors["sequence"], tensors["position"], tensors["decode"],
                 experts, weights, logits, meta)


# -- checks other commands use ---------------------------------------------------------------------------
def check_trace_matches(trace: Trace, rc) -> None:
    """Raise a one-line MoetoolError unless TRACE was recorded on a model shaped like RC
    (same decoder layers, same MoE layers, same number of experts and top-k)."""
    model_layers = list(rc.moe_layers)
    if trace.num_layers != rc.num_layers or trace.moe_layers != model_layers:
        raise MoetoolError(
            f"the trace is of a model with {trace.num_layers} layers (MoE layers {_short(trace.moe_layers)}), "
            f"this model has {rc.num_layers} (MoE layers {_short(model_layers)})"
        )
    if trace.num_experts != rc.num_experts:
        raise MoetoolError(f"the trace routes over {trace.num_experts} experts per layer, this model has {rc.num_experts}")
    if trace.top_k != rc.top_k:
        raise MoetoolError(f"the trace was recorded with top-{trace.top_k} routing, this model uses top-{rc.top_k}")


def check_trace_matches_model(trace: Trace, model: str, trace_path: str = "the trace") -> None:
    """``check_trace_matches`` against MODEL's config (preset, config.json, checkpoint dir),
    and for a checkpoint, that the trace was recorded on it (moetool.checkpoint.fingerprint)."""
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    source = resolve(model)
    rc = resolve_family(source)
    try:
        check_trace_matches(trace, rc)
    except MoetoolError as exc:
        raise MoetoolError(f"{model}: {exc}") from None
    from moetool.checkpoint.fingerprint import check_trace_of_model

    check_trace_of_model(trace, trace_path, model, rc, source.path if source.kind == "checkpoint" else None)


def _short(layers: list[int]) -> str:
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers)) or "none"


# -- input texts ------------------------------------------------------------------------------------------------
def read_texts(prompts: Sequence[str] = (), file: str | None = None) -> list[str]:
    """--prompt values and/or a --file (plain text: one text per non-empty line; JSONL: the
    ``text`` field of each line). An empty prompt or an empty file is an error."""
    texts: list[str] = []
    for p in prompts:
        if not p or not p.strip():
            raise MoetoolError("empty prompt: give some text to trace")
        texts.append(p)
    if file is not None:
        from moetool.analysis.textfile import read_utf8

        path = Path(file)
        content = read_utf8(path, str(file))
        lines = [(i, line) for i, line in enumerate(content.splitlines(), 1) if line.strip()]
        jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or (lines and lines[0][1].lstrip().startswith("{"))
        for lineno, line in lines:
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MoetoolError(f"{file}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise MoetoolError(f"{file}:{lineno}: expected an object with a string 'text' field")
                if obj["text"].strip():
                    texts.append(obj["text"])
            else:
                texts.append(line)
        if not lines:
            raise MoetoolError(f"{file}: no text in this file")
    if not texts:
        raise MoetoolError("nothing to trace: give --prompt TEXT or --file FILE")
    return texts


# -- recording --------------------------------------------------------------------------------------------
# The forward passes and hooks live in moetool.runtime.executor / moetool.runtime.observers (RoutingRecorder);
# this module turns what they recorded into a Trace.
def _pad_id(loaded) -> int:
    from moetool.runtime.executor import pad_id_of

    return pad_id_of(loaded)


def record_trace(loaded, texts: Sequence[str], max_tokens: int | None = None, batch_size: int = 8,
                 logits: bool = False, generate: int = 0, add_special_tokens: bool = True,
                 observers: Sequence = (), executor_options: dict | None = None) -> Trace:
    """Run LOADED on TEXTS (tokenized as its own tokenizer does, special tokens included) and
    record every MoE layer's routing. ``generate`` > 0 also greedily generates that many tokens
    per text and records their decode steps (``decode`` = 1). OBSERVERS ride along on the same
    forward passes (moetool.runtime.observers)."""
    texts = list(texts)
    if not texts:
        raise MoetoolError("nothing to trace: give at least one text")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise MoetoolError("empty prompt: give some text to trace")
    tok = loaded.tokenizer
    if tok is None:
        raise MoetoolError(f"{loaded.name}: no tokenizer in this checkpoint; cannot trace text")
    ids, total = [], 0
    for t in texts:  # tokenize only as far as --max-tokens reaches: a big file is not read in full
        seq = list(tok(t, add_special_tokens=add_special_tokens)["input_ids"])
        if not seq:
            raise MoetoolError(f"empty prompt: {t[:30]!r} has no tokens")
        ids.append(seq)
        total += len(seq)
        if max_tokens is not None and total >= max_tokens:
            break
    truncated = len(ids) < len(texts)
    options = {"add_special_tokens": add_special_tokens}
    trace = record_token_ids(loaded, ids, texts=texts[: len(ids)], max_tokens=max_tokens, batch_size=batch_size,
                             logits=logits, generate=generate, options=options, observers=observers,
                             executor_options=executor_options)
    if truncated:
        trace.meta["truncated"] = True
    return trace


def record_token_ids(loaded, token_ids: Sequence[Sequence[int]], texts: Sequence[str] | None = None,
                     max_tokens: int | None = None, batch_size: int = 8, logits: bool = False,
                     generate: int = 0, options: dict | None = None, observers: Sequence = (),
                     executor_options: dict | None = None) -> Trace:
    """Like ``record_trace`` from token ids (one list per sequence)."""
    from moetool.runtime.executor import Executor, Hooks
    from moetool.runtime.observers import RoutingRecorder

    if batch_size < 1:
        raise MoetoolError("--batch-size must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise MoetoolError("--max-tokens must be at least 1")
    if generate < 0:
        raise MoetoolError("--generate must be 0 or more")
    seqs = [list(map(int, s)) for s in token_ids]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise MoetoolError("empty prompt: nothing to trace")
    truncated = False
    if max_tokens is not None:  # the cap applies in input order
        kept, left = [], max_tokens
        for s in seqs:
            if left <= 0:
                truncated = True
                break
            if len(s) > left:
                truncated = True
            kept.append(s[:left])
            left -= len(kept[-1])
        seqs = kept
    prompt_total = sum(len(s) for s in seqs)
    decode_budget = 0 if generate == 0 else (generate * len(seqs) if max_tokens is None else max(0, max_tokens - prompt_total))
    left_pad = generate > 0 and decode_budget > 0  # decoding appends on the right: pad on the left

    recorder = RoutingRecorder(loaded, logits)
    opts = dict(executor_options or {})
    if left_pad:
        if getattr(loaded, "layer_reader", None) is not None:
            raise MoetoolError("--generate needs the whole model with a KV cache; it cannot stream (use --no-stream)")
        opts["mode"] = "whole"
    ex = Executor(loaded, batch_size=batch_size, left_pad=left_pad, description="tracing", **opts)
    if not left_pad:
        ex.run(seqs, [recorder, *observers])
    else:
        _generate(ex, recorder, list(observers), seqs, generate, decode_budget, Hooks)

    cols, layer_ids, layer_w, layer_lg = recorder.result()
    srt = np.lexsort((cols["position"], cols["sequence"]))
    layer_ids = {L: v[srt] for L, v in layer_ids.items()}
    layer_w = {L: v[srt] for L, v in layer_w.items()}
    layer_lg = {L: v[srt] for L, v in layer_lg.items()}
    tokens = cols["token_ids"][srt]
    meta = _trace_meta(loaded, texts if texts is not None else [""] * len(seqs), tokens, options or {},
                       recomputed=recorder.recomputed, truncated=truncated, generate=generate,
                       max_tokens=max_tokens, logits=logits)
    return Trace(tokens.astype(np.int32), cols["sequence"][srt].astype(np.int32), cols["position"][srt].astype(np.int32),
                 cols["decode"][srt].astype(np.uint8), layer_ids, layer_w, layer_lg, meta)


def _generate(ex, recorder, observers, seqs, generate: int, budget: int, Hooks) -> None:
    """Prompt forwards with a KV cache, then greedy decoding of each batch: the decode loop on
    top of the executor's forward (whole model; left padding)."""
    from moetool.runtime.progress import open_progress

    batches = ex.make_batches(seqs)
    ex.batches = batches
    hooks = Hooks()
    eos_ids = _eos_ids(ex.loaded)
    prog = open_progress() if ex.progress is None else ex.progress
    task = prog.task("tracing (generating)", sum(b.tokens for b in batches) + budget)
    try:
        with ex.context():
            for o in [recorder, *observers]:
                o.attach(ex, hooks)
            for b in batches:
                out = ex.forward(b, logits=False, use_cache=True)
                for o in [recorder, *observers]:
                    o.batch_end(b, None, None)
                task.advance(b.tokens)
                before = budget
                budget = _decode(ex, out, recorder, b, generate, budget, eos_ids)
                task.advance(before - budget)
    finally:
        hooks.remove()
        ex.current = None
        if ex.progress is None:
            prog.close()


def _decode(ex, out, recorder, batch, steps, budget, eos_ids) -> int:
    """Greedy decoding of up to STEPS tokens per sequence of a left-padded batch, recording
    each generated token's routing when it is fed back. Returns the decode budget left."""
    import torch

    model, device = ex.model, ex.device
    lens = batch.attention_mask.sum(-1)
    B = len(batch.rows)
    cache_kw = "cache" if "cache" in ex.forward_params else "past_key_values"  # renamed in transformers 5.x
    past = _cache_of(out)
    next_tok = out.logits[:, -1, :].argmax(-1).cpu()
    finished = torch.zeros(B, dtype=torch.bool)
    last_pos = (lens - 1).clone()
    attn = batch.attention_mask.clone()
    extra = {"logits_to_keep": 1} if ex._has_logits_to_keep else {}
    for step in range(steps):
        if budget <= 0 or bool(finished.all()):
            break
        active = ~finished
        if int(active.sum()) > budget:  # the --max-tokens cap: record only the first sequences
            idx = active.nonzero().reshape(-1)
            active = torch.zeros(B, dtype=torch.bool)
            active[idx[:budget]] = True
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype)], dim=1)
        last_pos = last_pos + 1
        ex.current = None
        out = model(input_ids=next_tok.reshape(B, 1).to(device), attention_mask=attn.to(device),
                    position_ids=last_pos.reshape(B, 1).to(device), use_cache=True, **{cache_kw: past}, **extra)
        rows = active.nonzero().reshape(-1)
        meta = (batch.rows[rows.numpy()].astype(np.int32), last_pos[rows].numpy().astype(np.int32),
                next_tok[rows].numpy().astype(np.int32), 1)
        recorder.take((batch.index, step + 1), active.reshape(B, 1), meta)
        budget -= int(rows.numel())
        if eos_ids:
            finished |= torch.isin(next_tok, torch.tensor(sorted(eos_ids)))
        past = _cache_of(out)
        next_tok = out.logits[:, -1, :].argmax(-1).cpu()
    return budget


def _cache_of(out):
    """The KV cache a forward returned, under its new name (``cache``) or its old one."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for key in ("cache", "past_key_values"):
        if key in keys:
            return out[key]
    return getattr(out, "past_key_values", None)


def _eos_ids(loaded) -> set[int]:
    ids: set[int] = set()
    gen = getattr(loaded.model, "generation_config", None)
    for cand in (getattr(gen, "eos_token_id", None), getattr(loaded.tokenizer, "eos_token_id", None)):
        if isinstance(cand, int):
            ids.add(cand)
        elif isinstance(cand, (list, tuple)):
            ids.update(int(c) for c in cand)
    return ids


def _trace_meta(loaded, texts, tokens: np.ndarray, options: dict, recomputed: bool, truncated: bool,
                generate: int, max_tokens: int | None, logits: bool) -> dict:
    from moetool import __version__

    rc = loaded.rc
    info = loaded.load_info()
    meta: dict[str, Any] = {
        "model": loaded.name,
        "family": loaded.family.name,
        "num_experts": int(rc.num_experts),
        "zero_experts": rc.zero_experts,
        "top_k": int(rc.top_k),
        "num_layers": int(rc.num_layers),
        "moe_layers": [int(x) for x in rc.moe_layers],
        "texts": _texts_for_metadata(texts),
        "quantization": info["quantization"],
        "weight_bytes": info["weight_bytes"],
        "expert_weight_bytes": info["expert_weight_bytes"],
        "dtype": info["dtype"],
        "devices": info["devices"],
        "streamed": bool(info.get("streamed")),
        "scoring": str(rc.fields.get("scoring", "")),
        "routing": "recomputed-from-logits" if recomputed else "router-output",
        "generate": int(generate),
        "truncated": truncated,
        "logits": logits,
        "options": {**options, "max_tokens": max_tokens},
        "created_by": f"moetool {__version__}",
    }
    if loaded.source.path is not None:  # which model this is (moetool.checkpoint.fingerprint); none for an in-memory model
        from moetool.checkpoint.fingerprint import META_KEY, model_fingerprint

        meta[META_KEY] = model_fingerprint(rc, loaded.source.path)
    if meta["texts"] != list(texts):
        meta["texts_clipped"] = True
    tok = loaded.tokenizer
    if tok is not None and len(tokens) <= TOKEN_TEXTS_LIMIT:
        meta["token_texts"] = [tok.decode([int(t)]) for t in tokens]
    return meta


TEXTS_METADATA_LIMIT = 4 * 2**20  # bytes of input text kept whole in the metadata
TEXT_CLIP = 100


def _texts_for_metadata(texts) -> list[str]:
    """The traced texts, whole while they fit TEXTS_METADATA_LIMIT; else each clipped to its
    first TEXT_CLIP characters (and, past 16 MiB even so, left empty): the safetensors header
    stays small. ``texts_clipped`` in the metadata says so."""
    texts = list(texts)
    if sum(len(t.encode("utf-8")) for t in texts) <= TEXTS_METADATA_LIMIT:
        return texts
    clipped = [t[:TEXT_CLIP] for t in texts]
    if sum(len(t.encode("utf-8")) for t in clipped) > 4 * TEXTS_METADATA_LIMIT:
        return [""] * len(texts)
    return clipped


def trace_model(model: str, texts: Iterable[str], max_tokens: int | None = None, batch_size: int = 8,
                logits: bool = False, generate: int = 0, add_special_tokens: bool = True,
                load_options: dict | None = None) -> tuple[Trace, Any]:
    """Load MODEL with LOAD_OPTIONS (see moetool.runtime.loading.load_model) and record a trace.
    Returns (trace, loaded)."""
    from moetool.runtime.loading import load_model

    texts = list(texts)
    for t in texts:  # fail on bad input before paying for the load
        if not t or not t.strip():
            raise MoetoolError("empty prompt: give some text to trace")
    from moetool.runtime.progress import status

    with status(f"loading {model}"):
        loaded = load_model(model, **(load_options or {}))
    trace = record_trace(loaded, texts, max_tokens=max_tokens, batch_size=batch_size, logits=logits,
                         generate=generate, add_special_tokens=add_special_tokens)
    return trace, loaded
