"""Quality of expert pruning and merging on the trained fixtures, and docs/compression.md.

For each trained model (fixtures/trained-mixtral, fixtures/trained-deepseek-v3) and each
compression level (25% and 50% of the routed experts removed):

- prune by frequency, weight and REAP, calibrated on the train split (fixtures/corpus/train-*),
- prune at random with several seeds (the baseline),
- merge to the same expert count (router / output / weight similarity, and router + --align),

then evaluate every checkpoint with `moetool eval`'s library on the held-out split
(fixtures/corpus/heldout-{prose,code}.txt): perplexity, and KL(original || compressed) and top-1
agreement against the original model. Every checkpoint is written by the same library calls the
commands use (moetool.prune.prune_checkpoint, moetool.merge.merge_checkpoint).

    python bench/quality_compression.py            # everything, writes docs/compression.md
    python bench/quality_compression.py --quick    # one model, 50% only, fewer tokens (prints)

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


def calibration_file(path: Path, chunk_chars: int = 1200) -> Path:
    """JSONL of train-split chunks (documents cut at line boundaries), prose and code
    interleaved so that a --max-tokens cap keeps both domains."""
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
    with open(path, "w") as fh:
        for a, b in zip(chunks["prose"], chunks["code"]):
            fh.write(json.dumps({"text": a}) + "\n")
            fh.write(json.dumps({"text": b}) + "\n")
    return path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(model: str, ratios, seeds, calib: Path, calib_tokens: int, work: Path) -> list[dict]:
    """Every compressed checkpoint of MODEL: [{label, method, ratio, seed, path, experts}]."""
    from moetool.merge import merge_checkpoint
    from moetool.prune import prune_checkpoint
    from moetool.trace import read_texts, trace_model

    src = str(ROOT / "fixtures" / model)
    trace, loaded = trace_model(src, read_texts((), str(calib)), max_tokens=calib_tokens, logits=True)
    E = int(loaded.rc.num_experts)
    del loaded
    trace_path = work / f"{model}.trace"
    trace.save(trace_path)
    made = []
    for ratio in ratios:
        keep = E - round(ratio * E)
        for by in PRUNE_METHODS:
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
        for sim, align in MERGES:
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
    """{domain: {path: row}} from moetool.evaluate for the original and every checkpoint."""
    from moetool.evaluate import evaluate_models

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


def summarize(model: str, made: list[dict], ev: dict) -> list[dict]:
    """One row per (ratio, method): perplexities, KL, agreement (random: mean and std over seeds)."""
    src = str(ROOT / "fixtures" / model)
    n = {d: ev[d]["_tokens"] for d in ("prose", "code")}

    def both_ppl(path):
        nll = sum(ev[d][path]["nll"] * n[d] for d in n) / sum(n.values())
        return math.exp(nll)

    def metrics(path):
        return {"ppl_prose": ev["prose"][path]["perplexity"], "ppl_code": ev["code"][path]["perplexity"],
                "ppl": both_ppl(path),
                "kl": sum(ev[d][path]["kl"] * n[d] for d in n) / sum(n.values()),
                "top1": sum(ev[d][path]["top1_agreement"] * n[d] for d in n) / sum(n.values())}

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
    from moetool.params import resolve_family
    from moetool.source import resolve

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

    from moetool.prune import gather_stats

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


def run_experiment(models=MODELS, ratios=(0.25, 0.5), seeds=(0, 1, 2, 3, 4), calib_tokens: int = 16384,
                   eval_tokens: int = 16384, seq_len: int = 64, work: Path = WORK, with_importance: bool = True) -> dict:
    t0 = time.perf_counter()
    imp: dict = {}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        calib = calibration_file(work / "calib.jsonl")
        rows = []
        for model in models:
            _log(f"{model}: building checkpoints")
            made = build(model, ratios, seeds, calib, calib_tokens, work)
            _log(f"{model}: evaluating")
            rows += summarize(model, made, evaluate(model, made, eval_tokens, seq_len))
            for m in made:
                shutil.rmtree(m["path"], ignore_errors=True)
            if with_importance:
                _log(f"{model}: expert importance")
                imp[model] = importance(model, calib, calib_tokens, seq_len=seq_len)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "calib_tokens": calib_tokens, "eval_tokens": eval_tokens, "seq_len": seq_len,
            "seeds": list(seeds), "seconds": time.perf_counter() - t0, "importance": imp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="trained-mixtral, 50%% only, fewer tokens; print, do not write")
    args = ap.parse_args()
    if args.quick:
        res = run_experiment(models=("trained-mixtral",), ratios=(0.5,), seeds=(0, 1, 2), calib_tokens=4096,
                             with_importance=False,
                             eval_tokens=4096)
    else:
        res = run_experiment()
    import datetime

    sys.path.insert(0, str(ROOT / "bench"))
    from run import machine

    meta = {**res, "date": datetime.date.today().isoformat(), "machine": machine()}
    text = markdown(res["rows"], meta)
    if args.quick:
        print(text)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
