"""Local data files (``data.files``): glob expansion, access checks, and strict readers.

Every builder that reads ``data.files`` goes through here, in the pre-load check (which reads only
the first :data:`SAMPLE_BYTES` of each file) and in the loaders (which read everything), so both
see the same files in the same order and refuse the same bad input:

* entries may be glob patterns (``notes/*.jsonl``, ``corpus/**/*.txt``), expanded with Python's
  ``glob`` (``**`` spans folders), sorted per pattern so the data order is stable; a file matched
  twice is read once; relative paths are resolved from the current directory;
* ``.txt`` must be UTF-8 text: an undecodable byte, a NUL byte or more than
  :data:`MAX_CONTROL_SHARE` control characters is refused (a binary file would otherwise train as
  replacement characters without a word);
* ``.jsonl`` / ``.json`` / ``.parquet`` are parsed here (stdlib ``json``, ``pyarrow.parquet``)
  rather than by ``datasets``, whose errors for an empty file or a truncated line have no words in
  them; every error names the file, the line or row, and what is wrong.

Problems raise :class:`DataError` with one message naming the file (or pattern) and the fix.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ALL_SUFFIXES = TEXT_SUFFIXES + tuple(TABLE_SUFFIXES)

# The pre-load check reads this much of each file: enough to catch a wrong format or a binary file
# at the start, without reading a multi-gigabyte corpus twice.
SAMPLE_BYTES = 1 << 20

# Prose, code and markup have (almost) no control characters besides tab, newline, carriage return
# and form feed; a few ANSI colour escapes in a log stay well below this share, binary data is far above it.
MAX_CONTROL_SHARE = 0.05
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")

_GLOB_CHARS = re.compile(r"[*?[]")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_PARQUET_BATCH_ROWS = 1024

_JSON_TYPE_NAMES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
                    type(None): "null", dict: "an object"}
_JSONL_EXAMPLE = '{"text": "..."}'


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _label(path: Path) -> str:
    return f"data file {str(path)!r}"


def _relative_hint(path: str | Path) -> str:
    return "" if Path(path).is_absolute() else f" (relative paths are resolved from the current directory {Path.cwd()})"


# ------------------------------------------------------------------------------------- file lists


def _no_match_message(pattern: str, folders: list[str]) -> str:
    parts = Path(pattern).parts
    first_glob = next((i for i, part in enumerate(parts) if _GLOB_CHARS.search(part)), len(parts))
    folder = Path(*parts[:first_glob]) if first_glob else Path(".")
    absolute = folder if folder.is_absolute() else Path.cwd() / folder
    if folders:
        where = f"it matches only folders ({', '.join(map(repr, folders[:3]))}{', ...' if len(folders) > 3 else ''})"
    elif not absolute.is_dir():
        where = f"the folder {str(absolute)!r} does not exist"
    else:
        where = f"nothing in {str(absolute)!r} matches it"
    return (f"data.files pattern {pattern!r} matches no files: {where}{_relative_hint(pattern)}. Fix the pattern "
            "or run from the folder it is relative to (patterns follow Python's glob: `*` stays within a folder, "
            "`**` spans folders, and names starting with `.` need the `.` written out).")


def expand_data_files(files: str | os.PathLike | Iterable[str | os.PathLike], *,
                      allowed: Sequence[str] = ALL_SUFFIXES) -> list[Path]:
    """The files ``data.files`` names, glob patterns expanded, each file once.

    A plain path is kept as written (whether it exists is :func:`check_data_file`'s job, so its
    message can say what is wrong). A pattern (``*``, ``?``, ``[``) is expanded with
    ``glob.glob(recursive=True)`` and its matches are sorted; folders it matches are skipped. A
    path that exists as written is never treated as a pattern, so a file named ``a[1].txt`` still
    loads. Order: entries as listed, matches sorted within each; a file reached again (overlapping
    patterns, or listed twice) is read only the first time.

    Raises ``DataError`` for a pattern that matches no files (naming the folder it searched) and for
    a match with an extension outside ``allowed`` (naming the file and the pattern, so the pattern
    can be narrowed).
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]  # a single path is a common slip in YAML; accept it
    seen: set[str] = set()
    out: list[Path] = []
    for entry in files:
        written = os.path.expanduser(os.fspath(entry))
        if not _GLOB_CHARS.search(written) or os.path.lexists(written):
            matches = [written]
        else:
            found = sorted(glob.glob(written, recursive=True))
            matches = [m for m in found if not os.path.isdir(m)]
            if not matches:
                raise DataError(_no_match_message(written, found))
            for m in matches:
                if Path(m).suffix.lower() not in allowed:
                    raise DataError(f"data.files pattern {written!r} matches {m!r}, whose extension "
                                    f"{Path(m).suffix or '(none)'!r} is not supported (supported: "
                                    f"{', '.join(allowed)}); narrow the pattern to the data files (e.g. `*.jsonl` "
                                    "instead of `*`).")
        for m in matches:
            key = os.path.normcase(os.path.abspath(m))
            if key not in seen:
                seen.add(key)
                out.append(Path(m))
    return out


