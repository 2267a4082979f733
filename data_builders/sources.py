"""Where training documents come from: the shipped corpus, local files, or a `datasets` dataset.

Every problem a user can fix (missing file, unsupported extension, missing text field, empty result,
unreachable dataset) raises :class:`DataError` with one message that names the file or field and the
fix, so the CLI can print it instead of a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from .corpus import load_corpus
from .errors import DataError

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _check_file(path: Path, allowed: tuple[str, ...]) -> None:
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; fix the path in the recipe (data.files).")
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a directory; list the files inside it, or use "
                        "data.dataset for a saved `datasets` directory.")
    if _suffix(path) not in allowed:
        raise DataError(f"data file {str(path)!r} has an unsupported extension {path.suffix!r}; "
                        f"supported: {', '.join(allowed)}. Rename or convert the file.")


def load_table_file(path: str | os.PathLike, *, allowed: tuple[str, ...] | None = None):
    """Load one .jsonl/.json/.parquet file into a ``datasets.Dataset`` (rows = records)."""
    import datasets

    path = Path(path)
    _check_file(path, allowed or tuple(TABLE_SUFFIXES))
    try:
        return datasets.load_dataset(TABLE_SUFFIXES[_suffix(path)], data_files=str(path), split="train")
    except Exception as exc:  # arrow / json parse errors: say which file, keep the cause
        raise DataError(f"could not read data file {str(path)!r} as {_suffix(path)[1:]}: {exc}") from exc


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
        value = row[text_field]
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # empty rows are skipped before counting towards the limit
        if not isinstance(value, str):
            raise DataError(f"{source}, row {i}: field {text_field!r} is {type(value).__name__}, not text. "
                            "Set data.text_field to a string field.")
        texts.append(value)
    return texts


def load_documents(*, corpus: str | None = None, files: list[str] | None = None, dataset: str | None = None,
                   dataset_config: str | None = None, split: str = "train", text_field: str = "text",
                   limit: int | None = None) -> list[str]:
    """Documents (plain strings) from exactly one source.

    Args:
        corpus: a shipped corpus name (see ``available_corpora()``); ``split`` is ``"train"``,
            ``"eval"`` or ``"all"`` there.
        files: local files. ``.txt`` = one document per file; ``.jsonl``/``.json``/``.parquet`` = one
            document per row, taken from ``text_field``. Read through ``datasets``.
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
        if isinstance(files, (str, os.PathLike)):
            files = [files]  # a single path is a common slip in YAML; accept it
        docs = []
        for f in files:
            path = Path(f)
            _check_file(path, TEXT_SUFFIXES + tuple(TABLE_SUFFIXES))
            remaining = None if limit is None else limit - len(docs)
            if remaining is not None and remaining <= 0:
                break
            if _suffix(path) in TEXT_SUFFIXES:
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    docs.append(text)
            else:
                docs.extend(_texts_from_rows(load_table_file(path), text_field, f"data file {str(path)!r}", remaining))
        source = f"files {[str(f) for f in files]}"
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


__all__ = ["load_documents", "load_table_file", "load_dataset_rows"]
