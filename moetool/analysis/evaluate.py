"""`moetool eval`: perplexity of each model on a text, and how far each model's next-token
distributions are from a reference model's.

The text (a plain file, or JSONL with a ``text`` field; lines joined with newlines) is
tokenized once, with the reference model's tokenizer (the first model's without ``--ref``),
and cut into consecutive windows of ``--seq-len`` tokens; every model sees the same token ids
(tokenizers must agree: checked). In each window every token after the first is predicted
from the tokens before it in the window:

- perplexity = exp(mean negative log-likelihood of the predicted tokens);
- KL = mean over predicted tokens of KL(p_ref || p_model) = sum_v p_ref(v) (log p_ref(v) -
  log p_model(v)), in nats, over the full vocabulary;
- top-1 agreement = fraction of predicted positions where both models' most likely next token
  is the same.

Models are loaded one at a time (``moetool.runtime.loading.load_model``, same options as `trace`); the
reference's log-probabilities are kept in a temporary file (float32, tokens x vocabulary) that
is removed at the end.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from moetool.errors import MoetoolError

MAX_REF_BYTES = 16 * 2**30


def _read_text(file: str) -> str:
    from moetool.analysis.trace import read_texts

    return "\n".join(read_texts((), file))


def _tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from moetool.checkpoint.source import resolve

    src = resolve(model)
    if src.kind != "checkpoint" or src.path is None:
        raise MoetoolError(f"{model}: a {src.kind} has no weights to evaluate; give a checkpoint directory")
    try:
        return AutoTokenizer.from_pretrained(str(src.path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MoetoolError(f"{model}: cannot load its tokenizer ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _encode(tok, text: str) -> list[int]:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum" is expected here
    try:
        return list(tok(text, add_special_tokens=False)["input_ids"])
    finally:
        transformers.logging.set_verbosity(verbosity)


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    out = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return [w for w in out if len(w) >= 2]


def _model_info(loaded) -> dict:
    rc = loaded.rc
    return {"family": loaded.family.name, "num_experts": int(rc.num_experts), "top_k": int(rc.top_k),
            "params": int(sum(p.numel() for p in loaded.model.parameters())), "dtype": loaded.dtype}


def _run_model(loaded, wins, batch_size: int, ref_store, is_ref: bool, on_batch=None, progress=None) -> dict:
    """NLL of every predicted token; with a reference store, KL and top-1 agreement against
    it; with IS_REF, fill the store. The windows run in order through the executor (padding
    id 0, never counted)."""
    from moetool.runtime.executor import Executor
    from moetool.runtime.observers import NextTokenMetrics

    metrics = NextTokenMetrics([len(w) for w in wins], ref_store=ref_store, fill=is_ref, on_batch=on_batch)
    try:
        Executor(loaded, batch_size=batch_size, order="input", pad_id=0, progress=progress,
                 description=f"eval {Path(loaded.name).name}").run(wins, [metrics])
    except MoetoolError as exc:
        if "vocabulary" in str(exc):
            raise MoetoolError(f"{loaded.name}: {exc}") from None
        raise
    return metrics.result()


def evaluate_models(models: list[str], file: str, ref: str | None = None, max_tokens: int | None = None,
                    seq_len: int = 512, batch_size: int = 4, load_options: dict | None = None,
                    progress: bool = True) -> dict:
    """Perplexity of each of MODELS on FILE; with REF, KL(ref || model) and top-1 agreement.
    Returns plain data (see the module docstring)."""
    from moetool.runtime.loading import load_model

    models = list(models)
    if not models:
        raise MoetoolError("give at least one model to evaluate")
    if seq_len < 2:
        raise MoetoolError("--seq-len must be at least 2")
    if batch_size < 1:
        raise MoetoolError("--batch-size must be at least 1")
    if max_tokens is not None and max_tokens < 2:
        raise MoetoolError("--max-tokens must be at least 2")
    load_options = dict(load_options or {})
    text = _read_text(file)
    from moetool.checkpoint.checks import check_model

    for m in dict.fromkeys(([ref] if ref else []) + models):  # every model's weights, before loading any
        check_model(m, bool(load_options.get("allow_pickle")), what="evaluate")
    trc = bool(load_options.get("trust_remote_code"))
    tok_model = ref or models[0]
    tok = _tokenizer(tok_model, trc)
    ids = _encode(tok, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    wins = windows(ids, seq_len)
    if not wins:
        raise MoetoolError(f"{file}: fewer than 2 tokens of text to evaluate on")
    predicted = sum(len(w) - 1 for w in wins)
    for m in models:  # every model must tokenize the text the same way
        if m == tok_model:
            continue
        other = _tokenizer(m, trc)
        probe = text[:4000]
        if _encode(other, probe) != _encode(tok, probe):
            raise MoetoolError(f"{m} tokenizes the text differently from {tok_model}: perplexities and KL would "
                               "not be comparable")

    order = ([ref] if ref else []) + [m for m in models if m != ref]
    results: dict[str, dict] = {}
    tmpdir = tempfile.TemporaryDirectory(prefix="moetool-eval-")
    ref_store = None
    from moetool.runtime.progress import open_progress

    show = None if progress else False  # True: when stderr is a terminal (or --progress)
    bar = open_progress(show)
    try:
        for m in order:
            t0 = time.perf_counter()
            loading = bar.task(f"loading {Path(m).name}", None, unit="")
            loaded = load_model(m, **load_options)
            loading.close()
            is_ref = ref is not None and m == ref
            if is_ref:
                vocab = int(loaded.model.get_output_embeddings().weight.shape[0]) if loaded.model.get_output_embeddings() is not None else int(loaded.model.config.vocab_size)
                need = predicted * vocab * 4
                if need > MAX_REF_BYTES:
                    raise MoetoolError(f"the reference's log-probabilities for {predicted} tokens x {vocab} vocabulary "
                                       f"need {need / 2**30:.1f} GiB of temporary disk; use --max-tokens")
                ref_store = np.lib.format.open_memmap(os.path.join(tmpdir.name, "ref.npy"), mode="w+",
                                                      dtype=np.float32, shape=(predicted, vocab))
            row = {"model": m, **_model_info(loaded)}
            row.update(_run_model(loaded, wins, batch_size, ref_store, is_ref, progress=bar))
            row["is_ref"] = is_ref
            row["seconds"] = round(time.perf_counter() - t0, 3)
            results[m] = row
            del loaded
            gc.collect()
    finally:
        bar.close()
        del ref_store
        tmpdir.cleanup()
    rows = [results[m] for m in order]
    if ref:
        base = results[ref]["perplexity"]
        for r in rows:
            r["perplexity_ratio"] = r["perplexity"] / base
    return {"file": str(file), "tokens": predicted, "text_tokens": len(ids), "seq_len": seq_len,
            "windows": len(wins), "ref": ref, "tokenizer": tok_model, "models": rows}
