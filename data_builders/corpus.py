"""Offline English corpora shipped inside the package (no network, identical on every machine).

The one corpus today is ``python_stdlib_docs``: Python's own documentation (stdlib docstrings,
source comment blocks, the language-reference topics and the IDLE manual), about 3.1M characters in
~500 documents, one per module or topic. It is generated once by
``data_builders/corpus/build_stdlib_corpus.py`` and committed as ``python_stdlib_docs.jsonl.gz``
(PSF-licensed text; see that script). The loaders only read that file, so the text does not depend on
the Python version that runs them.

Every document carries a fixed split: every 10th document is ``"eval"``, the rest ``"train"``, so
evaluation perplexity is never measured on text the model was trained on.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from typing import Literal

from .errors import DataError

DEFAULT_CORPUS = "python_stdlib_docs"
_SUFFIX = ".jsonl.gz"
Split = Literal["train", "eval", "all"]


def _corpus_dir():
    return resources.files(__package__) / "corpus"


def available_corpora() -> list[str]:
    """Names of the corpora shipped with the package, sorted (e.g. ``["python_stdlib_docs"]``)."""
    return sorted(p.name[: -len(_SUFFIX)] for p in _corpus_dir().iterdir() if p.name.endswith(_SUFFIX))


@lru_cache(maxsize=4)
def _read_records(name: str) -> tuple[dict, ...]:
    path = _corpus_dir() / f"{name}{_SUFFIX}"
    if not path.is_file():
        raise DataError(
            f"unknown corpus {name!r}; available corpora: {available_corpora()}. "
            "Use one of those names, or point the recipe at your own files with data.files."
        )
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def _check_split(split: str) -> None:
    if split not in ("train", "eval", "all"):
        raise DataError(f"corpus split must be 'train', 'eval' or 'all', got {split!r}")


def load_corpus_records(name: str = DEFAULT_CORPUS, split: Split = "all") -> list[dict]:
    """The corpus documents with their metadata, in file order.

    Each record is a dict with ``id`` (e.g. ``"json.decoder"``, ``"reference:assert"``), ``kind``
    (``"module"``, ``"reference"`` or ``"manual"``), ``split`` (``"train"``/``"eval"``), ``text`` and
    ``qa`` (``[name, what, summary]`` triples used by :func:`corpus_qa_dataset`). Returns copies, so
    callers may mutate them.
    """
    _check_split(split)
    return [dict(r) for r in _read_records(name) if split == "all" or r["split"] == split]


def load_corpus(name: str = DEFAULT_CORPUS, split: Split = "all") -> list[str]:
    """The corpus documents as strings, in a fixed order.

    Args:
        name: a name from :func:`available_corpora`.
        split: ``"train"`` (~90% of documents), ``"eval"`` (every 10th document, held out) or
            ``"all"``. Train and eval are disjoint.
    """
    return [r["text"] for r in load_corpus_records(name, split)]


def corpus_text(name: str = DEFAULT_CORPUS, split: Split = "all") -> str:
    """All documents of the corpus (or of one split) joined with a blank line between them."""
    return "\n\n".join(load_corpus(name, split))
