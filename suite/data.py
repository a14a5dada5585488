"""Data step: evaluation text and calibration windows for the corpora pruning papers use.

Where the rows come from:
  - ``$MINILLM_DATA`` set: an offline mirror laid out as
    ``$MINILLM_DATA/hf/<dataset_path>/<dataset_name or default>/<split>.jsonl`` (one JSON row per
    line, hub row schema). Only the mirror is read; a missing file is a `UserError` naming the path.
  - unset: ``datasets.load_dataset(path, name, split=...)`` from the Hugging Face hub, but only
    when the hub can be used: with ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or the hub
    unreachable (one probe, `suite.models.hub_unreachable`), it is a one-line `UserError` at once
    naming the variable, never datasets' retry loop (`require_source`, which commands call before
    loading a model).

Corpora (`CORPORA`): ``wikitext2`` and ``ptb`` (test splits, joined as LLM-Pruner's ``get_loaders``
does) and ``c4`` (the first train shard Wanda/SparseGPT calibrate on). There is no C4 validation
shard in the mirror, so the shard is split deterministically: its LAST `C4_HELDOUT_DOCS` documents
are held out for C4 perplexity and calibration samples are drawn only from the documents before
them (with the hub fallback the rule applies to the whole 356k-document shard).

All tokenisation here is ``tokenizer(text, add_special_tokens=False)``: no BOS is inserted into
evaluation or calibration windows (LLM-Pruner/Wanda tokenise with the default call, which for LLaMA
puts one BOS before the whole text; it only changes the first window's first token).
"""
from __future__ import annotations

import json
import os
import random
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from suite.pruning.errors import UserError

DATA_ENV = "MINILLM_DATA"
C4_HELDOUT_DOCS = 256


@dataclass(frozen=True)
class Corpus:
    name: str
    dataset_path: str
    dataset_name: str | None
    split: str
    field: str
    joiner: str  # how rows are joined into one evaluation text
    documents: bool = False  # rows are independent documents (C4) rather than one running text
    hub_data_files: str | None = None  # hub fallback: load_dataset(path, data_files=...) instead of name


CORPORA = {
    c.name: c
    for c in (
        # LLM-Pruner / Wanda: "\n\n".join(test['text'])
        Corpus("wikitext2", "wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
        # LLM-Pruner: " ".join(test['sentence'])
        Corpus("ptb", "ptb_text_only", "penn_treebank", "test", "sentence", " "),
        # Wanda get_c4: load_dataset('allenai/c4', data_files={'train': 'en/c4-train.00000-of-01024.json.gz'})
        Corpus("c4", "allenai/c4", "en", "train", "text", "\n\n", documents=True,
               hub_data_files="en/c4-train.00000-of-01024.json.gz"),
    )
}


def get_corpus(name: str) -> Corpus:
    try:
        return CORPORA[name]
    except KeyError:
        raise UserError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}") from None


# --------------------------------------------------------------------------- rows
def mirror_root() -> Path | None:
    """The offline mirror root from ``$MINILLM_DATA``, or None when the hub is to be used."""
    root = os.environ.get(DATA_ENV)
    return Path(root).expanduser() if root else None


def require_source() -> None:
    """Raise a one-line UserError now if no dataset can be read: the mirror named by ``$MINILLM_DATA``
    is not a directory, or the variable is unset and the hub is offline or unreachable."""
    root = mirror_root()
    if root is not None:
        if not root.is_dir():
            raise UserError(f"{DATA_ENV}={os.environ[DATA_ENV]}: no such directory (the dataset mirror)")
        return
    from suite.models import hub_unreachable

    reason = hub_unreachable()
    if reason:
        raise UserError(f"{DATA_ENV} is not set and {reason}: set {DATA_ENV} to the dataset mirror, "
                        f"e.g. export {DATA_ENV}=$PWD/../shared/data")


def mirror_dir(root: Path, dataset_path: str, dataset_name: str | None) -> Path:
    return root / "hf" / dataset_path / (dataset_name or "default")