def check_data_file(path: Path, allowed: Sequence[str]) -> None:
    """Refuse, in words, a data file that is missing, a folder, not a regular file, unreadable or of
    an unsupported type."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"data.files: {path} does not exist{_relative_hint(path)}; fix the path.") from None
    except PermissionError:
        raise DataError(f"{_label(path)} cannot be reached: permission denied on it or on a folder above it; "
                        "fix the permissions (e.g. chmod) or copy the file somewhere readable.") from None
    except OSError as exc:
        raise DataError(f"{_label(path)} cannot be opened: {exc.strerror or exc}; fix the path in "
                        "data.files.") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{_label(path)} is a folder; list the files inside it (a pattern such as "
                        f"{str(path / '*.jsonl')!r} works), or use data.dataset for a saved `datasets` folder.")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{_label(path)} is not a regular file (a pipe, socket or device); point data.files at "
                        "a file on disk.")
    if path.suffix.lower() not in allowed:
        raise DataError(f"{_label(path)} has an unsupported extension {path.suffix!r}; supported: "
                        f"{', '.join(allowed)}. Rename or convert the file.")
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise DataError(f"{_label(path)} cannot be read: permission denied; make it readable "
                        f"(chmod u+r {str(path)!r}) or run as a user who can read it.") from None
    except OSError as exc:
        raise DataError(f"{_label(path)} cannot be opened: {exc.strerror or exc}.") from None


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as exc:
        raise DataError(f"could not read {_label(path)}: {exc.strerror or exc}.") from None


# ------------------------------------------------------------------------------------------ text


class TextScan:
    """Checks that the strings read from one file are text: no NUL, few control characters.

    ``add`` every string (a NUL is refused at once, naming where it was); ``check`` at the end
    refuses the file if more than :data:`MAX_CONTROL_SHARE` of all characters are control characters.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.chars = 0
        self.controls = 0
        self.first_control: tuple[str, int, str] | None = None

    def add(self, text: str, where: str = "") -> None:
        nul = text.find("\x00")
        if nul >= 0:
            raise DataError(f"{self.source}{where}: the text holds a NUL character (at character {nul}), so it is "
                            "binary data, not text; remove it or the row.")
        found = _CONTROL_CHARS.findall(text)
        if found and self.first_control is None:
            self.first_control = (where, _CONTROL_CHARS.search(text).start(), found[0])  # type: ignore[union-attr]
        self.controls += len(found)
        self.chars += len(text)

    def check(self) -> None:
        if not self.chars or self.controls / self.chars <= MAX_CONTROL_SHARE:
            return
        where, offset, char = self.first_control  # type: ignore[misc]
        raise DataError(f"{self.source} does not look like text: {self.controls} of {self.chars} characters "
                        f"({self.controls / self.chars:.0%}) are control characters (the first, {char!r}, at "
                        f"character {offset}{where}); text has at most {MAX_CONTROL_SHARE:.0%}. Remove the file "
                        "from data.files, or clean it (strip terminal colour codes and binary parts).")


def _decode_utf8(data: bytes, path: Path, *, complete: bool, base_offset: int = 0) -> str:
    """``data`` as UTF-8 (a leading BOM dropped); an undecodable byte is refused with its offset.

    With ``complete=False`` (a sample cut from a longer file) a multi-byte character cut at the end
    is not an error.
    """
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data[skip:], final=complete)
    except UnicodeDecodeError as exc:
        offset = base_offset + skip + exc.start
        hint = (" It starts with a UTF-16 byte-order mark: convert it with `iconv -f utf-16 -t utf-8`."
                if data.startswith(_UTF16_BOMS) else
                " If it is text in another encoding, convert it (e.g. `iconv -f latin1 -t utf-8`); if it is not "
                "text, remove it from data.files.")
        raise DataError(f"{_label(path)} is not UTF-8 text: byte 0x{data[skip + exc.start]:02x} at byte offset "
                        f"{offset} cannot be decoded ({exc.reason}).{hint}") from None


