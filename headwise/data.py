"""Recipe `data:` section -> training dataset + collator (glue over `headwise.data_builders`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headwise.recipe import DataSection, Recipe


def check_data_sources(data: DataSection) -> None:
    """Cheap checks before the model loads: files exist and have a supported extension."""
    from headwise.data_builders import DataError, available_corpora

    if data.builder == "corpus" and data.corpus not in available_corpora():
        raise DataError(f"data.corpus {data.corpus!r} is not a built-in corpus; available: {', '.join(available_corpora())}")
    for f in data.files or []:
        p = Path(f)
        if not p.is_file():
            raise DataError(f"data.files: {f} does not exist; fix the path (relative paths are from {Path.cwd()})")
        if p.suffix not in (".txt", ".jsonl", ".json", ".parquet"):
            raise DataError(f"data.files: {f} has extension {p.suffix!r}; use .txt, .jsonl, .json or .parquet")


def build_training_data(recipe: Recipe, tokenizer) -> tuple[Any, Any]:
    """The training dataset and its collator. For `sft`, TRL tokenises and collates (collator None)."""
    from headwise.data_builders import (
        PackedCollator,
        corpus_qa_dataset,
        load_documents,
        load_sft_dataset,
        pack_documents,
    )

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