@lru_cache(maxsize=16)
def _read_jsonl(path: Path) -> tuple:
    with open(path, encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def load_rows(dataset_path: str, dataset_name: str | None, split: str,
              hub_data_files: str | None = None) -> list[dict]:
    """Rows of one split: from the mirror when ``$MINILLM_DATA`` is set, else from the hub."""
    root = mirror_root()
    if root is not None:
        path = mirror_dir(root, dataset_path, dataset_name) / f"{split}.jsonl"
        if not path.is_file():
            raise UserError(f"dataset file not found in the {DATA_ENV} mirror: {path}")
        return list(_read_jsonl(path.resolve()))
    require_source()
    import datasets  # lazy: heavy import, and not needed with the mirror

    if hub_data_files:
        ds = datasets.load_dataset(dataset_path, data_files={split: hub_data_files}, split=split)
    else:
        ds = datasets.load_dataset(dataset_path, dataset_name, split=split)
    return list(ds)


def _texts(corpus: Corpus) -> list[str]:
    rows = load_rows(corpus.dataset_path, corpus.dataset_name, corpus.split, corpus.hub_data_files)
    return [row[corpus.field] for row in rows]


def _split_documents(corpus: Corpus) -> tuple[list[str], list[str]]:
    """(calibration documents, held-out documents); only C4 holds documents out."""
    texts = _texts(corpus)
    if not corpus.documents:
        return texts, texts
    if len(texts) <= C4_HELDOUT_DOCS:
        raise UserError(f"corpus {corpus.name!r} has {len(texts)} documents; need more than {C4_HELDOUT_DOCS}")
    return texts[:-C4_HELDOUT_DOCS], texts[-C4_HELDOUT_DOCS:]


def corpus_text(name: str) -> str:
    """The evaluation text of a corpus (for c4: the held-out documents joined by "\\n\\n")."""
    corpus = get_corpus(name)
    return corpus.joiner.join(_split_documents(corpus)[1])


# --------------------------------------------------------------------------- tokenisation
_TOKEN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_for(tokenizer) -> dict:
    try:
        return _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no caching
        return {}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _encoded(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor, cached per (tokenizer, text) for this process."""
    cache = _cache_for(tokenizer)
    if text not in cache:
        cache[text] = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    return cache[text]


def eval_windows(tokenizer, corpus: str, seqlen: int = 128, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seqlen] windows of the tokenised evaluation text, tail dropped.

    Reproduces LLM-Pruner's ``get_loaders`` / ``process_data`` test windows (``PPLMetric``);
    with `max_tokens` only the first ``max_tokens // seqlen`` windows are kept.
    """
    ids = _encoded(tokenizer, corpus_text(corpus))
    n = ids.numel() // seqlen
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    if n < 1:
        raise UserError(f"no {seqlen}-token window fits: corpus {corpus!r} has {ids.numel()} tokens, "
                        f"max_tokens={max_tokens}")
    return ids[: n * seqlen].view(n, seqlen).clone()  # callers may edit it: keep the cache intact


def calibration_windows(tokenizer, corpus: str = "c4", nsamples: int = 128, seqlen: int = 128,
                        seed: int = 0, drawn: set | None = None) -> torch.Tensor:
    """[nsamples, seqlen] random calibration windows, as Wanda/SparseGPT ``get_c4`` draws them.

    C4: with ``random.Random(seed)`` pick a random (non-held-out) document, redraw until its
    tokenisation has more than `seqlen` tokens, then take a random `seqlen`-token window of it.
    WikiText-2 / PTB (one running text): random windows of the tokenised *test* text, as Wanda's
    ``get_wikitext2`` does with the train text. Note that calibrating on WikiText-2 test then leaks
    into WikiText-2 perplexity (FLAP issue #13); use c4 for fair comparisons. `drawn` (a set, c4):
    receives the indices of the documents the windows come from.
    """
    c = get_corpus(corpus)
    rng = random.Random(seed)
    windows = []
    if not c.documents:
        ids = _encoded(tokenizer, corpus_text(corpus))
        if ids.numel() <= seqlen:
            raise UserError(f"corpus {corpus!r} has {ids.numel()} tokens; need more than seqlen={seqlen}")
        for _ in range(nsamples):
            i = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[i: i + seqlen])
        return torch.stack(windows)

    docs = _split_documents(c)[0]
    too_short: set[int] = set()
    for _ in range(nsamples):
        while True:
            d = rng.randint(0, len(docs) - 1)
            ids = _encoded(tokenizer, docs[d])
            if ids.numel() > seqlen:
                if drawn is not None:
                    drawn.add(d)
                break
            too_short.add(d)
            if len(too_short) == len(docs):
                raise UserError(f"no {corpus!r} calibration document has more than seqlen={seqlen} tokens")
        i = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[i: i + seqlen])
    return torch.stack(windows)


def c4_recovery_documents(tokenizer, calibration: dict | None = None, seed: int = 0) -> list[str]:
    """C4 train documents for LoRA recovery on plain text: those neither calibration (its draw with
    `calibration`'s nsamples/seqlen and `seed`, when it calibrated on c4) nor C4 perplexity (the
    held-out tail) use."""
    docs = _split_documents(get_corpus("c4"))[0]
    drawn: set[int] = set()
    if calibration and calibration.get("corpus") == "c4":
        calibration_windows(tokenizer, "c4", calibration["nsamples"], calibration["seqlen"], seed, drawn=drawn)
    return [doc for i, doc in enumerate(docs) if i not in drawn]
