"""Where training documents come from: the shipped corpus, local files, or a `datasets` dataset.

Local files (``data.files``, glob patterns allowed) are found, checked and parsed by
:mod:`.local_files`; :func:`check_document_files` runs the same checks on the start of each file
before the model loads. Every problem a user can fix (missing file, unsupported extension, a binary
file, a truncated line, a missing or non-text field, empty result, unreachable dataset) raises
:class:`DataError` with one message that names the file or field and the fix, so the CLI can print
it instead of a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .corpus import load_corpus
from .errors import DataError
from .local_files import (
    ALL_SUFFIXES,
    SAMPLE_BYTES,
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    TextScan,
    check_data_file,
    expand_data_files,
    read_records,
    read_text_file,
)


def load_table_file(path: str | os.PathLike, *, allowed: Sequence[str] | None = None):
    """Load one .jsonl/.json/.parquet file into a ``datasets.Dataset`` (rows = records)."""
    import datasets

    path = Path(path)
    check_data_file(path, allowed or tuple(TABLE_SUFFIXES))
    rows = [record for _, record in read_records(path).rows]
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as exc:  # arrow cannot put the rows in one table (a field's type differs between rows)
        raise DataError(f"data file {str(path)!r}: the rows do not share one layout ({type(exc).__name__}: {exc}); "
                        "give each field the same type in every row.") from exc


def load_dataset_rows(dataset: str, *, dataset_config: str | None = None, split: str = "train",
                      limit: int | None = None):
    """Load a `datasets` Hub id or a local dataset directory; returns a (possibly iterable) dataset.

    A directory written by ``Dataset.save_to_disk`` is read with ``load_from_disk``; any other
    directory or id goes through ``load_dataset``. With ``limit`` a Hub dataset is streamed, so a
    multi-gigabyte corpus is not downloaded to take its first few documents.
    """
    import datasets

    local = Path(dataset)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()
                               or (local / "state.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"dataset directory {dataset!r} has no split {split!r}; "
                                    f"splits: {sorted(loaded)}. Set data.split to one of them.")
                loaded = loaded[split]
            return loaded
        streaming = limit is not None and not local.exists()
        return datasets.load_dataset(dataset, dataset_config, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as exc:
        where = "local directory" if local.exists() else "dataset id"
        raise DataError(f"could not load {where} {dataset!r} (config={dataset_config!r}, split={split!r}): "
                        f"{type(exc).__name__}: {exc}. Check the name/path, the split, and network access "
                        "(or download it first and pass the local directory).") from exc


def column_names(rows) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names is None:  # an IterableDataset without known features: peek at the first row
        first = next(iter(rows), None)
        names = list(first) if first else []
    return list(names)


def _texts_from_rows(rows, text_field: str, source: str, limit: int | None) -> list[str]:
    names = column_names(rows)
    if text_field not in names:
        raise DataError(f"{source} has no field {text_field!r}; fields found: {names}. "
                        "Set data.text_field to the field that holds the document text.")
    texts: list[str] = []
    for i, row in enumerate(rows):
        if limit is not None and len(texts) >= limit:
            break
        value = _row_text(row[text_field], source, f"row {i}", text_field)
        if value is not None:
            texts.append(value)
    return texts


def _row_text(value, source: str, where: str, text_field: str) -> str | None:
    """A row's text, or None for an empty row (skipped before it counts towards a limit); DataError for a
    value that is not a string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise DataError(f"{source}, {where}: field {text_field!r} is {type(value).__name__}, not text. "
                        "Set data.text_field to a string field, or make this row's value a string.")
    return value


