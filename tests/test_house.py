"""The house holds: data flows down the floors, no two modules import each other, the package imports
without Triton.

Floors, top to bottom: the core (`headwise/`), `headwise.patches`, then `headwise.kernels` and
`headwise.data_builders` side by side on the ground floor. The imports are read from the source with
`ast` (module level and inside functions alike), so an import hidden in a function counts.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> package name (pyproject's package-dir).
PACKAGES = {"headwise": "headwise", "patches": "headwise.patches", "kernels": "headwise.kernels",
            "data_builders": "headwise.data_builders"}
FLOOR = {"headwise": 2, "headwise.patches": 1, "headwise.kernels": 0, "headwise.data_builders": 0}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    name = [PACKAGES[parts[0]], *parts[1:]]
    return ".".join(name[:-1] if name[-1] == "__init__" else name)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in PACKAGES for p in sorted((REPO / folder).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported headwise module, line, inside a function, the source line) for every import in `path`."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for target in targets:
                if target.split(".")[0] == "headwise":
                    found.append((_owning_module(target), child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, nested)

    visit(ast.parse(source), False)
    return found


def _owning_module(target: str) -> str:
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


def _floor_package(module: str) -> str:
    for package in ("headwise.patches", "headwise.kernels", "headwise.data_builders"):
        if module == package or module.startswith(package + "."):
            return package
    return "headwise"


def test_every_module_is_found():
    """The walk sees the floors (a guard against a test that silently checks nothing)."""
    for expected in ("headwise.cli", "headwise.patches.base", "headwise.patches.duo.method", "headwise.kernels.dispatch",
                     "headwise.data_builders.packing", "headwise.inference.config", "headwise.recipe.schema"):
        assert expected in MODULES
    assert sum(len(_imports(n, p)) for n, p in MODULES.items()) > 100


def test_no_import_runs_up_a_floor():
    """Kernels and data builders import nothing of headwise outside themselves; patches never import the core."""
    arrows_up = []
    for name, path in MODULES.items():
        here = _floor_package(name)
        for target, line, _, text in _imports(name, path):
            there = _floor_package(target)
            if target == "headwise" and here != "headwise":
                arrows_up.append(f"{path.relative_to(REPO)}:{line}: {text.strip()}")  # the top package itself
            elif FLOOR[there] > FLOOR[here] or (FLOOR[here] == 0 and there != here):
                arrows_up.append(f"{path.relative_to(REPO)}:{line}: {text.strip()}")
    assert not arrows_up, "imports that run up a floor:\n" + "\n".join(arrows_up)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    """No two modules import each other, directly or through others, at module level or inside a function.
    A package's own `__init__` importing its submodules is not a circle with a submodule importing a sibling."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = {t for t, *_ in _imports(name, path) if t != name}
    assert _cycles(graph) == []


def test_imports_inside_functions_say_why():
    """An import inside a function is for an optional or heavy dependency, and a comment on its line (or the
    line above) says which; every other import sits at the top of its module."""
    unexplained = set()
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for _, line, in_function, text in _imports(name, path):
            above = line - 2  # the comment may head a run of imports
            while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
                above -= 1
            if in_function and "#" not in text and not lines[above].strip().startswith("#"):
                unexplained.add(f"{path.relative_to(REPO)}:{line}: {text.strip()}")
    unexplained = sorted(unexplained)
    assert not unexplained, "imports of headwise modules inside functions without a reason:\n" + "\n".join(unexplained)


BLOCK_TRITON = textwrap.dedent("""
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoTriton())
""")


def _run_without_triton(code: str, *args: str) -> subprocess.CompletedProcess:
    script = BLOCK_TRITON + textwrap.dedent(code)
    # `python -c` puts its working directory on sys.path: run outside the checkout, whose kernels/ folder would
    # shadow the PyPI package `kernels` that transformers >= 5.25 imports
    cwd = tempfile.gettempdir()
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_the_block_really_blocks_triton():
    out = _run_without_triton("import triton")
    assert out.returncode != 0 and "blocked by the test" in out.stderr


@pytest.mark.slow
def test_package_and_recipe_commands_work_without_triton():
    """`import headwise`, the recipe schema and `headwise recipe validate/show` run where Triton is absent
    (macOS, Windows, CPU-only installs), and the kernels' CPU path (the torch reference) still computes."""
    out = _run_without_triton("""
        import sys, torch
        import headwise, headwise.recipe, headwise.patches, headwise.kernels
        from headwise.kernels import LayoutSpec, reference_attention, sparse_attention
        q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
        spec = LayoutSpec("shifted_groups", group_size=16, sink=4, shifted_heads=(2, 3))
        torch.testing.assert_close(sparse_attention(q, k, v, spec), reference_attention(q, k, v, spec))
        from headwise.cli import main
        for argv in (["recipe", "validate", "quickstart"], ["recipe", "show", "duo-smollm2"]):
            sys.argv = ["headwise", *argv]
            try:
                main()
            except SystemExit as e:
                assert not e.code, (argv, e.code)
        assert "triton" not in sys.modules
        print("OK")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("OK") and "name: duo" in out.stdout


@pytest.mark.slow
def test_cpu_training_works_without_triton(tmp_path, tiny_model_dir):
    """A SinkLoRA training step on CPU through `headwise train` (the recipe path) with Triton blocked."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: {{name: {tiny_model_dir}}}
        method: {{name: sinklora, group_size: 16, sinks: 4}}
        data: {{builder: corpus, max_length: 64, num_samples: 4}}
        training: {{output_dir: {tmp_path / 'run'}, max_steps: 2, save_steps: 2, logging_steps: 1}}
    """))
    out = _run_without_triton("""
        import sys
        from headwise.cli import main
        sys.argv = ["headwise", "train", sys.argv[1]]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        assert "triton" not in sys.modules
        print("OK")
    """, str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
