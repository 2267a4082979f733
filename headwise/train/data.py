"""Recipe `data:` section -> training dataset + collator (glue over `headwise.data_builders`)."""

from __future__ import annotations

import logging
from typing import Any

from headwise.data_builders import (
    DataError,
    PackedCollator,
    available_corpora,
    corpus_qa_dataset,
    load_documents,
    load_sft_dataset,
    pack_documents,
)
from headwise.data_builders.sft import check_sft_files
from headwise.data_builders.sources import check_document_files
from headwise.recipe.schema import DataSection, Recipe

logger = logging.getLogger(__name__)
_LISTED_FILES = 10  # the log line names this many of the files data.files matched


def check_data_sources(data: DataSection) -> None:
    """Cheap checks before the model loads (and before the run directory is touched).

    The corpus name exists; every `data.files` pattern matches files; each file exists, is readable,
    has a supported extension, and its beginning (the first MiB; a parquet file's footer) is in the
    builder's format: UTF-8 text for .txt, JSON objects with `data.text_field` (builder `text`) or
    chat rows (builder `sft`) for .jsonl/.json, a readable parquet file with those columns. The
    loaders read the whole files with the same checks.
    """
    if data.builder == "corpus" and data.corpus not in available_corpora():
        raise DataError(f"data.corpus {data.corpus!r} is not a built-in corpus; available: {', '.join(available_corpora())}")
    if not data.files:
        return
    if data.builder == "sft":
        paths = check_sft_files(data.files)
    else:
        paths = check_document_files(data.files, text_field=data.text_field)
    shown = ", ".join(str(p) for p in paths[:_LISTED_FILES])
    more = f", ... ({len(paths) - _LISTED_FILES} more)" if len(paths) > _LISTED_FILES else ""
    logger.info("data.files: %d file(s), read in this order: %s%s", len(paths), shown, more)


def build_training_data(recipe: Recipe, tokenizer) -> tuple[Any, Any]:
    """The training dataset and its collator. For `sft`, TRL tokenises and collates (collator None)."""
    d = recipe.data
    if d.builder == "sft":
        if d.files or d.dataset:
            ds = load_sft_dataset(files=d.files, dataset=d.dataset, split=d.split, limit=d.num_samples)
        else:
            ds = corpus_qa_dataset(d.num_samples or 1000, seed=recipe.training.seed)
        return ds, None
    if d.builder == "corpus":
        docs = load_documents(corpus=d.corpus, limit=d.limit_documents)
    else:
        docs = load_documents(
            files=d.files,
            dataset=d.dataset,
            dataset_config=d.dataset_config,
            split=d.split,
            text_field=d.text_field,
            limit=d.limit_documents,
        )
    ds = pack_documents(
        docs, tokenizer, d.max_length, num_samples=d.num_samples, seed=recipe.training.seed, packing=d.packing
    )
    return ds, PackedCollator()