def _check_no_nul_bytes(data: bytes, path: Path) -> None:
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{_label(path)} does not look like text: it holds NUL bytes (the first at byte offset "
                        f"{nul}), as binary files and UTF-16 text do. Remove it from data.files, or convert "
                        "UTF-16 text to UTF-8 (`iconv -f utf-16 -t utf-8`).")


def read_text_file(path: Path, *, sample_bytes: int | None = None) -> str:
    """The text of a ``.txt`` file, strictly UTF-8 and text-like (see :class:`TextScan`).

    With ``sample_bytes`` only the beginning is read and checked (the pre-load check).
    """
    data = _read_bytes(path, None if sample_bytes is None else sample_bytes + 1)
    complete = sample_bytes is None or len(data) <= sample_bytes
    data = data if complete else data[:sample_bytes]
    text = _decode_utf8(data, path, complete=complete)
    _check_no_nul_bytes(data, path)
    scan = TextScan(_label(path))
    scan.add(text)
    scan.check()
    return text


# --------------------------------------------------------------------------------------- records


class Records:
    """The records of one table file: ``fields`` (the columns, when the format declares them, i.e.
    parquet; None for JSON, whose fields are per row) and ``rows``, an iterator of
    ``(location, record)`` where location reads ``"row 3"`` or ``"row 3 (line 4)"`` (rows count
    from 0, as in ``datasets``; lines from 1, as in an editor)."""

    def __init__(self, fields: list[str] | None, rows: Iterator[tuple[str, dict]]) -> None:
        self.fields = fields
        self.rows = rows


