"""Quality of expert pruning and merging on the trained fixtures, and docs/compression.md.

For each trained model (fixtures/trained-mixtral, fixtures/trained-deepseek-v3) and each
compression level (25% and 50% of the routed experts removed):

- prune by frequency, weight and REAP, calibrated on the train split (fixtures/corpus/train-*),
- prune at random with several seeds (the baseline),
- merge to the same expert count (router / output / weight similarity, and router + --align),
- heal the REAP, frequency, random and router + align checkpoints (`moetool heal`), and, as the
  obvious alternative, distil the REAP and merge ones end to end on the same tokens,

then evaluate every checkpoint with `moetool eval`'s library on the held-out split
(fixtures/corpus/heldout-{prose,code}.txt): perplexity, and KL(original || compressed) and top-1
agreement against the original model. Every checkpoint is written by the same library calls the
commands use (moetool.compression.prune.prune_checkpoint, moetool.compression.merge.merge_checkpoint).

    python bench/quality_compression.py            # everything, writes docs/compression.md
    python bench/quality_compression.py --quick    # one model, 50% only, fewer tokens (prints)
    python bench/quality_compression.py --heal-only   # only the healing section (heal vs distillation)

Work files go to bench/work/quality/ (git-ignored) and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "fixtures" / "corpus"
WORK = ROOT / "bench" / "work" / "quality"
DOC = ROOT / "docs" / "compression.md"
DOC_SEP = "\n\f\n"  # documents in the corpus files are separated by a form-feed line
MODELS = ("trained-mixtral", "trained-deepseek-v3")
PRUNE_METHODS = ("frequency", "weight", "reap")
MERGES = (("router", False), ("output", False), ("weight", False), ("router", True))


def calibration_file(path: Path, chunk_chars: int = 1200, seed: int = 0) -> Path:
    """JSONL of train-split chunks (documents cut at line boundaries), prose and code
    interleaved, in a seeded random order of the chunks, so that the first N tokens (what
    --max-tokens keeps) are a sample of the whole train split rather than its first few
    documents (docs/heal.md: healing generalises far better from such a sample)."""
    import random

    chunks = {}
    for domain in ("prose", "code"):
        text = (CORPUS / f"train-{domain}.txt").read_text()
        out = []
        for doc in text.split(DOC_SEP):
            cur = ""
            for line in doc.splitlines(keepends=True):
                if cur and len(cur) + len(line) > chunk_chars:
                    out.append(cur)
                    cur = ""
                cur += line
            if cur.strip():
                out.append(cur)
        chunks[domain] = [c for c in out if c.strip()]
        random.Random(seed).shuffle(chunks[domain])
    with open(path, "w") as fh:
        for a, b in zip(chunks["prose"], chunks["code"]):
            fh.write(json.dumps({"text": a}) + "\n")
            fh.write(json.dumps({"text": b}) + "\n")
    return path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(model: str, ratios, seeds, calib: Path, calib_tokens: int, work: Path, prune_methods=PRUNE_METHODS,
          merges=MERGES) -> list[dict]:
    """Every compressed checkpoint of MODEL: [{label, method, ratio, seed, path, experts}]."""
    from moetool.compression.merge import merge_checkpoint
    from moetool.compression.prune import prune_checkpoint
    from moetool.analysis.trace import read_texts, trace_model

    src = str(ROOT / "fixtures" / model)
    trace, loaded = trace_model(src, read_texts((), str(calib)), max_tokens=calib_tokens, logits=True)
    E = int(loaded.rc.num_experts)
    del loaded
    trace_path = work / f"{model}.trace"
    trace.save(trace_path)
    made = []
    for ratio in ratios:
        keep = E - round(ratio * E)
        for by in prune_methods:
            out = work / f"{model}-{ratio}-{by}"
            t0 = time.perf_counter()
            if by == "reap":  # REAP needs expert outputs: calibrate on the text itself
                prune_checkpoint(src, str(out), keep=keep, by=by, file=str(calib), max_tokens=calib_tokens,
                                 progress=False)
            else:
                prune_checkpoint(src, str(out), keep=keep, by=by, trace=str(trace_path), progress=False)
            _log(f"  {out.name} ({time.perf_counter() - t0:.1f} s)")
            made.append({"label": f"prune {by}", "kind": "prune", "method": by, "ratio": ratio, "path": str(out),
                         "experts": keep})
        for seed in seeds:
            out = work / f"{model}-{ratio}-random{seed}"
            prune_checkpoint(src, str(out), keep=keep, by="random", seed=seed, progress=False)
            made.append({"label": "prune random", "kind": "prune", "method": "random", "seed": seed, "ratio": ratio,
                         "path": str(out), "experts": keep})
        for sim, align in merges:
            name = f"merge {sim}" + (" + align" if align else "")
            out = work / f"{model}-{ratio}-merge-{sim}{'-align' if align else ''}"
            t0 = time.perf_counter()
            if sim == "output":
                merge_checkpoint(src, str(out), keep, similarity=sim, file=str(calib), max_tokens=calib_tokens,
                                 align=align, progress=False)
            else:
                merge_checkpoint(src, str(out), keep, similarity=sim, trace=str(trace_path), align=align,
                                 progress=False)
            _log(f"  {out.name} ({time.perf_counter() - t0:.1f} s)")
            made.append({"label": name, "kind": "merge", "method": name, "ratio": ratio, "path": str(out),
                         "experts": keep})
    return made


def evaluate(model: str, made: list[dict], eval_tokens: int, seq_len: int) -> dict:
    """{domain: {path: row}} from moetool.analysis.evaluate for the original and every checkpoint."""
    from moetool.analysis.evaluate import evaluate_models

    src = str(ROOT / "fixtures" / model)
    out = {}
    for domain in ("prose", "code"):
        t0 = time.perf_counter()
        res = evaluate_models([m["path"] for m in made], str(CORPUS / f"heldout-{domain}.txt"), ref=src,
                              max_tokens=eval_tokens, seq_len=seq_len, batch_size=32, progress=False)
        out[domain] = {r["model"]: r for r in res["models"]}
        out[domain]["_tokens"] = res["tokens"]
        _log(f"  eval {domain}: {len(made) + 1} models, {res['tokens']} tokens ({time.perf_counter() - t0:.0f} s)")
    return out


def _metrics(ev: dict, path: str) -> dict:
    """Perplexity per held-out file and on both, KL and top-1 agreement over both."""
    n = {d: ev[d]["_tokens"] for d in ("prose", "code")}
    nll = sum(ev[d][path]["nll"] * n[d] for d in n) / sum(n.values())
    return {"ppl_prose": ev["prose"][path]["perplexity"], "ppl_code": ev["code"][path]["perplexity"],
            "ppl": math.exp(nll),
            "kl": sum(ev[d][path]["kl"] * n[d] for d in n) / sum(n.values()),
            "top1": sum(ev[d][path]["top1_agreement"] * n[d] for d in n) / sum(n.values())}


def summarize(model: str, made: list[dict], ev: dict) -> list[dict]:
    """One row per (ratio, method): perplexities, KL, agreement (random: mean and std over seeds)."""
    src = str(ROOT / "fixtures" / model)

    def metrics(path):
        return _metrics(ev, path)

    rows = [{"model": model, "ratio": 0.0, "method": "original", "experts": None, **metrics(src)}]
    groups: dict[tuple, list[dict]] = {}
    for m in made:
        groups.setdefault((m["ratio"], m["label"]), []).append(m)
    for (ratio, label), ms in groups.items():
        ms_metrics = [metrics(m["path"]) for m in ms]
        row = {"model": model, "ratio": ratio, "method": label, "experts": ms[0]["experts"], "n": len(ms)}
        for key in ms_metrics[0]:
            vals = [x[key] for x in ms_metrics]
            row[key] = statistics.fmean(vals)
            if len(vals) > 1:
                row[key + "_std"] = statistics.stdev(vals)
        rows.append(row)
    return rows


def _fixture_rc(model: str):
    """The resolved family config of fixtures/MODEL (from its config.json)."""
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    return resolve_family(resolve(str(ROOT / "fixtures" / model)))


def _describe(model: str) -> str:
    rc = _fixture_rc(model)
    f = rc.fields
    text = f"{f['num_experts']} experts, top-{f['top_k']}, {len(rc.moe_layers)} MoE layers"
    if int(f.get("n_group") or 1) > 1:
        text += f" in {f['n_group']} routing groups (top-{f['top_k']} of the best {f['topk_group']} groups)"
    if int(f.get("num_shared_experts") or 0):
        text += f", {f['num_shared_experts']} shared expert"
    return text


def markdown(rows: list[dict], meta: dict) -> str:
    half = int(_fixture_rc("trained-mixtral").fields["num_experts"]) // 2  # the example commands: 50%
    lines = [
        "# Compression quality: pruning vs merging experts",
        "",
        "Measured by [`bench/quality_compression.py`](../bench/quality_compression.py) (re-run it to regenerate this page)",
        f"on {meta['date']}, {meta['machine']}; {meta['seconds']:.0f} s in all.",
        "",
        f"Models: the trained fixtures `fixtures/trained-mixtral` ({_describe('trained-mixtral')}) and",
        f"`fixtures/trained-deepseek-v3` ({_describe('trained-deepseek-v3')}). Calibration: "
        f"{meta['calib_tokens']:,} tokens of the train split (`fixtures/corpus/train-{{prose,code}}.txt`,"
        " interleaved), traced once (`--trace`, with router logits) for frequency, weight and router",
        "similarity; REAP and output similarity run the calibration text themselves (`--file`).",
        f"Evaluation: the first {meta['eval_tokens']:,} tokens of each held-out file (`fixtures/corpus/heldout-prose.txt`,",
        f"`heldout-code.txt`) in windows of {meta['seq_len']} tokens (the training length). `ppl` is the",
        "perplexity on both held-out files together; KL(original || compressed) in nats per token and",
        "top-1 agreement are against the uncompressed model, over both files. Random pruning: mean ± std",
        f"over seeds {', '.join(map(str, meta['seeds']))}.",
        "",
        "Each command behind a row, e.g. for trained-mixtral at 50%:",
        "",
        "```",
        "moetool trace fixtures/trained-mixtral --file calib.jsonl --max-tokens "
        f"{meta['calib_tokens']} --logits --out calib.trace",
        f"moetool prune fixtures/trained-mixtral --keep {half} --by frequency --trace calib.trace --out pruned-frequency",
        f"moetool prune fixtures/trained-mixtral --keep {half} --by reap --file calib.jsonl --max-tokens {meta['calib_tokens']} --out pruned-reap",
        f"moetool prune fixtures/trained-mixtral --keep {half} --by random --seed 0 --out pruned-random0",
        f"moetool merge-experts fixtures/trained-mixtral --to {half} --similarity router --trace calib.trace --out merged-router",
        f"moetool eval pruned-* merged-* --ref fixtures/trained-mixtral --file fixtures/corpus/heldout-prose.txt "
        f"--max-tokens {meta['eval_tokens']} --seq-len {meta['seq_len']}",
        "```",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model}", "",
                  "| removed | experts left | method | ppl (both) | ppl prose | ppl code | KL | top-1 agree | beats random? |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        mrows = [r for r in rows if r["model"] == model]
        for r in mrows:
            if r["method"] == "original":
                lines.append(f"| 0% | all | original | {r['ppl']:.2f} | {r['ppl_prose']:.2f} | {r['ppl_code']:.2f} "
                             "| 0 | 100% | |")
                continue
            rnd = next(x for x in mrows if x["ratio"] == r["ratio"] and x["method"] == "prune random")

            def cell(key, fmt):
                v = fmt.format(r[key])
                return v + (" ± " + fmt.format(r[key + "_std"]) if key + "_std" in r else "")

            beats = "" if r["method"] == "prune random" else ("yes" if r["ppl"] < rnd["ppl"] else "**no**")
            lines.append(f"| {r['ratio']:.0%} | {r['experts']} | {r['method']} | {cell('ppl', '{:.2f}')} | "
                         f"{cell('ppl_prose', '{:.2f}')} | {cell('ppl_code', '{:.2f}')} | {cell('kl', '{:.3f}')} | "
                         f"{cell('top1', '{:.1%}')} | {beats} |")
        lines.append("")
    if meta.get("importance"):
        lines += importance_markdown(meta["importance"], meta["calib_tokens"])
    lines += ["## Reading the tables", "",
              "- *beats random?* compares the row's `ppl (both)` with the mean of the random-pruning seeds at the",
              "  same level.",
              "- Merged checkpoints have exactly the size of the pruned ones (same expert count and shapes); the",
              "  merge rule (usage-weighted averaging, router row = the same average of the group's rows) is",
              "  described in [merge-experts.md](merge-experts.md).",
              ""]
    return "\n".join(lines)


def _spearman(a, b) -> float:
    import numpy as np

    ra, rb = (np.argsort(np.argsort(x, kind="stable")).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def importance(model: str, calib: Path, calib_tokens: int, tokens_per_domain: int = 4096, seq_len: int = 64) -> dict:
    """Per MoE layer: each expert's importance -- KL(original || model with that one expert masked
    out of routing) on held-out text -- and the Spearman rank correlation of each pruning score
    (frequency, weight, REAP, from the same calibration as the pruning) with it. A score that
    ranks experts like their importance keeps the ones that matter."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moetool.compression.prune import gather_stats

    sys.path.insert(0, str(ROOT / "tests"))
    from oracles import routing_mask  # the reference masking the exactness tests use

    src = str(ROOT / "fixtures" / model)
    rc = _fixture_rc(model)
    E = int(rc.fields["num_experts"])
    stats = gather_stats(src, rc, None, str(calib), calib_tokens, 8, None, reap=True, what="REAP scores")
    net = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    wins = []
    for domain in ("prose", "code"):
        ids: list[int] = []
        for doc in (CORPUS / f"heldout-{domain}.txt").read_text().split(DOC_SEP):
            ids += [tok.bos_token_id, *tok(doc.strip("\n"), add_special_tokens=False)["input_ids"], tok.eos_token_id]
            if len(ids) >= tokens_per_domain:
                break
        n = tokens_per_domain // seq_len
        wins.append(torch.tensor(ids[: n * seq_len]).view(n, seq_len))
    wins = torch.cat(wins)
    with torch.no_grad():
        ref = F.log_softmax(net(input_ids=wins).logits.float(), -1)
    layers = {}
    for L in rc.moe_layers:
        imp = []
        for e in range(E):
            with torch.no_grad(), routing_mask(net, {L: [x for x in range(E) if x != e]}):
                lp = F.log_softmax(net(input_ids=wins).logits.float(), -1)
            imp.append(float((ref.exp() * (ref - lp)).sum(-1).mean()))
        layers[L] = {"importance": imp, **{by: _spearman(stats.score(by, L), imp) for by in PRUNE_METHODS}}
        _log(f"  importance layer {L}: " + ", ".join(f"{by} {layers[L][by]:+.2f}" for by in PRUNE_METHODS))
    return {"layers": layers, "tokens": int(wins.numel())}


