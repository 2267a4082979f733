import json

import pytest

from headwise.data_builders import DataError, load_corpus, load_documents


@pytest.fixture
def files(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("First text document.\nSecond line.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Another document.", encoding="utf-8")
    rows = [{"text": "row one", "id": 1}, {"text": "row two", "id": 2}, {"text": "   ", "id": 3}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps([{"body": "json body"}]), encoding="utf-8")
    datasets.Dataset.from_list([{"text": "parquet one"}, {"text": "parquet two"}]).to_parquet(str(tmp_path / "e.parquet"))
    return tmp_path


def test_files_load_in_order(files):
    docs = load_documents(files=[str(files / n) for n in ("a.txt", "b.txt", "c.jsonl", "e.parquet")])
    # Whitespace-only rows are dropped.
    assert docs == ["First text document.\nSecond line.", "Another document.", "row one", "row two",
                    "parquet one", "parquet two"]
    assert load_documents(files=[str(files / "d.json")], text_field="body") == ["json body"]
    assert load_documents(files=[str(files / "c.jsonl"), str(files / "e.parquet")], limit=3) == [
        "row one", "row two", "parquet one"]


def test_corpus_source():
    assert load_documents(corpus="python_stdlib_docs", split="eval") == load_corpus(split="eval")
    assert len(load_documents(corpus="python_stdlib_docs", limit=5)) == 5


def test_local_dataset_directory(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"content": "saved doc"}])}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(dataset=str(tmp_path / "ds"), text_field="content") == ["saved doc"]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_documents(dataset=str(tmp_path / "ds"), split="validation", text_field="content")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl.*does not exist"):
        load_documents(files=[str(tmp_path / "nope.jsonl")])


def test_wrong_extension(tmp_path):
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"x\.csv.*unsupported extension '\.csv'.*\.txt, \.jsonl"):
        load_documents(files=[str(tmp_path / "x.csv")])


def test_missing_text_field_lists_fields(files):
    with pytest.raises(DataError, match=r"c\.jsonl.*no field 'content'.*fields found: \['text', 'id'\].*text_field"):
        load_documents(files=[str(files / "c.jsonl")], text_field="content")


def test_non_text_field(files):
    with pytest.raises(DataError, match=r"c\.jsonl.*row 0.*'id' is int"):
        load_documents(files=[str(files / "c.jsonl")], text_field="id")


def test_empty_result(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty\.txt.*no non-empty documents"):
        load_documents(files=[str(tmp_path / "empty.txt")])


def test_exactly_one_source(files):
    with pytest.raises(DataError, match="exactly one"):
        load_documents()
    with pytest.raises(DataError, match="exactly one"):
        load_documents(corpus="python_stdlib_docs", files=[str(files / "a.txt")])


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match=r"could not load local directory .*not_a_dataset"):
        (tmp_path / "not_a_dataset").mkdir()
        load_documents(dataset=str(tmp_path / "not_a_dataset"))
