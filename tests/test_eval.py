"""`moetool eval`: perplexity, KL(ref || model) and top-1 agreement, checked against direct
computations with transformers."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import FIXTURES, assert_one_line_error, run_cli
from moetool.analysis.evaluate import evaluate_models, windows

MIXTRAL = FIXTURES / "tiny-mixtral"
TEXT = ("def route(tokens):\n    return sorted(tokens, key=len)\n"
        "The router sends each token to two experts; their outputs are mixed by weight.\n") * 3


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval") / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from moetool.compression.prune import prune_checkpoint

    out = tmp_path_factory.mktemp("pruned") / "p"
    prune_checkpoint(str(MIXTRAL), str(out), keep=4, by="random", seed=1, progress=False)
    return out


def _direct(model_dir, ref_dir, text: str, seq_len: int, max_tokens: int):
    """Perplexity of MODEL_DIR, KL(ref || model) and top-1 agreement, computed window by window."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    nll = kl = agree = n = 0
    for start in range(0, len(ids), seq_len):
        w = torch.tensor([ids[start:start + seq_len]])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            out = model(w, labels=w)
            lp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            rp = torch.log_softmax(ref(w).logits[0, :-1].double(), -1)
        k = w.shape[1] - 1
        nll += float(out.loss) * k
        kl += float((rp.exp() * (rp - lp)).sum())
        agree += int((rp.argmax(-1) == lp.argmax(-1)).sum())
        n += k
    return math.exp(nll / n), kl / n, agree / n, n


def test_perplexity_kl_and_agreement_match_a_direct_computation(text_file, pruned):
    result = evaluate_models([str(pruned)], str(text_file), ref=str(MIXTRAL), seq_len=32, max_tokens=150, batch_size=3)
    ppl, kl, agree, n = _direct(pruned, MIXTRAL, TEXT, 32, 150)
    ref_row, row = result["models"]
    assert ref_row["is_ref"] and ref_row["kl"] == 0.0 and ref_row["top1_agreement"] == 1.0
    assert result["tokens"] == n == row["tokens"]
    assert row["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert row["kl"] == pytest.approx(kl, rel=1e-4)
    assert row["kl"] > 1e-3
    assert row["top1_agreement"] == pytest.approx(agree)
    assert row["perplexity_ratio"] == pytest.approx(row["perplexity"] / ref_row["perplexity"])
    assert row["num_experts"] == 4 and ref_row["num_experts"] == 8
    ref_ppl = _direct(MIXTRAL, MIXTRAL, TEXT, 32, 150)[0]
    assert ref_row["perplexity"] == pytest.approx(ref_ppl, rel=1e-5)


def test_a_copy_of_the_reference_has_zero_kl(tmp_path, text_file):
    copy = tmp_path / "copy"
    shutil.copytree(MIXTRAL, copy)
    result = evaluate_models([str(MIXTRAL), str(copy)], str(text_file), ref=str(MIXTRAL), seq_len=40)
    assert [r["model"] for r in result["models"]] == [str(MIXTRAL), str(copy)]  # the ref is evaluated once
    row = result["models"][1]
    assert abs(row["kl"]) < 1e-6 and row["top1_agreement"] == 1.0
    assert row["perplexity"] == pytest.approx(result["models"][0]["perplexity"], rel=1e-6)


def test_windows_predict_every_token_but_the_first():
    assert [len(w) for w in windows(list(range(10)), 4)] == [4, 4, 2]
    assert windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing


def test_cli_table_and_json(text_file, pruned):
    r = run_cli("eval", pruned, "--ref", MIXTRAL, "--file", text_file, "--seq-len", "32", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [m["model"] for m in data["models"]] == [str(MIXTRAL), str(pruned)]
    r = run_cli("eval", MIXTRAL, "--file", text_file, "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "KL" not in r.stdout  # no reference: no KL column


def test_models_that_tokenize_differently_are_refused(tmp_path, text_file):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = tmp_path / "other"
    shutil.copytree(MIXTRAL, other)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train_from_iterator(["completely different text " * 20],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(other / "tokenizer.json"))
    r = run_cli("eval", other, "--ref", MIXTRAL, "--file", text_file)
    assert_one_line_error(r, "tokenizes the text differently")


def test_missing_text_file(tmp_path):
    r = run_cli("eval", MIXTRAL, "--file", tmp_path / "nope.txt")
    assert_one_line_error(r, "no such file")
