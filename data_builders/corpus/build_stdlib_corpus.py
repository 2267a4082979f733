"""Build ``python_stdlib_docs.jsonl.gz``: an offline English corpus made of Python's own documentation.

Why: the quickstart, the tests and the long-context perplexity evaluation need real English prose
that is identical on every machine and needs no network. The Python standard library carries a few
megabytes of it: module, class and function docstrings, the explanatory comment blocks in its
sources, and the language-reference topics that ``help()`` shows (``pydoc_data.topics``).

How the shipped file was made (Python 3.11.7, Linux, from the repository root)::

    python data_builders/corpus/build_stdlib_corpus.py

The script is deterministic for one Python version and platform (sorted module list, sorted members,
gzip header without a timestamp), but the docstrings themselves differ between Python versions. That
is why the *output* is committed and the loaders never regenerate it: every machine reads the same
bytes whatever Python it runs.

What goes in, per document (one JSON object per line):

* ``kind="module"``: one document per public stdlib module (sorted by dotted name; ``pkgutil`` walks
  the packages; private ``_x`` modules, tests, GUI launchers and modules with import side effects are
  skipped). Text = the module docstring, then every public class / function defined in it (and the
  methods of those classes) with its docstring under a short heading, then the module's source
  comment blocks of three or more lines.
* ``kind="reference"``: one document per language-reference topic of ``pydoc_data.topics``.

Cleaning: doctest sessions (``>>>`` lines and their output), reStructuredText underlines, signature
lines and other lines that look like code (few letters, many symbols, or starting with a Python
keyword such as ``def``/``import``) are dropped; blank-line runs are collapsed; long docstrings that
and paragraphs (over 150 characters) that repeat verbatim elsewhere are kept once, so the train
and eval splits do not share text.

* ``kind="manual"``: IDLE's manual page (``idlelib/help.html``, Sphinx output of the library docs)
  and the plain-text documentation files in the stdlib (``STDLIB_TEXT_FILES``: LICENSE.txt with the
  history of Python, email/architecture.rst, idlelib's README/NEWS/HISTORY/...).

Fields: ``id`` (dotted module name, ``reference:<topic>`` or ``manual:idle``), ``kind``, ``split``
(every 10th document, in file order, is ``eval``), ``text``, and ``qa``: ``[name, what, summary]``
triples (``what`` is ``module``/``class``/``function``/``method``; ``summary`` is the first sentence of
the docstring) that ``corpus_qa_dataset`` turns into question/answer pairs.

License: the text is taken from CPython's documentation and sources, which are distributed under the
Python Software Foundation License Version 2 (https://docs.python.org/3/license.html). Copyright
(c) 2001 Python Software Foundation; All Rights Reserved. The PSF license permits redistribution of
derived works provided this notice is kept.
"""

from __future__ import annotations

import gzip
import html.parser
import importlib
import inspect
import io
import json
import pkgutil
import re
import sys
import sysconfig
import warnings
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "python_stdlib_docs.jsonl.gz"

# Modules that do something on import (open a browser, print a poem, start IDLE), are test suites,
# are Windows-only, or are mostly encoding tables rather than prose.
SKIP_TOP_LEVEL = {
    "antigravity", "this", "turtledemo", "test", "lib2to3", "ensurepip", "venv",
    "pydoc_data", "msilib", "winreg", "winsound", "nt", "msvcrt", "encodings", "__future__",
    "__hello__", "__phello__",
}
SKIP_PARTS = {"test", "tests", "idle_test", "__main__"}
SKIP_MODULES = {"idlelib.idle"}  # starts IDLE on import
# Private pure-Python modules whose docstrings are real documentation (the rest are duplicates of a
# public module's text or data tables).
PRIVATE_WITH_DOCS = ["_collections_abc", "_compression", "_markupbase", "_pyio", "_sitebuiltins",
                     "_strptime", "_threading_local", "_weakrefset", "_pydecimal"]
EVAL_EVERY = 10  # every 10th document goes to the held-out eval split

# Lines that start like Python statements. Only unambiguous shapes: prose wraps often start with
# "for", "if", "return" or "class", so those need code punctuation to count.
PY_CODE_START = re.compile(
    r"^(def \w+\(|class \w+[(:]|import [\w.]+(, [\w.]+)*$|from [\w.]+ import |@\w[\w.]*(\(|$)|"
    r"(if|elif|for|while|with|try|except|else|finally)\b.*:$|print\(|return [\w.]+\(|raise \w+\()"
)
# A call signature alone on a line: "loads(s, *, cls=None) -> object", "S.split(sep=None)".
SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?:?$")
UNDERLINE = re.compile(r"^\s*([-=*~^+#\"'`.])\1{2,}\s*$")
# Characters that are rare in prose but common in code and tables (not parentheses, quotes, commas:
# docstrings use those in prose all the time).
CODE_CHARS = frozenset("=<>{}[]|\\/%&^~$@;#+")
SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\]'\"`])[.!?](?=\s+[A-Z(`'\"])")