def importance_markdown(imp: dict, calib_tokens: int) -> list[str]:
    lines = ["## Which experts matter, and which scores find them", "",
             "Importance of an expert: KL(original || original with only that expert masked out of routing), in",
             f"nats per token, on the first {next(iter(imp.values()))['tokens'] // 2:,} tokens of each held-out file. "
             "The last three columns are the Spearman",
             "rank correlation of each pruning score (from the same "
             f"{calib_tokens:,}-token calibration) with that importance: 1 = the score",
             "ranks experts exactly by importance, 0 = unrelated, negative = it would keep the least important.",
             "", "| model | layer | importance min | median | max | max/min | frequency | weight | REAP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    import statistics as st

    for model, res in imp.items():
        for L, r in res["layers"].items():
            v = r["importance"]
            lines.append(f"| {model} | {L} | {min(v):.4f} | {st.median(v):.4f} | {max(v):.4f} | "
                         f"{max(v) / max(min(v), 1e-12):.0f}x | {r['frequency']:+.2f} | {r['weight']:+.2f} | "
                         f"{r['reap']:+.2f} |")
        means = {by: st.mean(r[by] for r in res["layers"].values()) for by in PRUNE_METHODS}
        lines.append(f"| {model} | mean | | | | | {means['frequency']:+.2f} | {means['weight']:+.2f} | "
                     f"{means['reap']:+.2f} |")
    lines.append("")
    return lines



# -- healing ------------------------------------------------------------------------------------------------
HEAL_LABELS = ("prune reap", "prune frequency", "prune random", "merge router + align")
HEAL_SEEDS = (0,)  # random pruning: the seeds that are healed too
DISTILL_LABELS = ("prune reap", "merge router + align")  # the end-to-end baseline runs on these rows
DISTILL_STEPS = 200
HEAL_START, HEAL_END = "<!-- heal: regenerated by bench/quality_compression.py -->", "<!-- /heal -->"


def heal_all(model: str, made: list[dict], calib: Path, calib_tokens: int, distill_ratios=(0.5,),
             distill_labels=DISTILL_LABELS) -> None:
    """Heal every checkpoint of MADE whose label is in HEAL_LABELS (random: seeds HEAL_SEEDS) with
    `moetool heal`'s library call on the calibration text, and distil the DISTILL_LABELS ones at
    DISTILL_RATIOS end to end on the same tokens; paths and seconds go into each entry."""
    from moetool.compression.heal import heal_checkpoint

    src = str(ROOT / "fixtures" / model)
    for m in made:
        if m["label"] not in HEAL_LABELS or ("seed" in m and m["seed"] not in HEAL_SEEDS):
            continue
        out = m["path"] + "-healed"
        t0 = time.perf_counter()
        res = heal_checkpoint(m["path"], src, str(calib), out, max_tokens=calib_tokens, progress=False)
        m["healed"], m["heal_seconds"] = out, time.perf_counter() - t0
        m["heal_fit_seconds"] = res["fit_seconds"]
        _log(f"  {Path(out).name} ({m['heal_seconds']:.1f} s)")
        if m["label"] in distill_labels and m["ratio"] in distill_ratios:
            out = m["path"] + "-distilled"
            res = distill_baseline(src, m["path"], out, calib, calib_tokens)
            m["distilled"], m["distill_seconds"] = out, res["seconds"]
            _log(f"  {Path(out).name} ({m['distill_seconds']:.1f} s)")


def distill_baseline(src: str, compressed: str, out: str, calib, calib_tokens: int, steps: int = DISTILL_STEPS,
                     lr: float = 1e-3, batch_size: int = 8) -> dict:
    """The obvious alternative to healing: a short end-to-end distillation of COMPRESSED against
    SRC on the same calibration tokens. Trainable: what heal may change (the router rows
    and biases, every routed-expert weight, the shared expert's down projection), AdamW at LR for STEPS steps over the
    calibration batches in turn, loss = KL(original || compressed) per real token
    (moetool.compression.distill.kl_full). Written with heal's writer (only those tensors change)."""
    import torch

    from moetool.compression.distill import kl_full
    from moetool.compression.heal import (calibration_ids, healed_values, make_batches, shared_down, shared_module,
                                          write_healed, write_plan)
    from moetool.runtime.loading import load_model, moe_blocks
    from moetool.compression.surgery import Checkpoint, read_provenance
    from moetool.analysis.trace import _pad_id, read_texts

    t0 = time.perf_counter()
    teacher = load_model(src, dtype="float32")
    student = load_model(compressed, dtype="float32")
    ckpt = Checkpoint(compressed)
    plan = write_plan(ckpt, student)
    seqs = calibration_ids(student.tokenizer, read_texts((), str(calib)), calib_tokens)
    batches = make_batches(seqs, batch_size, _pad_id(student))
    with torch.no_grad():
        cached = [teacher.model(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]
    del teacher
    params = []
    for p in student.model.parameters():
        p.requires_grad_(False)
    hidden = int(student.rc.fields["hidden_size"])
    for _L, block, router, experts in moe_blocks(student):  # what heal may change
        params += list(router.parameters()) + list(experts.parameters())
        lin = shared_down(shared_module(student, block), hidden)
        params += list(lin.parameters()) if lin is not None else []
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    student.model.train()
    for step in range(steps):
        b = step % len(batches)
        ids, mask = batches[b]
        logits = student.model(input_ids=ids, attention_mask=mask).logits
        valid = mask.bool()
        loss = kl_full(cached[b][valid], logits[valid], 1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.model.eval()
    seconds = time.perf_counter() - t0
    prov = {**(read_provenance(compressed) or {}), "method": "distill-baseline"}
    card = f"# distilled baseline\n\n{compressed} distilled end to end against {src}: {steps} steps, lr {lr}.\n"
    write_healed(ckpt, healed_values(plan, student), Path(out), True, card, prov)
    return {"seconds": seconds, "steps": steps, "tokens": sum(len(s) for s in seqs)}


def heal_rows(model: str, made: list[dict], ev: dict) -> list[dict]:
    """Per (ratio, label) of the healed checkpoints: before / healed / distilled metrics and
    seconds (random: means over the healed seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for m in made:
        if m.get("healed"):
            groups.setdefault((m["ratio"], m["label"]), []).append(m)
    rows = []
    for (ratio, label), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], HEAL_LABELS.index(kv[0][1]))):
        row = {"model": model, "ratio": ratio, "method": label, "experts": ms[0]["experts"], "n": len(ms),
               "seeds": [m["seed"] for m in ms if "seed" in m]}
        for what, key in (("before", "path"), ("healed", "healed"), ("distilled", "distilled")):
            vals = [_metrics(ev, m[key]) for m in ms if m.get(key)]
            if vals:
                row[what] = {k: statistics.fmean(v[k] for v in vals) for k in vals[0]}
        row["heal_seconds"] = statistics.fmean(m["heal_seconds"] for m in ms)
        row["heal_fit_seconds"] = statistics.fmean(m["heal_fit_seconds"] for m in ms)
        if any(m.get("distill_seconds") for m in ms):
            row["distill_seconds"] = statistics.fmean(m["distill_seconds"] for m in ms if m.get("distill_seconds"))
        rows.append(row)
    return rows


def heal_markdown(rows: list[dict], meta: dict) -> list[str]:
    from moetool.compression.heal import HealOptions

    o = HealOptions()
    half = int(_fixture_rc("trained-mixtral").fields["num_experts"]) // 2
    lines = [HEAL_START, "## Healing: `moetool heal` against end-to-end distillation", "",
             f"Measured on {meta['date']}, {meta['machine']}. Every compressed checkpoint above that is pruned by REAP,",
             "frequency or at random (seed " + ", ".join(map(str, HEAL_SEEDS)) + ") or merged with router similarity and"
             " `--align` was healed by",
             f"`moetool heal` (defaults: {o.router_steps} L-BFGS steps on the router rows, {o.experts_steps} on the"
             f" routed experts' weights with the routing fixed, down projections in closed form, ridge {o.ridge}) on the"
             f" same {meta['calib_tokens']:,} calibration tokens of the train split, and measured on the same held-out"
             " text as above. The alternative, on the rows with a `distill` column: the compressed model distilled end"
             f" to end against the original on the same tokens, {DISTILL_STEPS} AdamW steps (lr 1e-3, one calibration"
             " batch of 8 texts per step) on what heal may change (router rows, routed experts, the shared expert's down"
             " projection), loss"
             " KL(original || compressed) per token. `s` = seconds of wall time for the whole command (loading both"
             " models, fitting, writing); the machine was shared with other jobs, so times are upper bounds.", "",
             "```",
             f"moetool prune fixtures/trained-mixtral --keep {half} --by reap --file calib.jsonl --max-tokens "
             f"{meta['calib_tokens']} --out pruned-reap",
             f"moetool heal pruned-reap --ref fixtures/trained-mixtral --file calib.jsonl --max-tokens "
             f"{meta['calib_tokens']} --out healed-reap",
             "# or in one step: moetool prune ... --heal",
             "```", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"### {model}", "",
                  "| removed | method | KL one-shot | KL healed | KL distilled | ppl one-shot | ppl healed | ppl distilled "
                  "| top-1 one-shot | top-1 healed | top-1 distilled | heal s | distill s |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (x for x in rows if x["model"] == model):
            b, h, d = r.get("before"), r.get("healed"), r.get("distilled")

            def cell(x, key, fmt):
                return fmt.format(x[key]) if x else "-"

            label = r["method"] + (f" (seed {', '.join(map(str, r['seeds']))})" if r["seeds"] else "")
            lines.append(f"| {r['ratio']:.0%} | {label} | {cell(b, 'kl', '{:.3f}')} | **{cell(h, 'kl', '{:.3f}')}** | "
                         f"{cell(d, 'kl', '{:.3f}')} | {cell(b, 'ppl', '{:.2f}')} | {cell(h, 'ppl', '{:.2f}')} | "
                         f"{cell(d, 'ppl', '{:.2f}')} | {cell(b, 'top1', '{:.1%}')} | {cell(h, 'top1', '{:.1%}')} | "
                         f"{cell(d, 'top1', '{:.1%}')} | {r['heal_seconds']:.0f} | "
                         + (f"{r['distill_seconds']:.0f}" if r.get("distill_seconds") else "-") + " |")
        lines.append("")
    lines += [HEAL_END, ""]
    return lines


def replace_heal_section(doc: str, section: list[str]) -> str:
    """DOC with its heal section (between the markers) replaced by SECTION, or SECTION inserted
    before "## Which experts matter" (or at the end) when DOC has none."""
    text = "\n".join(section)
    if HEAL_START in doc and HEAL_END in doc:
        a = doc.index(HEAL_START)
        b = doc.index(HEAL_END) + len(HEAL_END)
        return doc[:a] + text.rstrip("\n") + doc[b:]
    anchor = "## Which experts matter"
    if anchor in doc:
        i = doc.index(anchor)
        return doc[:i] + text + "\n" + doc[i:]
    return doc.rstrip("\n") + "\n\n" + text


def _one_model(model: str, ratios, seeds, calib: Path, calib_tokens: int, eval_tokens: int, seq_len: int, work: Path,
               with_importance: bool, with_heal: bool, prune_methods, merges, distill_labels, threads: int | None) -> dict:
    """Everything for one model (a worker process of its own with --jobs): rows, heal rows, importance."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    _log(f"{model}: building checkpoints")
    made = build(model, ratios, seeds, calib, calib_tokens, work, prune_methods, merges)
    extra = []
    if with_heal:
        _log(f"{model}: healing")
        heal_all(model, made, calib, calib_tokens, distill_labels=distill_labels)
        extra = [{"path": m[k]} for m in made for k in ("healed", "distilled") if m.get(k)]
    _log(f"{model}: evaluating")
    ev = evaluate(model, made + extra, eval_tokens, seq_len)
    out = {"rows": summarize(model, made, ev), "heal_rows": heal_rows(model, made, ev), "importance": None}
    for m in made + extra:
        shutil.rmtree(m["path"], ignore_errors=True)
    if with_importance:
        _log(f"{model}: expert importance")
        out["importance"] = importance(model, calib, calib_tokens, seq_len=seq_len)
    return out


def run_experiment(models=MODELS, ratios=(0.25, 0.5), seeds=(0, 1, 2, 3, 4), calib_tokens: int = 16384,
                   eval_tokens: int = 16384, seq_len: int = 64, work: Path = WORK, with_importance: bool = True,
                   with_heal: bool = True, prune_methods=PRUNE_METHODS, merges=MERGES,
                   distill_labels=DISTILL_LABELS, jobs: int = 1) -> dict:
    """JOBS > 1: the models in parallel worker processes (one torch thread each)."""
    t0 = time.perf_counter()
    imp: dict = {}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        calib = calibration_file(work / "calib.jsonl")
        rows, hrows = [], []
        args = [(model, ratios, seeds, calib, calib_tokens, eval_tokens, seq_len, work, with_importance, with_heal,
                 prune_methods, merges, distill_labels, 1 if jobs > 1 else None) for model in models]
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_one_model, *zip(*args)))
        else:
            results = [_one_model(*a) for a in args]
        for model, res in zip(models, results):
            rows += res["rows"]
            hrows += res["heal_rows"]
            if res["importance"] is not None:
                imp[model] = res["importance"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "heal_rows": hrows, "calib_tokens": calib_tokens, "eval_tokens": eval_tokens,
            "seq_len": seq_len, "seeds": list(seeds), "seconds": time.perf_counter() - t0, "importance": imp,
            "jobs": jobs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="trained-mixtral, 50%% only, fewer tokens; print, do not write")
    ap.add_argument("--heal-only", action="store_true",
                    help="only the checkpoints that are healed, then only the healing section of the page is rewritten")
    ap.add_argument("--ratios", default="0.25,0.5", help="with --heal-only: the compression levels")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (train split)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per file")
    ap.add_argument("--jobs", type=int, default=1, help="models in parallel (worker processes, one thread each)")
    ap.add_argument("--distill", default=",".join(DISTILL_LABELS),
                    help="with --heal-only: the rows that also get the distillation baseline (comma-separated labels)")
    args = ap.parse_args()
    if args.quick:
        res = run_experiment(models=("trained-mixtral",), ratios=(0.5,), seeds=(0, 1, 2), calib_tokens=4096,
                             with_importance=False,
                             eval_tokens=4096)
    elif args.heal_only:
        ratios = tuple(float(r) for r in args.ratios.split(","))
        res = run_experiment(ratios=ratios, seeds=HEAL_SEEDS, with_importance=False,
                             prune_methods=("frequency", "reap"), merges=(("router", True),),
                             distill_labels=tuple(x for x in DISTILL_LABELS if x in args.distill.split(",")),
                             calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, jobs=args.jobs)
    else:
        res = run_experiment(calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, jobs=args.jobs)
    import datetime

    sys.path.insert(0, str(ROOT / "bench"))
    from run import machine

    meta = {**res, "date": datetime.date.today().isoformat(), "machine": machine()}
    section = heal_markdown(res["heal_rows"], meta)
    if args.heal_only:
        DOC.write_text(replace_heal_section(DOC.read_text(), section))
        print(f"wrote the healing section of {DOC}")
        return
    text = replace_heal_section(markdown(res["rows"], meta), section)
    if args.quick:
        print(text)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
