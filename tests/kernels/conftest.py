"""Kernel tests: run the Triton kernels in the interpreter when there is no GPU.

The kernels are decorated in interpreter mode by the root conftest (tests/conftest.py), before any
test module imports them. Each kernel test sets ``TRITON_INTERPRET=1`` again through the ``device``
fixture (monkeypatch, no leak).
"""

import pytest

from kernel_tolerance import HAS_CUDA


@pytest.fixture
def device(monkeypatch):
    """'cuda' on a GPU machine; else 'cpu' with the interpreter switched on for this test."""
    if HAS_CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
