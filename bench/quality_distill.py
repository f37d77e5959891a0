"""Distillation quality on the trained fixtures: how close each initialisation starts to the
teacher, and where training takes it.

For each trained teacher (fixtures/trained-mixtral, fixtures/trained-deepseek-v3) and each
``--init`` (merge, topk, random): the student at init (``--steps 0``) and after ``STEPS``
steps of distillation on fixtures/corpus/train-{prose,code}.txt, evaluated on the held-out
fixtures/corpus/heldout-{prose,code}.txt (perplexity, KL(teacher || student) over the full
vocabulary, top-1 agreement; the first EVAL_TOKENS tokens, in 128-token windows).

    python bench/quality_distill.py            # writes the table into docs/distill.md
    python bench/quality_distill.py --print    # prints it only

Each run is exactly `moetool distill` with the options printed beside the table (called
in-process to pay the imports once). One thread per run: the numbers do not depend on it,
the time does.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "distill.md"
BEGIN, END = "<!-- quality_distill:begin -->", "<!-- quality_distill:end -->"
TEACHERS = ["fixtures/trained-mixtral", "fixtures/trained-deepseek-v3"]
INITS = ["merge", "topk", "random"]
CORPUS = "fixtures/corpus"
STEPS = 200
EVAL_TOKENS = 8192
OPTIONS = dict(seq_len=128, batch_size=8, lr=1e-3, eval_tokens=EVAL_TOKENS)


def command(teacher: str, init: str, steps: int) -> str:
    return (f"moetool distill {teacher} --out OUT --file {CORPUS}/train-prose.txt --file {CORPUS}/train-code.txt "
            f"--eval-file {CORPUS}/heldout-prose.txt --eval-file {CORPUS}/heldout-code.txt --init {init} "
            f"--steps {steps} --seq-len {OPTIONS['seq_len']} --batch-size {OPTIONS['batch_size']} --lr {OPTIONS['lr']} "
            f"--eval-tokens {EVAL_TOKENS}" + (f" --eval-every {steps // 4}" if steps else ""))


def run() -> dict:
    import torch

    from moetool.compression.distill import distill

    torch.set_num_threads(1)
    train = [f"{CORPUS}/train-prose.txt", f"{CORPUS}/train-code.txt"]
    held = [f"{CORPUS}/heldout-prose.txt", f"{CORPUS}/heldout-code.txt"]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="moetool-quality-") as tmp:
        for teacher in TEACHERS:
            if not (ROOT / teacher / "config.json").is_file():
                raise SystemExit(f"{teacher} is missing: python fixtures/train_tiny.py")
            for init in INITS:
                t0 = time.perf_counter()
                r = distill(str(ROOT / teacher), Path(tmp) / f"{Path(teacher).name}-{init}", train, init=init,
                            steps=STEPS, eval_files=held, eval_every=STEPS // 4, progress=False, **OPTIONS)
                results[(teacher, init)] = r
                first, last = r["eval"][0], r["eval"][-1]
                print(f"{teacher} {init}: KL {first['kl']:.4f} -> {last['kl']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def table(results: dict) -> str:
    lines = [
        f"Held-out: the first {EVAL_TOKENS:,} tokens of `{CORPUS}/heldout-prose.txt` + `heldout-code.txt` "
        f"(128-token windows); KL = KL(teacher || student) in nats per predicted token over the full "
        f"vocabulary; top-1 = same most likely next token as the teacher. Training: {STEPS} steps x "
        f"{OPTIONS['batch_size']} x {OPTIONS['seq_len']} tokens of `{CORPUS}/train-*.txt`, lr {OPTIONS['lr']}.",
        "",
    ]
    for teacher in TEACHERS:
        rows = [(init, results[(teacher, init)]) for init in INITS if (teacher, init) in results]
        if not rows:
            continue
        r0 = rows[0][1]
        lines += [f"**{teacher}** ({r0['teacher_family']}, {r0.get('teacher_params', 0):,} parameters) -> "
                  f"`{r0['student']['architectures'][0]}` ({r0['student']['params']:,} parameters, FFN width "
                  f"{r0['student']['intermediate_size']})", "",
                  "| model | perplexity | KL to teacher | top-1 agreement |", "|---|---:|---:|---:|",
                  f"| teacher | {r0['eval'][0]['teacher_ppl']:.2f} | 0 | 100% |"]
        for init, r in rows:
            e0 = r["eval"][0]
            lines.append(f"| student `--init {init}`, at init (`--steps 0`) | {e0['ppl']:.2f} | {e0['kl']:.4f} | {e0['top1']:.1%} |")
        for init, r in rows:
            e1 = r["eval"][-1]
            lines.append(f"| student `--init {init}`, after {e1['step']} steps | {e1['ppl']:.2f} | {e1['kl']:.4f} | {e1['top1']:.1%} |")
        lines += ["", "Held-out KL during training:", "",
                  "| init | " + " | ".join(f"step {e['step']}" for e in rows[0][1]["eval"]) + " |",
                  "|---|" + "---:|" * len(rows[0][1]["eval"])]
        for init, r in rows:
            lines.append(f"| {init} | " + " | ".join(f"{e['kl']:.4f}" for e in r["eval"]) + " |")
        lines += ["", "Reproduce one row: `" + command(teacher, rows[0][0], STEPS) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    results = run()
    text = table(results)
    if "--print" in argv or not DOC.is_file():
        print(text)
        return
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} section")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + BEGIN + "\n" + text + "\n" + END + tail)
    summary = {f"{t} {i}": {"init": r["eval"][0], "trained": r["eval"][-1]} for (t, i), r in results.items()}
    print(json.dumps(summary, indent=1))
    print(f"wrote the table into {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
