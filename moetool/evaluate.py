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

Models are loaded one at a time (``moetool.loading.load_model``, same options as `trace`); the
reference's log-probabilities are kept in a temporary file (float32, tokens x vocabulary) that
is removed at the end.
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from moetool.errors import MoetoolError

MAX_REF_BYTES = 16 * 2**30


def _read_text(file: str) -> str:
    from moetool.trace import read_texts

    return "\n".join(read_texts((), file))


def _tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from moetool.source import resolve

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


def _batches(wins: list[list[int]], batch_size: int, pad_id: int):
    import torch

    for start in range(0, len(wins), batch_size):
        chunk = wins[start:start + batch_size]
        S = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), S), dtype=torch.long)
        for r, w in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
        yield start, chunk, ids, mask


def _model_info(loaded) -> dict:
    rc = loaded.rc
    return {"family": loaded.family.name, "num_experts": int(rc.num_experts), "top_k": int(rc.top_k),
            "params": int(sum(p.numel() for p in loaded.model.parameters())), "dtype": loaded.dtype}


def _run_model(loaded, wins, batch_size: int, ref_store, is_ref: bool, on_batch=None) -> dict:
    """NLL of every predicted token; with a reference store, KL and top-1 agreement against
    it; with IS_REF, fill the store."""
    import torch

    device = loaded.input_device
    model = loaded.model
    nll_sum, count, kl_sum, agree = 0.0, 0, 0.0, 0
    offsets = np.cumsum([0] + [len(w) - 1 for w in wins])
    with torch.inference_mode():
        for start, chunk, ids, mask in _batches(wins, batch_size, 0):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
            if ref_store is not None and logp.shape[-1] != ref_store.shape[1]:
                raise MoetoolError(f"{loaded.name}: its vocabulary has {logp.shape[-1]} entries, the reference's "
                                   f"{ref_store.shape[1]}: next-token distributions cannot be compared")
            for r, w in enumerate(chunk):
                n = len(w) - 1
                lp = logp[r, :n]
                target = torch.tensor(w[1:])
                nll_sum += float(-lp.gather(1, target[:, None]).sum())
                count += n
                a, b = offsets[start + r], offsets[start + r] + n
                if is_ref and ref_store is not None:
                    ref_store[a:b] = lp.numpy()
                elif ref_store is not None:
                    ref = torch.from_numpy(np.asarray(ref_store[a:b]))
                    p = ref.exp()
                    kl = (p * (ref - lp)).sum(dim=-1)
                    kl_sum += float(kl.double().sum())
                    agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
            if on_batch:
                on_batch(len(chunk))
    out = {"nll": nll_sum / count, "perplexity": math.exp(nll_sum / count), "tokens": count}
    if ref_store is not None and not is_ref:
        out["kl"] = kl_sum / count
        out["top1_agreement"] = agree / count
    elif is_ref:
        out["kl"] = 0.0
        out["top1_agreement"] = 1.0
    return out


def evaluate_models(models: list[str], file: str, ref: str | None = None, max_tokens: int | None = None,
                    seq_len: int = 512, batch_size: int = 4, load_options: dict | None = None,
                    progress: bool = True) -> dict:
    """Perplexity of each of MODELS on FILE; with REF, KL(ref || model) and top-1 agreement.
    Returns plain data (see the module docstring)."""
    from moetool.loading import load_model

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
    from moetool.checks import check_model

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
    bar, task = _progress(progress, len(order) * len(wins))
    try:
        for m in order:
            t0 = time.perf_counter()
            if bar is not None:
                bar.update(task, description=f"eval {Path(m).name}")
            loaded = load_model(m, **load_options)
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
            row.update(_run_model(loaded, wins, batch_size, ref_store, is_ref,
                                  on_batch=(lambda n: bar.advance(task, n)) if bar is not None else None))
            row["is_ref"] = is_ref
            row["seconds"] = round(time.perf_counter() - t0, 3)
            results[m] = row
            del loaded
            gc.collect()
    finally:
        if bar is not None:
            bar.stop()
        del ref_store
        tmpdir.cleanup()
    rows = [results[m] for m in order]
    if ref:
        base = results[ref]["perplexity"]
        for r in rows:
            r["perplexity_ratio"] = r["perplexity"] / base
    return {"file": str(file), "tokens": predicted, "text_tokens": len(ids), "seq_len": seq_len,
            "windows": len(wins), "ref": ref, "tokenizer": tok_model, "models": rows}


def _progress(enabled: bool, total: int):
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    con = Console(stderr=True)
    if not con.is_terminal:
        return None, None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=con, transient=True)
    bar.start()
    return bar, bar.add_task("eval", total=total)