def read_records(path: Path, *, columns: Sequence[str] | None = None, sample_bytes: int | None = None) -> Records:
    """The records of a ``.jsonl``, ``.json`` or ``.parquet`` file, validated as they are read.

    Args:
        columns: for parquet, read only these columns (those the file has); JSON is read whole.
        sample_bytes: read only about this much of the file (the pre-load check): JSON Lines up to
            the last complete line in it, a ``.json`` only if it is that small, a parquet file only
            its footer (schema and row count).

    Raises ``DataError`` naming the file and, where there is one, the line or row, for: an empty
    file, undecodable bytes, a line or document that is not valid JSON (a cut-off one called
    truncated), a value that is not a JSON object, an unreadable or truncated parquet file, a file
    without rows.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path, columns, sample_bytes)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"could not read {_label(path)}: {exc.strerror or exc}.") from None
    if size == 0:
        example = _JSONL_EXAMPLE if suffix == ".jsonl" else f"[{_JSONL_EXAMPLE}]"
        raise DataError(f"{_label(path)} is empty (0 bytes); it needs records such as {example}. "
                        "Remove it from data.files or write the data again.")
    if suffix == ".jsonl":
        return Records(None, _jsonl_rows(path, sample_bytes))
    return _json_records(path, size, sample_bytes)


def _json_problem(exc: json.JSONDecodeError, text: str) -> tuple[str, bool]:
    """``exc`` in words ("Expecting value at line 1, column 9") and whether the text looks cut off."""
    at = f"line {exc.lineno}, column {exc.colno}" if "\n" in text.rstrip() else f"column {exc.colno}"
    words = f"{exc.msg} {at}" if exc.msg.endswith(" at") else f"{exc.msg} at {at}"
    return words, exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())


def _jsonl_error(path: Path, line_no: int, text: str, exc: json.JSONDecodeError) -> DataError:
    where = f"{_label(path)}, line {line_no}"
    words, cut_off = _json_problem(exc, text)
    if cut_off:
        return DataError(f"{where} is truncated: it ends in the middle of a JSON value ({words}). The file was "
                         "probably cut off while being written or copied; write it again, or delete that line.")
    return DataError(f"{where} is not valid JSON: {words}. Each line of a .jsonl file must be one JSON object "
                     f"such as {_JSONL_EXAMPLE}; fix or delete that line.")


def _not_an_object(where: str, value: Any, fix: str) -> DataError:
    return DataError(f"{where} is {_json_type(value)}, not a JSON object; {fix}")


def _jsonl_rows(path: Path, sample_bytes: int | None) -> Iterator[tuple[str, dict]]:
    row = 0
    offset = 0
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError(f"could not read {_label(path)}: {exc.strerror or exc}.") from None
    cut_short = False  # the sample ended before the file did
    with f:
        line_no = 0
        while True:
            if sample_bytes is None:
                raw = f.readline()
            else:  # the sample holds complete lines only, and a huge first line is not read whole
                left = sample_bytes - offset
                raw = f.readline(left + 1) if left > 0 else b""
                if left <= 0 or len(raw) > left:
                    cut_short = True
                    break
            if not raw:
                break
            line_no += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{_label(path)}, line {line_no} is not UTF-8: byte 0x{raw[exc.start]:02x} at byte "
                                f"offset {offset + exc.start} cannot be decoded ({exc.reason}). Write the file as "
                                "UTF-8 (json.dumps escapes everything else).") from None
            if line_no == 1:
                text = text.lstrip("\ufeff")
            offset += len(raw)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _jsonl_error(path, line_no, text, exc) from None
            if not isinstance(value, dict):
                raise _not_an_object(f"{_label(path)}, line {line_no}", value,
                                     f"each line of a .jsonl file must be one object such as {_JSONL_EXAMPLE}.")
            yield f"row {row} (line {line_no})", value
            row += 1
    if row == 0 and not cut_short:
        raise DataError(f"{_label(path)} has no records, only blank lines; write one JSON object per line, "
                        f"such as {_JSONL_EXAMPLE}.")


def _json_records(path: Path, size: int, sample_bytes: int | None) -> Records:
    if sample_bytes is not None and size > sample_bytes:
        head = _decode_utf8(_read_bytes(path, 64), path, complete=False).lstrip()
        if head[:1] not in ("[", "{"):
            raise DataError(f"{_label(path)} does not start with a JSON list or object (it starts with "
                            f"{head[:20]!r}); a .json data file holds [{_JSONL_EXAMPLE}, ...].")
        return Records(None, iter(()))  # too big to parse twice; the loader checks it in full
    text = _decode_utf8(_read_bytes(path), path, complete=True)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return Records(None, _jsonl_rows(path, sample_bytes))  # JSON Lines saved as .json
        words, cut_off = _json_problem(exc, text)
        why = " (the file ends in the middle of a value, so it looks truncated: write it again)" if cut_off else ""
        raise DataError(f"{_label(path)} is not valid JSON: {words}{why}. A .json data file holds a list of "
                        f"objects such as [{_JSONL_EXAMPLE}].") from None
    if isinstance(value, dict):
        return Records(None, iter([("row 0", value)]))  # one record, as `datasets` reads it
    if not isinstance(value, list):
        raise DataError(f"{_label(path)} holds {_json_type(value)}; a .json data file holds a list of objects "
                        f"such as [{_JSONL_EXAMPLE}].")
    if not value:
        raise DataError(f"{_label(path)} holds an empty list: no records. Remove it from data.files or write "
                        "the data again.")
    first = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
    if first is not None:
        what = ("a list of strings" if all(isinstance(v, str) for v in value)
                else f"a list whose item {first} is {_json_type(value[first])}")
        raise DataError(f"{_label(path)} is {what}, not a list of objects; write each record as an object "
                        f"such as [{_JSONL_EXAMPLE}] (or put each document in its own .txt file).")
    return Records(None, ((f"row {i}", v) for i, v in enumerate(value)))


def _parquet_records(path: Path, columns: Sequence[str] | None, sample_bytes: int | None) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{_label(path)} is not a readable parquet file ({exc}); it is truncated, damaged or not "
                        "parquet at all: write it again (e.g. Dataset.to_parquet) or download it again.") from None
    fields = list(parquet.schema_arrow.names)
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{_label(path)} has no rows (columns: {fields}); remove it from data.files or write the "
                        "data again.")
    if sample_bytes is not None:
        return Records(fields, iter(()))
    wanted = fields if columns is None else [c for c in columns if c in fields]

    def rows() -> Iterator[tuple[str, dict]]:
        index = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
                for record in batch.to_pylist():
                    yield f"row {index}", record
                    index += 1
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{_label(path)} could not be read past row {index} ({exc}); it is truncated or "
                            "damaged: write it again or download it again.") from None

    return Records(fields, rows())


__all__ = [
    "ALL_SUFFIXES",
    "MAX_CONTROL_SHARE",
    "SAMPLE_BYTES",
    "TABLE_SUFFIXES",
    "TEXT_SUFFIXES",
    "Records",
    "TextScan",
    "check_data_file",
    "expand_data_files",
    "read_records",
    "read_text_file",
]
