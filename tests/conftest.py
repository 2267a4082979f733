"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, saved once per session.

Tests that need real weights load the embedded SmolLM2-135M (alias `smollm2-135m`); tests that only
need shapes and the pipeline use the tiny model (49K-token vocabulary, 2 layers, hidden 64), which
trains a step in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from suite_rules import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks of this conftest)

REPO = Path(__file__).resolve().parents[1]


def _import_the_pypi_kernels_package() -> None:
    """`python -m pytest` puts the working directory (the checkout) on sys.path, where the top-level `kernels/`
    folder (the sources of headwise.kernels) would shadow the PyPI package `kernels` that transformers >= 5.25
    imports. Import the installed one first, with the checkout off sys.path, so `import kernels` finds it in
    sys.modules; the checkout stays on sys.path for the tests' own `tests.` imports."""
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO]
    try:
        import kernels  # noqa: F401  (PyPI's; absent before transformers 5.25, which does not import it then)
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_the_pypi_kernels_package()


def _decorate_kernels_for_the_interpreter() -> None:
    """Without CUDA, import the Triton kernels with ``TRITON_INTERPRET=1`` before any test module can.

    Triton picks JIT or interpreter when a kernel is decorated, and every test module that imports the
    recipe schema imports the kernels (through the method patches); a kernel decorated for JIT cannot run
    on CPU. The variable is restored afterwards, so the rest of the session keeps the plain CPU dispatch;
    kernel tests set it again per test (tests/kernels/conftest.py).
    """
    import torch

    if torch.cuda.is_available():
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import headwise.kernels.block_sparse_attention  # noqa: F401  (decorates every Triton kernel)
        import headwise.kernels.decode_attention  # noqa: F401
        import headwise.kernels.gathered_query  # noqa: F401
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


_decorate_kernels_for_the_interpreter()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from headwise.models import load_tokenizer
    from headwise.recipe.schema import ModelSection

    return load_tokenizer(ModelSection(name="smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A saved random LlamaForCausalLM (2 layers, 4 heads, 2 KV heads) + SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_recipe(directory: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_recipe(model_dir: Path, output_dir: Path, **training) -> dict:
    """A recipe that trains the tiny model on a slice of the built-in corpus in seconds."""
    return {
        "model": {"name": str(model_dir)},
        "data": {"builder": "corpus", "max_length": 64, "num_samples": 64, "limit_documents": 20},
        "training": {"output_dir": str(output_dir), "max_steps": 4, "logging_steps": 1, "save_steps": 2, **training},
    }


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m headwise ARGS` in a subprocess (the real entry point), output captured."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "headwise", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