def is_code_like(line: str) -> bool:
    """True for lines that read as code or markup rather than prose."""
    s = line.strip()
    if not s:
        return False
    if UNDERLINE.match(s) or PY_CODE_START.match(s) or SIGNATURE.match(s) or "->" in s:
        return True
    letters = sum(c.isalpha() or c == " " for c in s)
    code = sum(c in CODE_CHARS for c in s)
    # Prose is ~85-90% letters and spaces and almost free of the CODE_CHARS ("*" is left out: reST
    # uses it for emphasis). Very short lines ("e.g.", "1.") are judged leniently.
    if len(s) < 12:
        return letters / len(s) < 0.4 or code > 0
    return letters / len(s) < 0.6 or code / len(s) > 0.06


def clean_text(text: str) -> str:
    """Drop doctest sessions, underlines and code-like lines; collapse blank runs."""
    lines = inspect.cleandoc(text).splitlines()
    out: list[str] = []
    in_doctest = False
    for line in lines:
        s = line.strip()
        if s.startswith((">>>", "... ")) or s == "...":
            in_doctest = True
            continue
        if in_doctest:
            if s:  # doctest output runs until the next blank line
                continue
            in_doctest = False
        if is_code_like(line):
            continue
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text


def first_sentence(text: str) -> str | None:
    """The first sentence of the first paragraph, or None when it is not a usable summary."""
    para = text.strip().split("\n\n", 1)[0]
    para = " ".join(para.split())
    if not para:
        return None
    m = SENTENCE_END.search(para)
    sentence = para[: m.start() + 1] if m else para
    if not sentence[0].isalpha() or len(sentence.split()) < 3 or len(sentence) > 300:
        return None
    if not sentence.endswith((".", "!", "?")):
        sentence += "."
    return sentence


def discover_modules() -> list[str]:
    names: list[str] = []
    tops = [n for n in sys.stdlib_module_names if not n.startswith("_")] + PRIVATE_WITH_DOCS
    for top in sorted(tops):
        if top in SKIP_TOP_LEVEL:
            continue
        try:
            mod = importlib.import_module(top)
        except Exception:  # platform-specific modules that are not built here
            continue
        names.append(top)
        if hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, top + ".", onerror=lambda _name: None):
                parts = info.name.split(".")
                if any(p.startswith("_") or p in SKIP_PARTS for p in parts[1:]) or info.name in SKIP_MODULES:
                    continue
                names.append(info.name)
    return sorted(set(names))


def owned_by(obj: object, module) -> bool:
    """True when obj is defined by this module (or by its C accelerator `_name`)."""
    owner = getattr(obj, "__module__", None)
    leaf = module.__name__.rsplit(".", 1)[-1]
    return owner in (module.__name__, "_" + leaf) or (module.__name__ == "os" and owner == "posix")


def comment_blocks(module) -> list[str]:
    """Source comment blocks of 2+ lines, joined into paragraphs (license headers dropped)."""
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return []
    try:
        source = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    blocks, current = [], []
    for line in source.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            current.append(s.lstrip("#").strip())
            continue
        if len(current) >= 2:
            para = " ".join(w for w in current if w and not is_code_like(w))
            low = para.lower()
            if para and "copyright" not in low and "license" not in low and "-*-" not in para:
                if not is_code_like(para) and len(para.split()) >= 8:
                    blocks.append(para)
        current = []
    return blocks


class Collector:
    def __init__(self) -> None:
        self.seen_objects: set[int] = set()
        self.seen_long_docs: set[str] = set()

    def doc_of(self, obj: object) -> str:
        raw = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if isinstance(obj, (classmethod, staticmethod)):
            raw = obj.__func__.__doc__
        if not raw:
            return ""
        text = clean_text(raw)
        if len(text) > 200:  # long docstrings shared by several objects are kept once
            if text in self.seen_long_docs:
                return ""
            self.seen_long_docs.add(text)
        return text

    def module_document(self, name: str) -> dict | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:
                return None
        parts: list[str] = [f"The Python module {name}."]
        qa: list[list[str]] = []
        mod_doc = self.doc_of(module)
        if mod_doc:
            parts.append(mod_doc)
            summary = first_sentence(mod_doc)
            if summary and not name.startswith("_"):  # questions only about public modules
                qa.append([name, "module", summary])
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("__") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if not owned_by(obj, module) or id(obj) in self.seen_objects:
                continue
            self.seen_objects.add(id(obj))
            what = "class" if inspect.isclass(obj) else "function"
            doc = self.doc_of(obj)
            if doc:
                parts.append(f"{what.capitalize()} {name}.{attr}:\n{doc}")
                summary = first_sentence(doc)
                if summary and not attr.startswith("_") and not name.startswith("_"):
                    qa.append([f"{name}.{attr}", what, summary])
            if what == "class":
                for meth_name, meth in sorted(vars(obj).items()):
                    if meth_name.startswith("__") and meth_name not in ("__init__", "__call__"):
                        continue
                    if not (inspect.isroutine(meth) or isinstance(meth, (property, classmethod, staticmethod))):
                        continue
                    mdoc = self.doc_of(meth)
                    if mdoc:
                        parts.append(f"Method {attr}.{meth_name}:\n{mdoc}")
                        summary = first_sentence(mdoc)
                        if summary and not meth_name.startswith("_") and not name.startswith("_"):
                            qa.append([f"{name}.{attr}.{meth_name}", "method", summary])
        comments = comment_blocks(module)
        if comments:
            parts.append(f"Notes from the source code of {name}:")
            parts.extend(comments)
        text = "\n\n".join(parts)
        if len(text) < 300:  # a module with (almost) no documentation is not a useful document
            return None
        return {"id": name, "kind": "module", "text": text, "qa": qa}


