"""Kernel tests: run the Triton kernels in the interpreter when there is no GPU.

Triton picks JIT or interpreter when a kernel is decorated, so without CUDA this conftest imports
``headwise.kernels`` with ``TRITON_INTERPRET=1`` (reloading the kernel module if something imported
it before), then restores the variable so the rest of the test session keeps the plain CPU dispatch.
Each kernel test sets ``TRITON_INTERPRET=1`` again through ``interpret`` (monkeypatch, no leak).
"""

import importlib
import os

import pytest

from kernel_tolerance import HAS_CUDA

if not HAS_CUDA:
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import headwise.kernels.block_sparse_attention as _bsa

        if type(_bsa._fwd_kernel).__name__ != "InterpretedFunction":
            importlib.reload(_bsa)
        # by module name: the package attribute `decode_attention` is the function, not the module
        _da = importlib.import_module("headwise.kernels.decode_attention")
        if type(_da._decode_split_kernel).__name__ != "InterpretedFunction":
            importlib.reload(_da)
    finally:
        if _prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _prev


@pytest.fixture
def device(monkeypatch):
    """'cuda' on a GPU machine; else 'cpu' with the interpreter switched on for this test."""
    if HAS_CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
