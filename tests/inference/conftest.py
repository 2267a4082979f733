"""Fixtures of tests/inference (helpers live in inference_helpers.py)."""

from __future__ import annotations

import pytest
from inference_helpers import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")