def reference_documents() -> list[dict]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = clean_text(topics[key])
        if len(text) < 300:
            continue
        docs.append({"id": f"reference:{key}", "kind": "reference",
                     "text": f"Python language reference, topic {key}.\n\n{text}", "qa": []})
    return docs


class _HTMLText(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head"):
            self._skip -= 1
        elif tag in ("p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "div"):
            self.chunks.append("\n\n")

    def handle_data(self, data):
        if not self._skip:
            self.chunks.append(data)


def idle_manual_document() -> list[dict]:
    """IDLE's manual page (idlelib/help.html is Doc/library/idle.rst rendered by Sphinx)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "idlelib" / "help.html"
    if not path.exists():
        return []
    parser = _HTMLText()
    parser.feed(path.read_text(encoding="utf-8"))
    text = "".join(parser.chunks).replace("\u00b6", "")  # Sphinx permalink pilcrows
    start = text.find("IDLE is Python")
    end = text.rfind("Table of Contents")  # the Sphinx sidebar and footer follow the body
    text = text if end < 0 else text[:end]
    text = clean_text("\n".join(line.strip() for line in text[max(start, 0):].splitlines()))
    return [{"id": "manual:idle", "kind": "manual", "text": f"The IDLE manual.\n\n{text}", "qa": []}]


# Plain-text documentation files that ship inside the stdlib (relative to the stdlib directory).
STDLIB_TEXT_FILES = ["LICENSE.txt", "email/architecture.rst", "idlelib/CREDITS.txt", "idlelib/HISTORY.txt",
                     "idlelib/NEWS.txt", "idlelib/README.txt", "idlelib/TODO.txt", "idlelib/extend.txt"]


def text_file_documents() -> list[dict]:
    docs = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_TEXT_FILES:
        path = root / rel
        if not path.exists():
            continue
        text = clean_text(path.read_text(encoding="utf-8", errors="replace"))
        docs.append({"id": f"manual:{rel}", "kind": "manual",
                     "text": f"From the Python standard library file {rel}.\n\n{text}", "qa": []})
    return docs


def build() -> list[dict]:
    collector = Collector()
    names = discover_modules()
    # Public modules first, so that when a private twin (_pyio) repeats a long docstring, the
    # public module keeps it.
    names = [n for n in names if not n.startswith("_")] + [n for n in names if n.startswith("_")]
    docs = [d for name in names if (d := collector.module_document(name))]
    docs += reference_documents()
    docs += idle_manual_document()
    docs += text_file_documents()
    # Paragraph-level dedup across the whole corpus (docstrings inherited or copied between modules),
    # so no eval document repeats a long paragraph of a train document.
    seen: set[str] = set()
    for d in docs:
        kept = []
        for para in d["text"].split("\n\n"):
            key = " ".join(para.split())
            if len(key) > 150:
                if key in seen:
                    continue
                seen.add(key)
            kept.append(para)
        d["text"] = "\n\n".join(kept)
    for i, d in enumerate(docs):
        d["split"] = "eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train"
    # Key order fixed for byte-stable output.
    return [{k: d[k] for k in ("id", "kind", "split", "text", "qa")} for d in docs]


def write(docs: list[dict], path: Path = OUTPUT) -> None:
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: identical bytes for identical documents.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def main() -> None:
    # Some modules print or warn on import; keep the build log readable.
    stdout = sys.stdout
    sys.stdout = io.StringIO()
    try:
        docs = build()
    finally:
        sys.stdout = stdout
    write(docs)
    chars = sum(len(d["text"]) for d in docs)
    eval_chars = sum(len(d["text"]) for d in docs if d["split"] == "eval")
    print(f"{len(docs)} documents, {chars:,} characters ({eval_chars:,} eval), "
          f"{sum(len(d['qa']) for d in docs):,} QA summaries -> {OUTPUT} ({OUTPUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
