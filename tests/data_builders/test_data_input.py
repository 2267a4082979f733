"""Bad training data is refused in words, before the model loads; glob patterns in data.files work.

Each case runs through the loaders (``load_documents`` / ``load_sft_dataset``, which read whole
files) and through the pre-load check (``headwise.train.data.check_data_sources``, which reads the start
of each file), and the message must name the file or pattern. The CLI tests run the real
``headwise train`` on the tiny model: README's ``files: [notes/*.jsonl]`` trains, and a refused run
leaves the user's files byte for byte as they were and creates no run directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import pytest

from headwise.train.data import check_data_sources
from headwise.data_builders import DataError, load_documents, load_sft_dataset
from headwise.data_builders.local_files import MAX_CONTROL_SHARE
from headwise.data_builders.sft import check_sft_files
from headwise.data_builders.sources import check_document_files
from headwise.recipe.schema import DataSection
from tests.conftest import run_cli, write_recipe


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _precheck(files: list[str], builder: str = "text", **fields) -> None:
    check_data_sources(DataSection(builder=builder, files=files, **fields))


def assert_refused_everywhere(files: list[str], pattern: str, *, sft: bool = False) -> None:
    """The loader and the pre-load check both refuse ``files`` with a message matching ``pattern``."""
    if sft:
        calls = [lambda: load_sft_dataset(files=files), lambda: _precheck(files, "sft")]
    else:
        calls = [lambda: load_documents(files=files), lambda: _precheck(files)]
    for call in calls:
        with pytest.raises(DataError, match=pattern) as info:
            call()
        assert not str(info.value).rstrip().endswith(":"), info.value  # a reason in words follows


# ------------------------------------------------------------------------------------------ globs


@pytest.fixture
def notes(tmp_path, monkeypatch):
    """notes/{c,a,b}.jsonl written in that order (so directory order is not sorted order), a nested
    notes/sub/d.jsonl and a notes/README.md; the test runs from tmp_path, as a user would."""
    monkeypatch.chdir(tmp_path)
    for name in ("c", "a", "b"):
        _jsonl(tmp_path / "notes" / f"{name}.jsonl", [{"text": f"{name} first"}, {"text": f"{name} second"}])
    _jsonl(tmp_path / "notes" / "sub" / "d.jsonl", [{"text": "d nested"}])
    (tmp_path / "notes" / "README.md").write_text("not data")
    return tmp_path


def test_glob_reads_every_match_in_sorted_order(notes):
    expected = ["a first", "a second", "b first", "b second", "c first", "c second"]
    assert load_documents(files=["notes/*.jsonl"]) == expected
    assert check_document_files(["notes/*.jsonl"]) == [Path(f"notes/{n}.jsonl") for n in "abc"]
    _precheck(["notes/*.jsonl"])
    # `**` spans folders as in Python's glob (and matches the top folder itself).
    assert load_documents(files=["notes/**/*.jsonl"]) == expected + ["d nested"]
    # Overlapping patterns and repeated paths: each file once, at its first place.
    assert load_documents(files=["notes/b.jsonl", "notes/*.jsonl", "./notes/a.jsonl"]) == [
        "b first", "b second", "a first", "a second", "c first", "c second"]
    # Absolute patterns work the same way.
    assert load_documents(files=[str(notes / "notes" / "[ab].jsonl")]) == expected[:4]


def test_glob_for_sft_files_reads_sorted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("z", "m"):
        _jsonl(tmp_path / "chats" / f"{name}.jsonl", [{"prompt": f"{name}?", "completion": f"{name}!"}])
    ds = load_sft_dataset(files=["chats/*.jsonl"])
    assert [r["prompt"][0]["content"] for r in ds] == ["m?", "z?"]
    assert check_sft_files(["chats/*.jsonl"]) == [Path("chats/m.jsonl"), Path("chats/z.jsonl")]
    _precheck(["chats/*.jsonl"], "sft")


def test_glob_that_matches_nothing_names_pattern_and_folder(notes):
    assert_refused_everywhere(["notes/*.parquet"], rf"pattern 'notes/\*\.parquet' matches no files: nothing in "
                                             rf"'{re.escape(str(notes / 'notes'))}' matches it.*current directory")
    assert_refused_everywhere(["nowhere/*.jsonl"], rf"pattern 'nowhere/\*\.jsonl' matches no files: the folder "
                                             rf"'{re.escape(str(notes / 'nowhere'))}' does not exist")
    assert_refused_everywhere(["notes/*.jsonl", "more/*.txt"], r"pattern 'more/\*\.txt' matches no files")
    assert_refused_everywhere(["notes/s*"], r"pattern 'notes/s\*' matches no files: it matches only folders \('notes/sub'\)")
    assert_refused_everywhere(["notes/*"], r"pattern 'notes/\*' matches 'notes/README\.md', whose extension '\.md' is not "
                                     r"supported.*narrow the pattern")


@pytest.mark.slow
def test_cli_trains_on_readme_glob(notes, tiny_model_dir):
    """README's `files: [notes/*.jsonl]`, through the real `headwise train`, from the user's folder."""
    for name in ("c", "a", "b"):  # long enough documents to fill a 64-token sample
        _jsonl(notes / "notes" / f"{name}.jsonl", [{"text": f"Document {name}, sentence {i}. " * 20} for i in range(2)])
    before = _checksums(notes / "notes")
    recipe = write_recipe(notes, {
        "model": {"name": str(tiny_model_dir)},
        "data": {"builder": "text", "files": ["notes/*.jsonl"], "max_length": 64},
        "training": {"output_dir": "runs/glob", "max_steps": 1, "save_steps": 1},
    })
    res = run_cli("train", recipe.name, cwd=notes)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data.files: 3 file(s), read in this order: notes/a.jsonl, notes/b.jsonl, notes/c.jsonl" in res.stderr
    assert (notes / "runs" / "glob" / "final").is_dir()
    assert _checksums(notes / "notes") == before


@pytest.mark.slow
@pytest.mark.parametrize("files, write, needle", [
    (["notes/*.jsonl"], None, "data.files pattern 'notes/*.jsonl' matches no files"),
    (["data/random.txt"], lambda d: (d / "random.txt").write_bytes(b"text \xff\xfe" + os.urandom(2000)),
     "data file 'data/random.txt' is not UTF-8 text: byte 0xff at byte offset 5"),
    (["data/*.jsonl"], lambda d: (d / "empty.jsonl").write_bytes(b""),
     "data file 'data/empty.jsonl' is empty (0 bytes)"),
], ids=["glob-matches-nothing", "random-bytes-txt", "empty-jsonl"])
def test_cli_refuses_bad_data_before_touching_anything(tmp_path, tiny_model_dir, files, write, needle):
    (tmp_path / "data").mkdir()
    if write:
        write(tmp_path / "data")
    recipe = write_recipe(tmp_path, {
        "model": {"name": str(tiny_model_dir)},
        "data": {"builder": "text", "files": files, "max_length": 64},
        "training": {"output_dir": "runs/bad", "max_steps": 1},
    })
    before = _checksums(tmp_path)
    res = run_cli("train", recipe.name, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"headwise: error: {needle}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()
    assert _checksums(tmp_path) == before


# ------------------------------------------------------------------------------------- text files


def test_random_bytes_txt_is_refused_with_offset(tmp_path):
    path = tmp_path / "random.txt"
    path.write_bytes("naïve ".encode() + b"\x9c" + os.urandom(4000))
    assert_refused_everywhere([str(path)], r"'[^']*random\.txt' is not UTF-8 text: byte 0x9c at byte offset 7 .*iconv")


def test_utf16_and_nul_bytes_are_refused(tmp_path):
    bom = tmp_path / "bom16.txt"
    bom.write_text("Hello, world.", encoding="utf-16")  # with a byte-order mark
    assert_refused_everywhere([str(bom)], r"bom16\.txt' is not UTF-8 text: byte 0xff at byte offset 0.*"
                                    r"UTF-16 byte-order mark")
    plain = tmp_path / "le16.txt"
    plain.write_bytes("Hello, world.".encode("utf-16-le"))  # ASCII in UTF-16 decodes as UTF-8, NULs between
    assert_refused_everywhere([str(plain)], r"le16\.txt' does not look like text: it holds NUL bytes "
                                      r"\(the first at byte offset 1\)")


def test_control_characters_are_refused_above_the_share(tmp_path):
    noisy = tmp_path / "noisy.txt"
    noisy.write_text("ab\x07\x1b" * 100, encoding="utf-8")
    assert_refused_everywhere([str(noisy)], r"noisy\.txt' does not look like text: 200 of 400 characters \(50%\) are control "
                                      r"characters \(the first, '\\x07', at character 2\)")
    # Real text with tabs, form feeds, CRLF and a few terminal colour codes is fine, and a UTF-8 BOM is dropped.
    fine = tmp_path / "fine.txt"
    body = "col\tumn\r\n\x0c" + "\x1b[32mok\x1b[0m " + "plain words " * 40
    assert sum(c in "\x07\x1b" for c in body) / len(body) < MAX_CONTROL_SHARE
    fine.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_documents(files=[str(fine)]) == [body]
    _precheck([str(fine)])


def test_precheck_reads_a_sample_and_the_loader_reads_everything(tmp_path):
    txt = tmp_path / "late.txt"
    txt.write_bytes("é".encode() * 40 + b"\xff")  # a 2-byte character is cut at byte 63 of a 64-byte sample
    check_document_files([str(txt)], sample_bytes=63)
    with pytest.raises(DataError, match=r"late\.txt' is not UTF-8 text: byte 0xff at byte offset 80"):
        load_documents(files=[str(txt)])
    jsonl = tmp_path / "late.jsonl"
    jsonl.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "cut', encoding="utf-8")
    check_document_files([str(jsonl)], sample_bytes=20)
    with pytest.raises(DataError, match=r"late\.jsonl', line 2 is truncated"):
        load_documents(files=[str(jsonl)])


def test_text_fields_in_rows_are_checked(tmp_path):
    import datasets

    nul = _jsonl(tmp_path / "nul.jsonl", [{"text": "fine"}, {"text": "bin\u0000ary"}])
    assert_refused_everywhere([str(nul)], r"nul\.jsonl', row 1 \(line 2\), field 'text': the text holds a NUL character")
    ctl = tmp_path / "ctl.parquet"
    datasets.Dataset.from_list([{"text": "\x01\x02\x03 x"}] * 3).to_parquet(str(ctl))
    with pytest.raises(DataError, match=r"ctl\.parquet' does not look like text: 9 of 15 characters"):
        load_documents(files=[str(ctl)])
    chat = _jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi", "completion": "\u0000"}])
    assert_refused_everywhere([str(chat)], r"chat\.jsonl', row 0 \(line 1\), completion\[0\]: the text holds a NUL", sft=True)


# ------------------------------------------------------------------------------ table file errors

TEXT_CASES = {
    "empty": ("empty.jsonl", b"", r"empty\.jsonl' is empty \(0 bytes\); it needs records"),
    "blank-lines": ("blank.jsonl", b"\n  \n", r"blank\.jsonl' has no records, only blank lines"),
    "truncated-last-line": ("cut.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c',
                            r"cut\.jsonl', line 3 is truncated: it ends in the middle of a JSON value"),
    "truncated-middle-line": ("mid.jsonl", b'{"text": "a"}\n{"text": \n{"text": "c"}\n',
                              r"mid\.jsonl', line 2 is truncated"),
    "invalid-json": ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}}\n',
                     r"bad\.jsonl', line 2 is not valid JSON: Extra data"),
    "not-an-object": ("str.jsonl", b'{"text": "a"}\n"just a string"\n',
                      r"str\.jsonl', line 2 is a string, not a JSON object"),
    "list-line": ("list.jsonl", b'[{"text": "a"}]\n', r"list\.jsonl', line 1 is a list, not a JSON object"),
    "bad-utf8-line": ("latin.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n',
                      r"latin\.jsonl', line 2 is not UTF-8: byte 0xe9 at byte offset 27"),
    "missing-field": ("miss.jsonl", b'{"text": "a"}\n{"body": "b"}\n',
                      r"miss\.jsonl', row 1 \(line 2\) has no field 'text'; fields found: \['body'\]"),
    "wrong-type": ("num.jsonl", b'{"text": "a"}\n{"text": 5}\n',
                   r"num\.jsonl', row 1 \(line 2\): field 'text' is int, not text"),
    "json-list-of-strings": ("strings.json", b'["one", "two"]',
                             r"strings\.json' is a list of strings, not a list of objects"),
    "json-scalar": ("scalar.json", b'42', r"scalar\.json' holds a number"),
    "json-empty-list": ("none.json", b"[]", r"none\.json' holds an empty list"),
    "json-truncated": ("cut.json", b'[{"text": "a"},\n {"text": "b"',
                       r"cut\.json' is not valid JSON: .* at line 2, column .*looks truncated"),
}


@pytest.mark.parametrize("name, content, pattern", TEXT_CASES.values(), ids=list(TEXT_CASES))
def test_bad_table_files_are_refused_in_words(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    assert_refused_everywhere([str(path)], pattern)


SFT_CASES = {
    "empty": ("empty.jsonl", b"", r"empty\.jsonl' is empty \(0 bytes\)"),
    "truncated": ("cut.jsonl", b'{"prompt": "q", "completion": "a"}\n{"prompt": "q", "compl',
                  r"cut\.jsonl', line 2 is truncated"),
    "not-an-object": ("num.jsonl", b'{"prompt": "q", "completion": "a"}\n7\n', r"num\.jsonl', line 2 is a number"),
    "missing-field": ("miss.jsonl", b'{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n',
                      r"miss\.jsonl', row 1 \(line 2\): rows must have either 'messages'.*fields found: \['prompt'\]"),
    "wrong-type": ("type.jsonl", b'{"prompt": "q", "completion": 3}\n',
                   r"type\.jsonl', row 0 \(line 1\), 'completion'"),
    "json-list-of-strings": ("strings.json", b'["q", "a"]', r"strings\.json' is a list of strings"),
}


@pytest.mark.parametrize("name, content, pattern", SFT_CASES.values(), ids=list(SFT_CASES))
def test_bad_sft_files_are_refused_in_words(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    assert_refused_everywhere([str(path)], pattern, sft=True)


def test_good_json_shapes_still_load(tmp_path):
    lines = tmp_path / "lines.json"  # JSON Lines saved as .json, which `datasets` also reads
    lines.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    one = tmp_path / "one.json"  # a single object is one record
    one.write_text('{"text": "only"}', encoding="utf-8")
    nulls = _jsonl(tmp_path / "nulls.jsonl", [{"text": None}, {"text": "kept"}])  # null = an empty row, skipped
    assert load_documents(files=[str(lines), str(one), str(nulls)]) == ["one", "two", "only", "kept"]
    _precheck([str(lines), str(one), str(nulls)])


def test_truncated_and_empty_parquet(tmp_path):
    import datasets

    whole = tmp_path / "whole.parquet"
    datasets.Dataset.from_list([{"text": f"row {i} " * 50} for i in range(200)]).to_parquet(str(whole))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_refused_everywhere([str(cut)], r"cut\.parquet' is not a readable parquet file \(.*\); it is truncated")
    assert_refused_everywhere([str(cut)], r"cut\.parquet' is not a readable parquet file", sft=True)
    empty = tmp_path / "norows.parquet"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(empty))
    assert_refused_everywhere([str(empty)], r"norows\.parquet' has no rows")
    with pytest.raises(DataError, match=r"whole\.parquet' has no field 'body'; fields found: \['text'\]"):
        _precheck([str(whole)], text_field="body")
    with pytest.raises(DataError, match=r"whole\.parquet': rows must have either 'messages'.*fields found: \['text'\]"):
        _precheck([str(whole)], "sft")


# ------------------------------------------------------------------------------------ file access


def test_directory_is_refused(tmp_path):
    folder = tmp_path / "shards.jsonl"
    folder.mkdir()
    assert_refused_everywhere([str(folder)], r"shards\.jsonl' is a folder; list the files inside it")


@contextlib.contextmanager
def _as_unprivileged_user():
    """Root reads any file regardless of its mode; drop the effective uid to `nobody` while inside."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_file_is_refused():
    with tempfile.TemporaryDirectory() as folder:  # a folder `nobody` may enter (pytest's tmp_path is private)
        os.chmod(folder, 0o755)
        locked = Path(folder) / "locked.txt"
        locked.write_text("secret text", encoding="utf-8")
        locked.chmod(0o000)
        before = locked.stat()
        with _as_unprivileged_user():
            for call in (lambda: load_documents(files=[str(locked)]), lambda: _precheck([str(locked)])):
                with pytest.raises(DataError, match=r"locked\.txt' cannot be read: permission denied; make it"):
                    call()
        assert locked.stat().st_mode == before.st_mode


def test_missing_file_names_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused_everywhere(["gone.jsonl"], rf"data\.files: gone\.jsonl does not exist \(relative paths are resolved "
                                        rf"from the current directory {re.escape(str(tmp_path))}\)")
