"""`moetool distill`: knowledge distillation of a MoE teacher into its dense sibling.

``distill(model, out, files, ...)`` is the one entry point; it returns plain data (the run's
settings, the training curve, held-out evaluations, timings) and writes a checkpoint that
transformers loads without moetool.

Pipeline (see docs/distill.md):

1. refuse what cannot work before loading anything (a family without a dense sibling, an
   existing ``--out`` without ``--force``, unreadable text, inconsistent options);
2. load the teacher (``moetool.runtime.loading.load_model``) and tokenize the text into ``--seq-len``
   blocks;
3. build the student from the teacher's config (``moetool.compression.distill_init``), copy embeddings,
   attention, norms and head, and initialise the MLPs (``--init merge|topk|random``) from
   routing usage measured on the text (or a ``--trace``);
4. train with ``accelerate``: AdamW, linear warm-up then cosine decay, gradient accumulation,
   loss = T^2 KL(teacher_T || student_T) (+ ``--hidden-loss`` W x normalised MSE between the
   two models' hidden states after every layer). Launched with ``accelerate launch`` (or
   torchrun) the same code runs data-parallel (DDP, or FSDP from the accelerate config); only
   the main process writes;
5. optionally the teacher runs once: ``--cache-teacher DIR`` stores its top-K log-probabilities
   per training token (safetensors) and training reads them instead of running it;
6. held-out evaluation (``--eval-file``) at the start, every ``--eval-every`` steps and at the
   end; checkpoints every ``--save-every`` steps and ``--resume`` from the latest;
7. the dense checkpoint (sharded like the teacher), tokenizer, a model card with the training
   curve, written to a temporary directory beside ``--out`` and moved into place at the end.

Data order is a function of (seed, step, micro-batch, process) only, so a resumed run sees the
same batches as an uninterrupted one and one process with ``--grad-accum 2`` sees the same
batches per optimizer step as two processes with ``--grad-accum 1``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError

CACHE_FORMAT = "moetool-distill-teacher-cache"
# held-out KL: exact (the teacher's every log-probability kept) while that takes at most
# EVAL_FULL_BYTES per process, else over the teacher's top EVAL_TOPK tokens plus one lumped bin
EVAL_FULL_BYTES = 1 << 30
EVAL_TOPK = 1024
CHECKPOINT_KEEP = 2


@dataclass
class DistillOptions:
    out: str
    files: list[str]
    intermediate_size: int | None = None
    init: str = "merge"
    trace: str | None = None
    calib_tokens: int = 16384
    steps: int = 100
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    hidden_loss: float = 0.0
    eval_files: list[str] = field(default_factory=list)
    eval_every: int = 0
    eval_tokens: int = 16384
    save_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    cache_teacher: str | None = None
    cache_topk: int = 64
    seed: int = 0
    load_options: dict = field(default_factory=dict)  # moetool.runtime.loading.load_model keyword arguments
    force: bool = False
    progress: bool = True
    accept_foreign_trace: bool = False

    @property
    def warmup_steps(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return max(1, self.steps // 20) if self.steps else 0


# -- checks before anything heavy -----------------------------------------------------------------------
def _read_text(path: str, what: str) -> str:
    from moetool.analysis.textfile import read_utf8

    text = read_utf8(path, f"{what} {path}")
    if not text.strip():
        raise MoetoolError(f"{what} {path}: no text in this file")
    return text


def _checkpoint_dir(opts: DistillOptions) -> Path:
    if opts.checkpoint_dir:
        return Path(opts.checkpoint_dir)
    out = Path(opts.out)
    return out.with_name(out.name + ".checkpoints")


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and (p / "distill_state.json").is_file())
    return steps[-1] if steps else None


def check_options(model: str, opts: DistillOptions):
    """Every check that needs no model: returns (source, rc, sibling spec, texts, eval_texts)."""
    from moetool.compression.distill_init import INIT_METHODS, sibling_spec
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    source = resolve(model)
    rc = resolve_family(source)
    spec = sibling_spec(rc.family)  # refusal (OLMoE, gpt-oss) before anything is loaded
    if source.kind != "checkpoint" or source.path is None:
        raise MoetoolError(f"{model}: a {source.kind} has no weights to distill; give a checkpoint directory "
                           "or a cached Hub id")
    from moetool.checkpoint.checks import check_weights

    check_weights(model, source.path, rc, allow_pickle=bool((opts.load_options or {}).get("allow_pickle")))
    if opts.init not in INIT_METHODS:
        raise MoetoolError(f"unknown --init '{opts.init}' (choose from {', '.join(INIT_METHODS)})")
    for name, value, low in (("--steps", opts.steps, 0), ("--seq-len", opts.seq_len, 2), ("--batch-size", opts.batch_size, 1),
                             ("--grad-accum", opts.grad_accum, 1), ("--cache-topk", opts.cache_topk, 1),
                             ("--eval-every", opts.eval_every, 0), ("--save-every", opts.save_every, 0),
                             ("--calib-tokens", opts.calib_tokens, 1), ("--eval-tokens", opts.eval_tokens, 1)):
        if value < low:
            raise MoetoolError(f"{name} must be at least {low} (got {value})")
    if opts.intermediate_size is not None and opts.intermediate_size < 1:
        raise MoetoolError(f"--intermediate-size must be at least 1 (got {opts.intermediate_size})")
    if opts.warmup is not None and opts.warmup < 0:
        raise MoetoolError(f"--warmup must be 0 or more (got {opts.warmup})")
    if not opts.lr > 0:
        raise MoetoolError(f"--lr must be positive (got {opts.lr})")
    if not opts.temperature > 0:
        raise MoetoolError(f"--temperature must be positive (got {opts.temperature})")
    if opts.hidden_loss < 0:
        raise MoetoolError(f"--hidden-loss must be 0 or more (got {opts.hidden_loss})")
    if opts.hidden_loss > 0 and opts.cache_teacher:
        raise MoetoolError("--hidden-loss needs the teacher's hidden states every step; it cannot be combined "
                           "with --cache-teacher")
    if opts.eval_every and not opts.eval_files:
        raise MoetoolError("--eval-every needs held-out text: give --eval-file")
    if not opts.files:
        raise MoetoolError("give the training text with --file")
    from moetool.checkpoint.outdir import check_disk_space, check_output

    out = check_output(opts.out, [source.path], opts.force)  # exists / moetool's own / writable, before training
    check_disk_space(out.resolve().parent, _student_bytes(rc, opts, source.config))
    if opts.resume and _latest_checkpoint(_checkpoint_dir(opts)) is None:
        raise MoetoolError(f"--resume: no checkpoint in {_checkpoint_dir(opts)}")
    lo = opts.load_options or {}
    if lo.get("stream") and opts.hidden_loss > 0:
        raise MoetoolError("--hidden-loss needs the teacher's hidden states every step; a streamed teacher "
                           "(--stream) runs once, into its top-K cache")
    if lo.get("load_in_4bit") or lo.get("load_in_8bit"):
        raise MoetoolError("the student starts from the teacher's own weights: load the teacher unquantized "
                           "(no --load-in-4bit/--load-in-8bit) to distill")
    if opts.trace:
        from moetool.compression.prune import load_trace_for

        load_trace_for(opts.trace, rc, model, source.path, opts.accept_foreign_trace)  # shapes and fingerprint
    texts = [(f, _read_text(f, "--file")) for f in opts.files]
    eval_texts = [(f, _read_text(f, "--eval-file")) for f in opts.eval_files]
    return source, rc, spec, texts, eval_texts


def _student_bytes(rc, opts: DistillOptions, config: dict) -> int:
    """About what the student's weights take on disk (for the disk-space check before training):
    the teacher's embeddings, attention, norms and head, plus one dense MLP per layer."""
    from moetool.analysis.count import count_config
    from moetool.compression.distill_init import default_width

    roles = count_config(rc)["roles"]
    kept = sum(roles[r]["total"] for r in ("embeddings", "attention", "norms", "lm_head") if r in roles)
    width = opts.intermediate_size or default_width(rc)
    params = kept + int(rc.num_layers) * 3 * int(rc.hidden_size) * int(width)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return params * {"bfloat16": 2, "float16": 2}.get(dtype, 4)


