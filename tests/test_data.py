"""suite/data.py against independent reads of the mirror files and a literal Wanda get_c4 loop."""
import json
import os
import random
from pathlib import Path

import pytest
import torch

from suite.pruning.errors import UserError
from suite import data
from suite.models import load_tokenizer

MIRROR = Path(os.environ.get("MINILLM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(autouse=True)
def mirror(monkeypatch):
    monkeypatch.setenv("MINILLM_DATA", str(MIRROR))
    return MIRROR


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def rows(rel):
    with open(MIRROR / "hf" / rel, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_corpus_text_joins_rows_like_llm_pruner():
    assert data.corpus_text("wikitext2") == "\n\n".join(r["text"] for r in rows("wikitext/wikitext-2-raw-v1/test.jsonl"))
    assert data.corpus_text("ptb") == " ".join(r["sentence"] for r in rows("ptb_text_only/penn_treebank/test.jsonl"))
    c4 = [r["text"] for r in rows("allenai/c4/en/train.jsonl")]
    assert data.corpus_text("c4") == "\n\n".join(c4[-data.C4_HELDOUT_DOCS:])


def test_eval_windows_are_the_tokenised_text_cut_in_order(tok):
    expected = ids(tok, data.corpus_text("ptb"))
    w = data.eval_windows(tok, "ptb", seqlen=100)
    assert w.dtype == torch.long and w.shape == (len(expected) // 100, 100)
    assert w.flatten().tolist() == expected[: w.numel()]
    capped = data.eval_windows(tok, "ptb", seqlen=100, max_tokens=1050)
    assert capped.shape == (10, 100) and torch.equal(capped, w[:10])


def test_eval_windows_too_few_tokens(tok):
    with pytest.raises(UserError, match="no 128-token window"):
        data.eval_windows(tok, "ptb", seqlen=128, max_tokens=100)


def wanda_get_c4(tok, docs, nsamples, seqlen, seed):
    """Wanda's get_c4 sampling loop, written out literally (random.Random instead of the global seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            enc = ids(tok, docs[i])
            if len(enc) > seqlen:
                break
        i = rng.randint(0, len(enc) - seqlen - 1)
        out.append(enc[i: i + seqlen])
    return out


def test_c4_calibration_matches_wanda_loop_on_training_docs(tok):
    docs = [r["text"] for r in rows("allenai/c4/en/train.jsonl")][: -data.C4_HELDOUT_DOCS]
    w = data.calibration_windows(tok, "c4", nsamples=16, seqlen=64, seed=3)
    assert w.shape == (16, 64) and w.dtype == torch.long
    assert w.tolist() == wanda_get_c4(tok, docs, 16, 64, 3)
    assert torch.equal(w, data.calibration_windows(tok, "c4", nsamples=16, seqlen=64, seed=3))
    assert not torch.equal(w, data.calibration_windows(tok, "c4", nsamples=16, seqlen=64, seed=4))


def test_running_text_calibration_windows_are_slices_of_the_test_text(tok):
    # ptb and wikitext2 share this path (one running text); ptb is the smaller one to tokenise
    stream = torch.tensor(ids(tok, data.corpus_text("ptb")))
    w = data.calibration_windows(tok, "ptb", nsamples=8, seqlen=32, seed=0)
    rng = random.Random(0)
    for row in w:
        i = rng.randint(0, stream.numel() - 33)
        assert torch.equal(row, stream[i: i + 32])
    assert not torch.equal(w, data.calibration_windows(tok, "ptb", nsamples=8, seqlen=32, seed=1))


def write_jsonl(path, rows_):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))


def test_c4_heldout_documents_never_calibrate(tmp_path, monkeypatch, tok):
    n_cal = 20
    docs = [{"text": "a" * 300}] * n_cal + [{"text": "b" * 300}] * data.C4_HELDOUT_DOCS
    write_jsonl(tmp_path / "hf/allenai/c4/en/train.jsonl", docs)
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path))
    w = data.calibration_windows(tok, "c4", nsamples=8, seqlen=64, seed=0)
    assert set(w.flatten().tolist()) == set(ids(tok, "a"))
    assert "a" not in data.corpus_text("c4")


def test_c4_without_long_enough_documents_is_a_user_error(tmp_path, monkeypatch, tok):
    write_jsonl(tmp_path / "hf/allenai/c4/en/train.jsonl", [{"text": "short"}] * (data.C4_HELDOUT_DOCS + 5))
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path))
    with pytest.raises(UserError, match="more than seqlen=64"):
        data.calibration_windows(tok, "c4", nsamples=2, seqlen=64)


def test_missing_mirror_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path))
    with pytest.raises(UserError) as err:
        data.corpus_text("wikitext2")
    assert str(tmp_path / "hf/wikitext/wikitext-2-raw-v1/test.jsonl") in str(err.value)


def test_unknown_corpus_lists_known_ones(tok):
    with pytest.raises(UserError, match="wikitext2, ptb, c4"):
        data.calibration_windows(tok, "pile")
