"""Chat / SFT data for TRL's ``SFTTrainer`` with the loss on the answers only.

Everything is normalised to TRL's *conversational prompt-completion* format::

    {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": "..."}]}

For prompt-completion data ``SFTTrainer`` (``completion_only_loss=None`` -> on) applies the chat
template to the prompt (with the generation prompt) and to prompt + completion, keeps a
``completion_mask`` over the completion tokens, and its collator sets the labels of every other token
to -100. That works with any chat template, unlike ``assistant_only_loss``, which needs
``{% generation %}`` markers most templates (SmolLM2's included) lack.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .corpus import load_corpus_records
from .errors import DataError
from .local_files import SAMPLE_BYTES, TABLE_SUFFIXES, TextScan, check_data_file, expand_data_files, read_records
from .sources import load_dataset_rows

ROLES = ("system", "user", "assistant", "tool")
FORMAT_HELP = ("rows must have either 'messages' (a list of {role, content} ending with an assistant turn) or "
               "'prompt' and 'completion' (strings or message lists)")


def _message(m: Any, where: str) -> dict[str, str]:
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise DataError(f"{where}: each message must be a mapping with 'role' and 'content', got {m!r:.120}")
    role, content = m["role"], m["content"]
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; use one of {list(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: message content must be a string, got {type(content).__name__}")
    # Only role/content: extra keys (name, tool_calls=None, ...) would make Arrow columns ragged.
    return {"role": role, "content": content}


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type(value).__name__}")
    return [_message(m, f"{where}[{i}]") for i, m in enumerate(value)]


def normalize_sft_row(row: Mapping[str, Any], index: int = 0, source: str = "data", *,
                      where: str | None = None) -> dict[str, list[dict[str, str]]]:
    """One row -> ``{"prompt": [messages], "completion": [assistant message]}``.

    * ``messages``: everything before the last assistant turn becomes the prompt, the last assistant
      turn the completion (earlier assistant turns are context, not trained on). Turns after the
      last assistant message are dropped.
    * ``prompt``/``completion`` strings: become a user message and an assistant message; an optional
      ``system`` string becomes a leading system message.
    * ``prompt``/``completion`` message lists: validated and kept.

    Errors name the row as ``where`` (default ``"{source}, row {index}"``).
    """
    where = where or f"{source}, row {index}"
    fields = sorted(row)
    messages = row.get("messages")
    if messages is not None:
        msgs = _messages(messages, f"{where}, 'messages'")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: 'messages' has no assistant turn to train on (roles: "
                            f"{[m['role'] for m in msgs]}).")
        if last == 0:
            raise DataError(f"{where}: 'messages' starts with the assistant turn; there is no prompt.")
        return {"prompt": msgs[:last], "completion": [msgs[last]]}
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is None or completion is None:
        raise DataError(f"{where}: {FORMAT_HELP}; fields found: {fields}.")
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
        system = row.get("system")
        if isinstance(system, str) and system:
            prompt_msgs.insert(0, {"role": "system", "content": system})
    else:
        prompt_msgs = _messages(prompt, f"{where}, 'prompt'")
    if isinstance(completion, str):
        completion_msgs = [{"role": "assistant", "content": completion}]
    else:
        completion_msgs = _messages(completion, f"{where}, 'completion'")
        if completion_msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: 'completion' must start with an assistant message, got role "
                            f"{completion_msgs[0]['role']!r}")
    return {"prompt": prompt_msgs, "completion": completion_msgs}


def normalize_sft_rows(rows: Iterable[Mapping[str, Any]], *, source: str = "data", limit: int | None = None):
    """Normalise rows (see :func:`normalize_sft_row`) into a ``datasets.Dataset`` with prompt/completion."""
    import datasets

    out = []
    for i, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, Mapping):
            raise DataError(f"{source}, row {i}: expected a record (mapping), got {type(row).__name__}")
        out.append(normalize_sft_row(row, i, source))
    if not out:
        raise DataError(f"{source} has no rows; {FORMAT_HELP}.")
    return datasets.Dataset.from_list(out)


def _sft_rows_from_table(path: Path, limit: int | None, *, sample_bytes: int | None = None) -> list[dict]:
    """The normalised rows of one .jsonl/.json/.parquet file, every message checked to be text."""
    source = f"data file {str(path)!r}"
    records = read_records(path, sample_bytes=sample_bytes)
    fields = records.fields
    if fields is not None and "messages" not in fields and not {"prompt", "completion"} <= set(fields):
        raise DataError(f"{source}: {FORMAT_HELP}; fields found: {fields}.")
    scan = TextScan(source)
    rows: list[dict] = []
    for i, (at, record) in enumerate(records.rows):
        if limit is not None and len(rows) >= limit:
            break
        row = normalize_sft_row(record, i, source, where=f"{source}, {at}")
        for part in ("prompt", "completion"):
            for m, message in enumerate(row[part]):
                scan.add(message["content"], f", {at}, {part}[{m}]")
        rows.append(row)
    scan.check()
    return rows


def check_sft_files(files: str | os.PathLike | Sequence[str | os.PathLike], *,
                    sample_bytes: int = SAMPLE_BYTES) -> list[Path]:
    """The pre-load check of ``load_sft_dataset(files=...)``: expand the patterns, check each file.

    Reads at most ``sample_bytes`` of each file (a parquet file: its footer only) and validates the
    rows in it, so a wrong path or format fails before a model is loaded. Returns the files in the
    order the loader reads them.
    """
    paths = expand_data_files(files, allowed=tuple(TABLE_SUFFIXES))
    for path in paths:
        check_data_file(path, tuple(TABLE_SUFFIXES))
        _sft_rows_from_table(path, None, sample_bytes=sample_bytes)
    return paths


def load_sft_dataset(*, files: str | Sequence[str] | None = None, dataset: str | None = None,
                     dataset_config: str | None = None, split: str = "train", limit: int | None = None):
    """Load chat/SFT rows from files (.jsonl/.json/.parquet, glob patterns allowed) or a dataset id/directory.

    Returns a ``datasets.Dataset`` with ``prompt`` and ``completion`` columns, both lists of
    ``{"role", "content"}`` messages (TRL conversational prompt-completion), ready for
    ``SFTTrainer(train_dataset=...)``; the loss then covers only the completion. Files are read as
    :func:`.local_files.expand_data_files` lists them (patterns sorted, each file once). Raises
    ``DataError`` naming the file/row and the fields found for rows in neither accepted format.
    """
    if (files is None) == (dataset is None):
        raise DataError("give exactly one of files or dataset for SFT data.")
    if files is not None:
        rows: list[dict] = []
        for path in expand_data_files(files, allowed=tuple(TABLE_SUFFIXES)):
            check_data_file(path, tuple(TABLE_SUFFIXES))
            rows.extend(_sft_rows_from_table(path, None if limit is None else limit - len(rows)))
            if limit is not None and len(rows) >= limit:
                break
        import datasets

        return datasets.Dataset.from_list(rows)
    table = load_dataset_rows(dataset, dataset_config=dataset_config, split=split, limit=limit)
    return normalize_sft_rows(table, source=f"dataset {dataset!r} (split {split!r})", limit=limit)


_QUESTIONS = {
    "module": ["What does the Python module `{name}` do?", "What is the `{name}` module in Python's standard library for?",
               "In one sentence, what does Python's `{name}` module provide?"],
    "class": ["What is the Python class `{name}`?", "Describe the class `{name}` from the Python standard library in one sentence."],
    "function": ["What does the Python function `{name}` do?", "In one sentence, what does `{name}` do in Python?"],
    "method": ["What does the method `{name}` do in Python?", "Summarise what `{name}` does."],
}


def corpus_qa_pool(split: str = "train", corpus: str = "python_stdlib_docs") -> list[tuple[str, str, str]]:
    """All ``(name, what, summary)`` triples of the corpus split, in corpus order."""
    return [tuple(t) for r in load_corpus_records(corpus, split) for t in r["qa"]]  # type: ignore[misc]


def corpus_qa_dataset(n: int, seed: int = 0, *, split: str = "train", corpus: str = "python_stdlib_docs"):
    """An offline SFT set: questions about the stdlib answered with the docstring's first sentence.

    E.g. prompt ``[{"role": "user", "content": "What does the Python module `json` do?"}]``,
    completion ``[{"role": "assistant", "content": "JSON (JavaScript Object Notation) ..."}]``.
    Module questions come first (shuffled with ``seed``), then classes/functions/methods, so small
    ``n`` gives the easiest questions. Built from the ``train`` split by default, so the eval split
    stays unseen. Raises ``DataError`` when ``n`` exceeds the pool (about 7,000 pairs in ``train``).
    """
    pool = corpus_qa_pool(split, corpus)
    if n <= 0 or n > len(pool):
        raise DataError(f"corpus_qa_dataset: n must be between 1 and {len(pool)} for split {split!r}, got {n}.")
    rng = random.Random(seed)
    modules = [t for t in pool if t[1] == "module"]
    others = [t for t in pool if t[1] != "module"]
    rng.shuffle(modules)
    rng.shuffle(others)
    rows = []
    for name, what, summary in (modules + others)[:n]:
        question = rng.choice(_QUESTIONS[what]).format(name=name)
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "completion": [{"role": "assistant", "content": summary}]})
    import datasets

    return datasets.Dataset.from_list(rows)
