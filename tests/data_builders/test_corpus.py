import gzip
import hashlib
import json
import re
from importlib import resources

import pytest

from headwise.data_builders import DataError, available_corpora, corpus_text, load_corpus, load_corpus_records


def test_available():
    assert "python_stdlib_docs" in available_corpora()


def test_deterministic_and_large():
    docs = load_corpus()
    assert docs == load_corpus("python_stdlib_docs")
    assert len(docs) > 400
    text = corpus_text()
    assert len(text) >= 3_000_000
    assert text == "\n\n".join(docs)
    # The shipped bytes are the corpus: same file -> same documents on every machine.
    raw = (resources.files("headwise.data_builders") / "corpus" / "python_stdlib_docs.jsonl.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == docs


def test_train_eval_disjoint_and_cover_all():
    train, evald, every = load_corpus(split="train"), load_corpus(split="eval"), load_corpus(split="all")
    assert len(train) + len(evald) == len(every)
    assert not set(train) & set(evald)
    ids = [r["id"] for r in load_corpus_records(split="all")]
    assert len(ids) == len(set(ids))
    # Every 10th document is held out: roughly 10% of documents, and enough text for long windows.
    assert 0.08 < len(evald) / len(every) < 0.12
    assert len(corpus_text(split="eval")) > 200_000
    # No long paragraph of an eval document appears verbatim in training text.
    train_text = corpus_text(split="train")
    long_paras = [p for d in evald for p in d.split("\n\n") if len(p) > 400]
    assert long_paras and sum(p in train_text for p in long_paras) <= len(long_paras) // 20


def test_is_english_prose():
    text = corpus_text()
    words = text.split()
    alphabetic = sum(bool(re.fullmatch(r"[A-Za-z][a-z]*[.,;:]?", w)) for w in words)
    assert alphabetic / len(words) > 0.7
    common = {"the", "of", "and", "is", "to", "a", "in"}
    assert sum(w.lower() in common for w in words) / len(words) > 0.12
    assert not re.search(r"^\s*>>>", text, re.M)  # doctest sessions are stripped


def test_records_have_qa_summaries():
    recs = {r["id"]: r for r in load_corpus_records()}
    json_qa = {name: summary for name, what, summary in recs["json"]["qa"]}
    assert json_qa["json"].startswith("JSON (JavaScript Object Notation)")
    assert all(s.endswith((".", "!", "?")) for r in recs.values() for _, _, s in r["qa"])


def test_unknown_corpus_and_split():
    with pytest.raises(DataError, match="python_stdlib_docs"):
        load_corpus("nope")
    with pytest.raises(DataError, match="split"):
        load_corpus(split="validation")