def _documents_from_table(path: Path, text_field: str, limit: int | None, *,
                          sample_bytes: int | None = None) -> list[str]:
    """The ``text_field`` strings of one table file (null and blank values skipped), checked to be text."""
    source = f"data file {str(path)!r}"
    records = read_records(path, columns=[text_field], sample_bytes=sample_bytes)
    if records.fields is not None and text_field not in records.fields:
        raise DataError(f"{source} has no field {text_field!r}; fields found: {records.fields}. "
                        "Set data.text_field to the field that holds the document text.")
    scan = TextScan(source)
    texts: list[str] = []
    for i, (where, row) in enumerate(records.rows):
        if limit is not None and len(texts) >= limit:
            break
        if text_field not in row:
            fix = ("Set data.text_field to the field that holds the document text." if i == 0 else
                   "Every row needs it: add it to this row or delete the row.")
            raise DataError(f"{source}, {where} has no field {text_field!r}; fields found: {list(row)}. {fix}")
        value = _row_text(row[text_field], source, where, text_field)
        if value is None:
            continue
        scan.add(value, f", {where}, field {text_field!r}")
        texts.append(value)
    scan.check()
    return texts


def check_document_files(files: str | os.PathLike | Sequence[str | os.PathLike], *, text_field: str = "text",
                         sample_bytes: int = SAMPLE_BYTES) -> list[Path]:
    """The pre-load check of ``load_documents(files=...)``: expand the patterns, then check each file.

    Reads at most ``sample_bytes`` of each file (a parquet file: its footer only) and applies the
    loader's checks to that part, so a wrong path, a binary file or a wrong format fails in a
    second, before a model is loaded. Returns the files in the order the loader reads them.
    """
    paths = expand_data_files(files, allowed=ALL_SUFFIXES)
    for path in paths:
        check_data_file(path, ALL_SUFFIXES)
        if path.suffix.lower() in TEXT_SUFFIXES:
            read_text_file(path, sample_bytes=sample_bytes)
        else:
            _documents_from_table(path, text_field, None, sample_bytes=sample_bytes)
    return paths


def load_documents(*, corpus: str | None = None, files: list[str] | None = None, dataset: str | None = None,
                   dataset_config: str | None = None, split: str = "train", text_field: str = "text",
                   limit: int | None = None) -> list[str]:
    """Documents (plain strings) from exactly one source.

    Args:
        corpus: a shipped corpus name (see ``available_corpora()``); ``split`` is ``"train"``,
            ``"eval"`` or ``"all"`` there.
        files: local files or glob patterns (``notes/*.jsonl``, ``docs/**/*.txt``; matches sorted, each
            file read once). ``.txt`` = one document per file, strict UTF-8; ``.jsonl``/``.json``/
            ``.parquet`` = one document per row, taken from ``text_field``.
        dataset: a Hugging Face dataset id or a local dataset directory (``save_to_disk`` output or
            anything ``load_dataset`` reads); ``dataset_config`` and ``split`` select the part.
        text_field: the row field holding the text (files and datasets).
        limit: keep at most this many documents (the first ones, in source order).

    Empty and whitespace-only documents are dropped. Raises ``DataError`` if no source or several are
    given, or on any problem with the data (the message names the file or field and the fix).
    """
    given = [n for n, v in (("corpus", corpus), ("files", files), ("dataset", dataset)) if v]
    if len(given) != 1:
        raise DataError(f"give exactly one of corpus, files or dataset (got {given or 'none'}).")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive number of documents, got {limit}.")

    if corpus:
        docs = load_corpus(corpus, split=split)  # type: ignore[arg-type]
        source = f"corpus {corpus!r} (split {split!r})"
    elif files:
        docs = []
        for path in expand_data_files(files, allowed=ALL_SUFFIXES):
            check_data_file(path, ALL_SUFFIXES)
            remaining = None if limit is None else limit - len(docs)
            if remaining is not None and remaining <= 0:
                break
            if path.suffix.lower() in TEXT_SUFFIXES:
                text = read_text_file(path)
                if text.strip():
                    docs.append(text)
            else:
                docs.extend(_documents_from_table(path, text_field, remaining))
        source = f"files {[os.fspath(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]}"
    else:
        rows = load_dataset_rows(dataset, dataset_config=dataset_config, split=split, limit=limit)
        docs = _texts_from_rows(rows, text_field, f"dataset {dataset!r} (split {split!r})", limit)
        source = f"dataset {dataset!r} (split {split!r})"

    docs = [d for d in docs if d.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise DataError(f"{source} gave no non-empty documents; check that the files/field hold text.")
    return docs


__all__ = ["check_document_files", "load_documents", "load_table_file", "load_dataset_rows"]
