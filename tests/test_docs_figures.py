"""The figures of README.md and docs/ agree with the results rows they cite (`benchmarks/report.py`).

Each generated region is rendered again from `benchmarks/results/` and compared with what the document
holds. The check must also be able to fail: a copy of the documents with one figure altered, and a copy
of the results with one measurement altered, are both reported, naming the document and the region.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def _copy_docs(dest: Path) -> Path:
    """README.md and docs/ copied under `dest`, as a repository root whose results are elsewhere."""
    shutil.copy(ROOT / "README.md", dest / "README.md")
    shutil.copytree(ROOT / "docs", dest / "docs")
    return dest


def _alter(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_every_document_agrees_with_the_results(capsys):
    """`report.py --check` on the repository: every region renders from the results as the document holds it."""
    rc = report.main(["--check"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "regions agree with the results" in out.out


def test_the_documents_have_generated_figures():
    """README's status lines and every reference page carry generated regions (a page with its figures typed
    in by hand would pass the check vacuously)."""
    held = {doc.relative_to(ROOT).as_posix(): {m.group(1) for m in report.MARKER.finditer(doc.read_text())}
            for doc in report.documents(ROOT)}
    assert {"status-sinklora", "status-duo", "status-s2", "status-kv"} <= held["README.md"]
    for page in ("docs/kernels.md", "docs/benchmarks.md", "docs/inference.md", "docs/methods/sinklora.md",
                 "docs/methods/duo.md", "docs/notes.md"):
        assert held[page], f"{page} has no generated region"


def test_an_altered_figure_in_a_document_is_reported(tmp_path, capsys):
    """One number changed in a copy of docs/kernels.md (a table cell) and one in README (an inline headline):
    the check fails and names exactly those documents and regions; --write puts the generated text back."""
    root = _copy_docs(tmp_path)
    kernels_page = (ROOT / "docs" / "kernels.md").read_text()
    s2_row = next(line for line in kernels_page.splitlines() if line.startswith("| S2 strided |"))
    cells = s2_row.split(" | ")
    cells[3] = "9.99x / 9.99x"  # the 32K fwd+bwd cell
    _alter(root / "docs" / "kernels.md", s2_row, " | ".join(cells))
    _alter(root / "README.md", "[1.435x]", "[1.5x]")

    rc = report.main(["--check", "--root", str(root), "--results", str(RESULTS)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "docs/kernels.md: region 'kernels-vs-flex': disagrees with the results" in err
    assert "README.md: region 'status-sinklora': disagrees with the results" in err
    assert err.count("disagrees with the results") == 2, err

    assert report.main(["--write", "--root", str(root), "--results", str(RESULTS)]) == 0
    assert (root / "docs" / "kernels.md").read_text() == kernels_page
    assert (root / "README.md").read_text() == (ROOT / "README.md").read_text()


def test_a_changed_measurement_is_reported_in_every_document_that_shows_it(tmp_path, capsys):
    """The latest S2 32K fwd+bwd row that timed FlexAttention, in a copy of kernels.jsonl, gets a slower Flex time:
    the kernel page's Flex table and README's S2 and kernel status lines no longer agree, and nothing else is
    reported (the per-shape table shows a later run of that shape, made without Flex)."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    lines = (results / "kernels.jsonl").read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if line.strip() and (lambda r: (r["layout"], r["T"], r["Hkv"], r["pass"])
               == ("s2", 32768, 32, "fwd+bwd") and r.get("ms_flex") is not None)(json.loads(line)))
    row = json.loads(lines[last])
    row["ms_flex"] *= 2
    lines[last] = json.dumps(row)
    (results / "kernels.jsonl").write_text("\n".join(lines) + "\n")

    rc = report.main(["--check", "--root", str(ROOT), "--results", str(results)])
    err = capsys.readouterr().err
    assert rc == 1
    reported = {line.split(": disagrees")[0] for line in err.splitlines() if "disagrees" in line}
    assert reported == {
        "README.md: region 'status-s2'",
        "README.md: region 'status-kernels'",
        "docs/kernels.md: region 'kernels-vs-flex'",
    }


def test_an_unknown_region_is_reported(tmp_path, capsys):
    """A marker naming no region is an error, not silently kept."""
    root = tmp_path
    (root / "docs").mkdir()
    (root / "docs" / "page.md").write_text("x <!-- report:no-such-figure -->1.0x<!-- /report --> y\n")
    assert report.main(["--check", "--root", str(root), "--results", str(RESULTS)]) == 1
    assert "docs/page.md: region 'no-such-figure': no such region" in capsys.readouterr().err


def test_every_cited_results_file_exists():
    """Every `benchmarks/results/...` path a document links to or names is in the repository."""
    cited = report.cited_files(ROOT)
    assert any(path.endswith(".jsonl") for path in cited)
    missing = {path: sorted(str(d.relative_to(ROOT)) for d in docs) for path, docs in cited.items()
               if not (ROOT / path).exists()}
    assert not missing, missing


def test_every_results_row_says_its_machine_command_and_date():
    """The rows of every benchmark's results file (`benchmarks/results/*.jsonl`) carry a non-empty machine,
    command and date, so each figure can name what produced it."""
    files = sorted(RESULTS.glob("*.jsonl"))
    assert {f.name for f in files} >= {"kernels.jsonl", "train.jsonl", "decode.jsonl", "quality.jsonl"}
    incomplete = []
    for f in files:
        for row in report.read_rows(f, f.name):
            lacking = [k for k in ("machine", "command", "date") if not row.get(k)]
            if lacking:
                incomplete.append(f"{f.name}:{row.line} lacks {', '.join(lacking)}")
    assert not incomplete, incomplete[:10]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    import re

    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_between_documents_resolve():
    """Every relative link of README.md and docs/ points at a file of the repository, and a `#anchor` into a
    markdown page at one of its headings (the pages link to each other's sections)."""
    import re

    broken = []
    for doc in report.documents(ROOT):
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
                if anchor not in headings:
                    broken.append(f"{doc.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, broken


@pytest.mark.parametrize("lines, expected", [([3, 4, 5, 9], "3-5, 9"), ([7], "7"), ([2, 1, 2], "1-2")])
def test_line_ranges(lines, expected):
    assert report.line_ranges(lines) == expected