# -- data -------------------------------------------------------------------------------------------------
def _tokenize(tokenizer, texts: list[tuple[str, str]]) -> list[int]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": we cut it into blocks
    try:
        ids: list[int] = []
        eos = getattr(tokenizer, "eos_token_id", None)
        for i, (_name, text) in enumerate(texts):
            if i and isinstance(eos, int):
                ids.append(eos)
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        hf_logging.set_verbosity(verbosity)
    return ids


def _blocks(ids: list[int], seq_len: int, what: str, limit_tokens: int | None = None):
    import torch

    n = len(ids) // seq_len
    if limit_tokens is not None:
        n = min(n, max(1, limit_tokens // seq_len))
    if n < 1:
        raise MoetoolError(f"{what}: {len(ids)} tokens, fewer than one --seq-len block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


class _Order:
    """Which training blocks a (step, micro-batch, process) gets: a fresh seeded permutation of
    all blocks per epoch, consumed in order by global micro-batch index."""

    def __init__(self, n_blocks: int, seed: int, batch: int, grad_accum: int, world: int):
        self.n, self.seed, self.batch, self.ga, self.world = n_blocks, seed, batch, grad_accum, world
        self._perms: dict[int, Any] = {}

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        g = (step * self.ga + micro) * self.world + rank
        start = g * self.batch
        return [int(self._perm(pos // self.n)[pos % self.n]) for pos in range(start, start + self.batch)]

    def epochs(self, steps: int) -> float:
        return steps * self.ga * self.world * self.batch / self.n


# -- losses ------------------------------------------------------------------------------------------------
def kl_full(t_logits, s_logits, temperature: float):
    """Per-token KL(teacher || student) over the whole vocabulary at a temperature."""
    lp = (t_logits.float() / temperature).log_softmax(-1)
    lq = (s_logits.float() / temperature).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def kl_topk(t_vals, t_idx, t_rest, s_logits, temperature: float):
    """Per-token KL(teacher || student) on the teacher's top-k support plus one bin that lumps
    the rest of the vocabulary: a true KL between the two coarsened distributions (a lower
    bound of the full KL, equal to it when k covers the vocabulary)."""
    import torch

    lq_all = (s_logits.float() / temperature).log_softmax(-1)
    idx = t_idx.long()
    lq = lq_all.gather(-1, idx)
    lq_rest = lq_all.scatter(-1, idx, float("-inf")).logsumexp(-1)
    p = t_vals.exp()
    kl = (p * (t_vals - lq)).sum(-1)
    p_rest = t_rest.exp()
    has_rest = p_rest > 0
    safe_t = torch.where(has_rest, t_rest, torch.zeros_like(t_rest))
    safe_q = torch.where(has_rest & torch.isfinite(lq_rest), lq_rest, torch.zeros_like(lq_rest))
    return kl + torch.where(has_rest, p_rest * (safe_t - safe_q), torch.zeros_like(p_rest))


def _hidden_mse(t_hidden, s_hidden):
    """Mean over layers of the MSE between hidden states, normalised by the teacher's mean square."""
    total = 0.0
    pairs = list(zip(t_hidden[1:], s_hidden[1:]))
    for th, sh in pairs:
        th = th.to(sh.device).float()
        total = total + ((sh.float() - th) ** 2).mean() / (th.pow(2).mean() + 1e-8)
    return total / max(1, len(pairs))


def lr_at(step: int, opts: DistillOptions) -> float:
    """Linear warm-up to --lr, then cosine decay to --lr x min_lr_ratio at the last step."""
    w = opts.warmup_steps
    if step < w:
        return opts.lr * (step + 1) / w
    span = max(1, opts.steps - w)
    progress = min(1.0, (step - w) / span)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -- teacher cache ------------------------------------------------------------------------------------------
def _teacher_identity(source, dtype: str) -> dict:
    from moetool.checkpoint.safetensors_header import checkpoint_files

    files = [(p.name, p.stat().st_size) for p in checkpoint_files(source.path)]
    return {"teacher": str(Path(source.path).resolve()), "config": source.config, "files": files, "dtype": dtype}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_digest(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _teacher_forward(teacher, ids, device, hidden: bool = False):
    """The teacher's outputs for IDS; DEVICE is where the teacher takes its input."""
    import torch

    with torch.no_grad():
        out = teacher(input_ids=ids.to(device), output_hidden_states=hidden, use_cache=False)
    return out


def build_teacher_cache(teacher, blocks, used: list[int], opts: DistillOptions, identity: dict, device,
                        progress=None) -> Path:
    """Write (or find) the teacher's top-K cache for the training blocks USED by this run
    (every block of an epoch or more; only those a shorter run reads). Returns its path."""
    import torch
    from safetensors.torch import save_file

    cache_dir = Path(opts.cache_teacher)
    sub = blocks[used]
    key = _digest({**identity, "tokens": _tensor_digest(sub), "k": opts.cache_topk, "t": opts.temperature})[:16]
    path = cache_dir / f"teacher-top{opts.cache_topk}-{key}.safetensors"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    from moetool.runtime.executor import Executor
    from moetool.runtime.observers import TeacherTopK
    from moetool.runtime.progress import NULL

    n, S = sub.shape
    task = progress.add_task("caching teacher top-K", total=n, info="") if progress else None
    topk = TeacherTopK(opts.cache_topk, opts.temperature,
                       on_batch=(lambda k: progress.update(task, advance=k)) if progress else None)
    Executor(teacher, batch_size=max(1, opts.batch_size), order="input", full_mask=False, device=device,
             progress=NULL).run(sub.tolist(), [topk])
    vals, idxs, rests = (list(x) for x in zip(*topk.out))
    meta = {"format": CACHE_FORMAT, "version": "1", "k": str(opts.cache_topk), "temperature": repr(opts.temperature),
            "seq_len": str(S), "blocks": json.dumps(list(map(int, used))), "key": key, "teacher": identity["teacher"],
            "tail": "lumped: rest = log of the teacher's probability mass outside the top-k"}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({"values": torch.cat(vals).contiguous(), "indices": torch.cat(idxs).contiguous(),
               "rest": torch.cat(rests).contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


class _CacheReader:
    def __init__(self, path: Path, used: list[int], seq_len: int):
        from safetensors import safe_open

        self.f = safe_open(str(path), framework="pt")
        meta = self.f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("seq_len") != str(seq_len) \
                or json.loads(meta.get("blocks", "[]")) != list(used):
            raise MoetoolError(f"{path}: not a teacher cache for this text and these settings")
        self.row = {b: i for i, b in enumerate(used)}
        self.vals = self.f.get_slice("values")
        self.idx = self.f.get_slice("indices")
        self.rest = self.f.get_slice("rest")

    def get(self, blocks: list[int]):
        import torch

        rows = [self.row[b] for b in blocks]
        v = torch.cat([self.vals[i:i + 1] for i in rows])
        ix = torch.cat([self.idx[i:i + 1] for i in rows])
        r = torch.cat([self.rest[i:i + 1] for i in rows])
        return v, ix, r


# -- evaluation ---------------------------------------------------------------------------------------------
def eval_topk(vocab: int, tokens: int) -> int | None:
    """How the held-out reference keeps the teacher: None = every log-probability (exact KL),
    while that is at most EVAL_FULL_BYTES; else its top EVAL_TOPK and one lumped bin."""
    return None if tokens * vocab * 4 <= EVAL_FULL_BYTES else EVAL_TOPK


def _eval_reference(teacher, blocks, device, batch: int, k: int | None):
    """Per eval batch, computed once: the teacher's log-probabilities at every predicting
    position (all of them, or top-K + rest), per-block NLL, and argmax."""
    from moetool.runtime.executor import Executor
    from moetool.runtime.observers import TeacherTopK
    from moetool.runtime.progress import NULL

    ref = TeacherTopK(k, reference=True)
    Executor(teacher, batch_size=batch, order="input", full_mask=False, device=device, progress=NULL).run(
        blocks.tolist(), [ref])
    return ref.out


class _StudentEval:
    """Held-out sums of the student against the teacher reference, per eval batch (an observer
    for moetool.runtime.executor): kl, predicted positions, nll, agreement, teacher nll."""

    needs_logits = True

    def __init__(self, ref, valid, device):
        import torch

        self.ref, self.valid, self.device = ref, valid, device
        self.sums = torch.zeros(5, dtype=torch.float64)

    def attach(self, executor, hooks):
        pass

    def layer_end(self, layer):
        return None

    def batch_end(self, batch, layer, logits):
        import torch

        from moetool.runtime.observers import next_token_logprobs

        if logits is None:
            return
        j = batch.index
        ids = batch.input_ids.to(logits.device)
        S = ids.shape[1]
        rows = torch.as_tensor(batch.rows)
        w = self.valid[rows].double()
        v, ix, r, t_nll, t_top1 = self.ref[j]
        lq = next_token_logprobs(logits)
        if ix is None:
            lp = v.to(lq.device)
            kl = (lp.exp() * (lp - lq)).sum(-1)
        else:
            kl = kl_topk(v.to(lq.device), ix.to(lq.device), r.to(lq.device), logits[:, :-1].float(), 1.0)
        kl = kl.sum(-1).double().cpu()
        nll = -lq.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1).double().cpu()
        agree = (lq.argmax(-1) == t_top1.to(lq.device)).sum(-1).double().cpu()
        n = float(w.sum()) * (S - 1)
        self.sums += torch.stack([(kl * w).sum(), torch.tensor(n, dtype=torch.float64), (nll * w).sum(),
                                  (agree * w).sum(), (t_nll * w).sum()])


def _evaluate(student, blocks, valid, ref, device, batch: int, accelerator) -> dict:
    """Held-out metrics of STUDENT against the teacher reference, over the positions that
    predict a token of the block (as `moetool eval` counts). Every process evaluates the same
    number of blocks (FSDP needs every rank in every forward); VALID masks the padding."""
    from moetool.runtime.executor import Executor
    from moetool.runtime.progress import NULL

    was_training = student.training
    student.eval()
    obs = _StudentEval(ref, valid, device)
    try:
        Executor(student, batch_size=batch, order="input", full_mask=False, device=device, progress=NULL).run(
            blocks.tolist(), [obs])
    finally:
        if was_training:
            student.train()
    sums = accelerator.reduce(obs.sums.to(accelerator.device), reduction="sum").cpu()
    kl, n, nll, agree, t_nll = sums.tolist()
    return {"kl": kl / n, "ppl": math.exp(nll / n), "top1": agree / n, "teacher_ppl": math.exp(t_nll / n),
            "tokens": int(n)}


# -- progress ------------------------------------------------------------------------------------------------
class _NoProgress:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True),
                    transient=False)


# -- the run ----------------------------------------------------------------------------------------------------
def distill(model: str, out: str, files: list[str], **kwargs) -> dict:
    """Distill MODEL (a MoE checkpoint) into its dense sibling at OUT. See DistillOptions for
    the keyword arguments. Returns the run as plain data (also written to OUT/distill.json)."""
    opts = DistillOptions(out=str(out), files=list(files), **kwargs)
    source, rc, spec, texts, eval_texts = check_options(model, opts)
    return _run(model, opts, source, rc, spec, texts, eval_texts)


@dataclass
class _Session:
    """What the phases of one distill run share: the options, the teacher, the processes."""

    model: str
    opts: DistillOptions
    source: Any
    rc: Any
    accelerator: Any
    timings: dict = field(default_factory=dict)
    loaded: Any = None  # the teacher (moetool.runtime.loading.LoadedModel); .model is None once cached
    streamed: bool = False
    temporary_cache: bool = False
    resume_from: Path | None = None
    state: dict | None = None  # the resumed checkpoint's distill_state.json

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self):
        return self.accelerator.device


@dataclass
class _HeldOut:
    """This process's share of the held-out blocks and the teacher's reference on them."""

    blocks: Any = None
    valid: Any = None
    topk: int | None = None
    ref: Any = None


def _run(model, opts, source, rc, spec, texts, eval_texts) -> dict:
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from moetool.compression import distill_init as di

    hf_logging.disable_progress_bar()  # moetool shows its own
    t0 = time.perf_counter()
    run = _Session(model, opts, source, rc, Accelerator(cpu=_cpu_distributed()))
    run.resume_from = _latest_checkpoint(_checkpoint_dir(opts)) if opts.resume else None
    _load_teacher(run)
    run.timings["load_s"] = time.perf_counter() - t0
    train_ids, blocks, eval_blocks = _token_blocks(run, texts, eval_texts)
    width = run.opts.intermediate_size or di.default_width(rc)
    cfg = di.student_config(source.config, rc, width)
    student = di.build_student(cfg, run.opts.seed)
    identity = _teacher_identity(source, str((run.opts.load_options or {}).get("dtype", "auto")))
    fingerprint = _run_fingerprint(run, identity, blocks, cfg)
    order = _Order(blocks.shape[0], run.opts.seed, run.opts.batch_size, run.opts.grad_accum, run.world)
    with _progress(run.opts.progress and run.main) as progress:
        init_rows, usage_source = _initialise(run, student, blocks, fingerprint)
        held = _held_out(run, student, eval_blocks)
        cache = _teacher_cache(run, blocks, order, identity, progress)
        student, training = _train(run, student, blocks, order, cache, held, progress,
                                   {"fingerprint": fingerprint, "init_rows": init_rows, "usage_source": usage_source})
    result = {
        "teacher": source.name,
        "teacher_family": rc.family.name,
        "out": str(run.opts.out),
        "student": {
            "model_type": cfg["model_type"], "architectures": cfg["architectures"], "intermediate_size": width,
            "default_intermediate_size": di.default_width(rc),
            "params": int(sum(p.numel() for p in student.parameters())),
        },
        "teacher_streamed": run.streamed,
        "init": {"method": run.opts.init, "usage": usage_source, "layers": init_rows},
        "data": {
            "files": [f for f, _ in texts], "tokens": len(train_ids), "blocks": int(blocks.shape[0]),
            "eval_files": [f for f, _ in eval_texts],
            "eval_tokens": int(eval_blocks.numel()) if eval_blocks is not None else 0,
            "eval_kl": None if eval_blocks is None else (
                "exact (full vocabulary)" if held.topk is None else
                f"over the teacher's top-{held.topk} tokens plus one bin for the rest (a lower bound)"),
        },
        "training": _training_summary(run, order, training),
        "history": training["history"],
        "eval": training["evals"],
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "process_index": run.rank,
    }
    if teacher_params := _teacher_params(run.loaded, source):
        result["teacher_params"] = teacher_params
    _write_output(run.accelerator, student, run.loaded.tokenizer, source, run.opts, result)
    return result


def _load_teacher(run: _Session) -> None:
    """The teacher, frozen, on this process's device (or streamed layer by layer, with a top-K
    cache it runs into once: a streamed teacher cannot run every training step)."""
    from moetool.runtime.loading import load_model, temporary_dir

    opts = run.opts
    run.loaded = load_model(run.model, **(opts.load_options or {}))
    run.streamed = run.loaded.layer_reader is not None
    if run.streamed and opts.hidden_loss > 0:  # streamed by itself (the teacher does not fit)
        raise MoetoolError(f"{run.model}: the teacher does not fit in memory and is streamed one layer at a time; "
                           "--hidden-loss needs its hidden states every step (drop it, or give --no-stream)")
    run.temporary_cache = run.streamed and not opts.cache_teacher
    if run.temporary_cache:
        run.opts = dataclasses.replace(opts, cache_teacher=temporary_dir("moetool-teacher-cache-"))
    teacher = run.loaded.model
    lo = opts.load_options or {}
    if not run.streamed and not lo.get("device_map") and not lo.get("max_memory"):
        teacher.to(run.device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if run.loaded.tokenizer is None:
        raise MoetoolError(f"{run.model}: no tokenizer in this checkpoint; distill needs one to read --file")


def _token_blocks(run: _Session, texts, eval_texts):
    """(training token ids, training blocks [n, seq_len], held-out blocks or None)."""
    tok = run.loaded.tokenizer
    train_ids = _tokenize(tok, texts)
    blocks = _blocks(train_ids, run.opts.seq_len, "--file")
    eval_blocks = None
    if eval_texts:
        eval_blocks = _blocks(_tokenize(tok, eval_texts), run.opts.seq_len, "--eval-file", run.opts.eval_tokens)
    return train_ids, blocks, eval_blocks


def _run_fingerprint(run: _Session, identity: dict, blocks, cfg: dict) -> dict:
    """Everything a resumed run must share with the one it continues."""
    opts = run.opts
    return {
        "teacher": _digest(identity), "data": _tensor_digest(blocks), "student_config": _digest(cfg),
        "init": opts.init, "trace": opts.trace, "calib_tokens": opts.calib_tokens, "seq_len": opts.seq_len,
        "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "processes": run.world, "lr": opts.lr,
        "warmup": opts.warmup_steps, "min_lr_ratio": opts.min_lr_ratio, "weight_decay": opts.weight_decay,
        "max_grad_norm": opts.max_grad_norm, "steps": opts.steps, "temperature": opts.temperature,
        "hidden_loss": opts.hidden_loss, "seed": opts.seed,
        "cache_topk": opts.cache_topk if opts.cache_teacher else None,
    }


def _initialise(run: _Session, student, blocks, fingerprint: dict) -> tuple[list[dict], str | None]:
    """The student's weights from the teacher's (a resumed run takes its rows from the
    checkpoint, whose weights load later). Returns (one row per layer, where usage came from)."""
    import torch

    from moetool.compression import distill_init as di

    t1 = time.perf_counter()
    opts = run.opts
    try:
        if run.resume_from is not None:
            run.state = json.loads((run.resume_from / "distill_state.json").read_text())
            _check_fingerprint(run.state["fingerprint"], fingerprint, run.resume_from)
            return run.state["init_rows"], run.state["usage_source"]
        usage, usage_source = None, None
        if opts.init != "random":
            n_cal = max(1, min(blocks.shape[0], math.ceil(opts.calib_tokens / opts.seq_len)))
            # evenly spread over the text (several files: every one is represented)
            cal_idx = torch.linspace(0, blocks.shape[0] - 1, n_cal).round().long().unique()
            trace = None
            if opts.trace:
                from moetool.analysis.trace import Trace

                trace = Trace.load(opts.trace)
                usage_source = f"trace {opts.trace} ({trace.tokens} tokens)"
            else:
                usage_source = (f"calibration on {len(cal_idx) * opts.seq_len} tokens of --file "
                                f"({len(cal_idx)} blocks spread evenly over it)")
            usage = di.calibrate(run.loaded, blocks[cal_idx].tolist(), batch_size=max(8, opts.batch_size), trace=trace)
        return di.init_student(run.loaded, student, usage, opts.init), usage_source
    finally:
        run.timings["init_s"] = time.perf_counter() - t1


def _held_out(run: _Session, student, eval_blocks) -> _HeldOut:
    """This process's held-out blocks (padded to an equal share with masked repeats) and the
    teacher's reference on them, computed once."""
    import torch

    if eval_blocks is None:
        return _HeldOut()
    n_eval = eval_blocks.shape[0]
    mine = [run.rank + run.world * j for j in range(math.ceil(n_eval / run.world))]
    held = _HeldOut(blocks=eval_blocks[[i if i < n_eval else 0 for i in mine]],
                    valid=torch.tensor([i < n_eval for i in mine]))
    held.topk = eval_topk(int(student.config.vocab_size), held.blocks.numel())
    held.ref = _eval_reference(run.loaded, held.blocks, run.loaded.input_device, run.opts.batch_size, held.topk)
    return held


def _teacher_cache(run: _Session, blocks, order: _Order, identity: dict, progress):
    """With --cache-teacher (or a streamed teacher): the teacher's top-K on every block the run
    will read, built by the main process (the others find it), then the teacher is released."""
    t2 = time.perf_counter()
    opts = run.opts
    if not (opts.cache_teacher and opts.steps > 0):
        run.timings["cache_s"] = time.perf_counter() - t2
        return None
    used = sorted({b for s in range(opts.steps) for m in range(opts.grad_accum) for r in range(run.world)
                   for b in order.indices(s, m, r)})
    t_device = run.loaded.input_device
    if run.main:
        path = build_teacher_cache(run.loaded, blocks, used, opts, identity, t_device, progress)
    run.accelerator.wait_for_everyone()
    if not run.main:  # found, not rebuilt
        path = build_teacher_cache(run.loaded, blocks, used, opts, identity, t_device, None)
    cache = _CacheReader(path, used, opts.seq_len)
    run.loaded.model = None  # the teacher is not needed any more: give its memory to training
    gc.collect()
    run.timings["cache_s"] = time.perf_counter() - t2
    return cache


def _train(run: _Session, student, blocks, order: _Order, cache, held: _HeldOut, progress, saved: dict):
    """The training loop (resumed from run.state when there is one); evaluates at step 0, every
    --eval-every steps and at the end. SAVED: what every checkpoint keeps besides the weights.
    Returns (the prepared student, {history, evals, start_step, train_s})."""
    import torch

    opts, acc = run.opts, run.accelerator
    student.to(run.device)
    student.train()
    decay, no_decay = [], []
    for _name, p in student.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))
    student, optimizer = acc.prepare(student, optimizer)
    t = {"history": [], "evals": [], "start_step": 0, "train_s": 0.0}
    if run.resume_from is not None:
        acc.load_state(str(run.resume_from))
        t.update(start_step=int(run.state["step"]), history=run.state["history"], evals=run.state["evals"])

    def run_eval(step: int):
        if held.blocks is None or any(e["step"] == step for e in t["evals"]):
            return
        te = time.perf_counter()
        ev = _evaluate(student, held.blocks, held.valid, held.ref, run.device, opts.batch_size, acc)
        ev["step"] = step
        t["evals"].append(ev)
        run.timings["eval_s"] = run.timings.get("eval_s", 0.0) + time.perf_counter() - te

    run_eval(t["start_step"])
    task = progress.add_task("distilling", total=opts.steps, completed=t["start_step"], info="")
    for step in range(t["start_step"], opts.steps):
        ts = time.perf_counter()
        rec = _train_step(run, student, optimizer, blocks, order, cache, step)
        t["train_s"] += time.perf_counter() - ts
        t["history"].append(rec)
        info = f"loss {rec['loss']:.4f}  KL {rec['kl']:.4f}"
        if t["evals"]:
            info += f"  held-out KL {t['evals'][-1]['kl']:.4f}"
        progress.update(task, advance=1, info=info)
        done = step + 1
        if opts.eval_every and done % opts.eval_every == 0:
            run_eval(done)
        if opts.save_every and done % opts.save_every == 0 and done < opts.steps:
            _save_checkpoint(acc, _checkpoint_dir(opts), done,
                             {"step": done, "history": t["history"], "evals": t["evals"], **saved})
    run_eval(opts.steps)
    run.timings["train_s"] = t["train_s"]
    return student, t


def _train_step(run: _Session, student, optimizer, blocks, order: _Order, cache, step: int) -> dict:
    """One optimizer step over --grad-accum micro-batches; returns its history row (losses
    averaged over micro-batches and processes)."""
    import torch

    opts, acc, device = run.opts, run.accelerator, run.device
    lr = lr_at(step, opts)
    for group in optimizer.param_groups:
        group["lr"] = lr
    hidden = opts.hidden_loss > 0
    sums = torch.zeros(3, dtype=torch.float64)  # loss, kl, hidden
    for micro in range(opts.grad_accum):
        idx = order.indices(step, micro, run.rank)
        ids = blocks[idx].to(device)
        last = micro == opts.grad_accum - 1
        with acc.no_sync(student) if not last else contextlib.nullcontext():
            s_out = student(input_ids=ids, output_hidden_states=hidden, use_cache=False)
            if cache is not None:
                v, ix, r = cache.get(idx)
                kl = kl_topk(v.to(device), ix.to(device), r.to(device), s_out.logits, opts.temperature).mean()
            else:
                t_out = _teacher_forward(run.loaded.model, ids, run.loaded.input_device, hidden=hidden)
                kl = kl_full(t_out.logits.to(device), s_out.logits, opts.temperature).mean()
            loss = kl * opts.temperature ** 2
            h = torch.zeros((), device=device)
            if hidden:
                h = _hidden_mse(t_out.hidden_states, s_out.hidden_states)
                loss = loss + opts.hidden_loss * h
            acc.backward(loss / opts.grad_accum)
        sums += torch.tensor([loss.item(), kl.item(), float(h)], dtype=torch.float64)
    if opts.max_grad_norm:
        acc.clip_grad_norm_(student.parameters(), opts.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums = acc.reduce(sums.to(device), reduction="mean").cpu() / opts.grad_accum
    rec = {"step": step + 1, "loss": sums[0].item(), "kl": sums[1].item(), "lr": lr}
    if hidden:
        rec["hidden_mse"] = sums[2].item()
    return rec


def _training_summary(run: _Session, order: _Order, t: dict) -> dict:
    opts = run.opts
    tokens_per_step = opts.batch_size * opts.grad_accum * run.world * opts.seq_len
    steps_run = opts.steps - t["start_step"]
    return {
        "steps": opts.steps, "resumed_from_step": t["start_step"] if run.resume_from is not None else None,
        "seq_len": opts.seq_len, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum,
        "processes": run.world, "tokens_per_step": tokens_per_step,
        "epochs": round(order.epochs(opts.steps), 3), "lr": opts.lr, "warmup": opts.warmup_steps,
        "min_lr_ratio": opts.min_lr_ratio, "weight_decay": opts.weight_decay, "temperature": opts.temperature,
        "hidden_loss": opts.hidden_loss, "seed": opts.seed,
        "teacher_cache": None if not opts.cache_teacher else {
            "dir": opts.cache_teacher, "topk": opts.cache_topk, "temporary": run.temporary_cache,
            "kl": "top-k support plus one lumped bin for the rest of the vocabulary"},
        "tokens_per_second": (steps_run * tokens_per_step / t["train_s"]) if t["train_s"] > 0 else None,
        "distributed": str(run.accelerator.distributed_type).split(".")[-1],
    }


def _cpu_distributed() -> bool:
    """accelerate runs several processes on the CPU (gloo) only when told `cpu=True`: do so
    when launched by torchrun / accelerate with no GPU here."""
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _teacher_params(loaded, source) -> int | None:
    try:
        from moetool.analysis.params import count_params

        return int(count_params(str(source.path))["total"])
    except Exception:  # counting is a nicety for the model card
        return None


def _check_fingerprint(saved: dict, now: dict, where: Path) -> None:
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise MoetoolError(f"--resume: the checkpoint in {where} was made with a different {key} "
                               f"({saved.get(key)!r}, now {now.get(key)!r}); use the same settings or another "
                               "--checkpoint-dir")


def _save_checkpoint(accelerator, ckpt_dir: Path, step: int, state: dict) -> None:
    """Every process takes part (FSDP gathers); the main one writes state and publishes the
    directory atomically, keeping the latest CHECKPOINT_KEEP."""
    tmp = ckpt_dir / f".step-{step:07d}.tmp"
    final = ckpt_dir / f"step-{step:07d}"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "distill_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        olds = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in olds[:-CHECKPOINT_KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _shard_size(source) -> int:
    from moetool.checkpoint.safetensors_header import checkpoint_files

    sizes = [p.stat().st_size for p in checkpoint_files(source.path)]
    return max(sizes) if len(sizes) > 1 else 50 * 10**9


def _save_dtype(source):
    import torch

    name = source.config.get("dtype") or source.config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _write_output(accelerator, student, tokenizer, source, opts: DistillOptions, result: dict) -> None:
    """Main process: write everything to a temporary directory beside --out, then move it in."""
    state_dict = accelerator.get_state_dict(student)  # every process (FSDP gathers)
    if accelerator.is_main_process:
        from moetool.checkpoint.outdir import atomic_output_dir, marker

        out = Path(opts.out)
        with atomic_output_dir(out, opts.force, marker("distill", source=str(source.name))) as tmp:
            unwrapped = accelerator.unwrap_model(student)
            dtype = _save_dtype(source)
            state_dict = {k: v.detach().to("cpu", dtype) for k, v in state_dict.items()}
            unwrapped.config.dtype = dtype
            unwrapped.save_pretrained(str(tmp), state_dict=state_dict, max_shard_size=_shard_size(source))
            tokenizer.save_pretrained(str(tmp))
            gen = Path(source.path) / "generation_config.json"
            if gen.is_file():
                shutil.copyfile(gen, tmp / "generation_config.json")
            from moetool.compression.distill_card import model_card, plot_curve

            has_plot = plot_curve(result, tmp / "training_curve.png")
            (tmp / "README.md").write_text(model_card(result, has_plot))
            (tmp / "distill.json").write_text(json.dumps(result, indent=1, default=str))
    accelerator.wait_for_everyone()
