"""headwise.data_builders: offline corpus, document sources, long-document packing, SFT formatting.

Public API::

    load_corpus(name="python_stdlib_docs", split="all") -> list[str]
    corpus_text(name=..., split=...) -> str
    available_corpora() -> list[str]
    load_documents(*, corpus=None, files=None, dataset=None, ...) -> list[str]
    pack_documents(documents, tokenizer, max_length, *, num_samples=None, ...) -> datasets.Dataset
    pack_unpacked(documents, tokenizer, max_length, ...) -> datasets.Dataset
    PackedCollator()(features) -> dict[str, torch.Tensor]
    cu_seqlens_from_position_ids(position_ids) -> (cu_seqlens int32, max_len)
    load_sft_dataset(*, files=None, dataset=None, split="train", limit=None) -> datasets.Dataset
    corpus_qa_dataset(n, seed=0) -> datasets.Dataset
    build_passkey_sample(tokenizer, *, context_tokens, depth, seed, filler="corpus", n_keys=1, key_format="digits5", ...) -> PasskeySample
    build_passkey_eval_set(tokenizer, lengths, depths, samples_per_cell, seed=0, ...) -> list[PasskeySample]
    build_duo_training_set(tokenizer, n, *, min_tokens, max_tokens, n_keys=10, seed=0, ...) -> datasets.Dataset
    DataError
"""

from .corpus import DEFAULT_CORPUS, available_corpora, corpus_text, load_corpus, load_corpus_records
from .errors import DataError
from .packing import (
    IGNORE_INDEX,
    PackedCollator,
    cu_seqlens_from_position_ids,
    pack_documents,
    pack_unpacked,
    tokenize_documents,
)
from .sft import corpus_qa_dataset, load_sft_dataset, normalize_sft_row, normalize_sft_rows
from .sources import load_documents

__all__ = [
    "DEFAULT_CORPUS",
    "IGNORE_INDEX",
    "DataError",
    "PackedCollator",
    "PasskeySample",
    "answer_labels",
    "available_corpora",
    "build_duo_training_sample",
    "build_duo_training_set",
    "build_passkey_eval_set",
    "build_passkey_sample",
    "corpus_qa_dataset",
    "corpus_text",
    "cu_seqlens_from_position_ids",
    "load_corpus",
    "load_corpus_records",
    "load_documents",
    "load_sft_dataset",
    "normalize_sft_row",
    "normalize_sft_rows",
    "pack_documents",
    "pack_unpacked",
    "tokenize_documents",
]
from .passkey import (
    PasskeySample,
    answer_labels,
    build_duo_training_sample,
    build_duo_training_set,
    build_passkey_eval_set,
    build_passkey_sample,
)
