"""The split-over-keys P @ V of decode attention equals the plain product."""

from __future__ import annotations

import pytest
import torch

from headwise.patches import kv_attention


@pytest.mark.parametrize("L", [700, 512, 255])
def test_split_product_equals_matmul(L, monkeypatch):
    monkeypatch.setattr(kv_attention, "DECODE_SPLIT_KEYS", 128)
    g = torch.Generator().manual_seed(L)
    p = torch.rand(2, 3, 4, L, generator=g).softmax(-1)
    v = torch.randn(2, 3, L + 5, 16, generator=g)[:, :, :L]  # a slice of a longer slot buffer, as in decode
    torch.testing.assert_close(kv_attention._probs_times_values(p, v), p @ v, atol=1e-5, rtol=1e-5)


def test_decode_step_matches_with_and_without_split(monkeypatch):
    """One decode step of grouped attention over 1,000 kept keys: same output and column sums either way."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 1, 32, generator=g)
    k, v = (torch.randn(1, 2, 1000, 32, generator=g) for _ in range(2))
    valid = torch.rand(1, 2, 1000, generator=g) > 0.1
    args = dict(scaling=32 ** -0.5, key_valid=valid, causal_tail=False, need_colsums=True)
    monkeypatch.setattr(kv_attention, "DECODE_SPLIT_KEYS", 0)
    ref, ref_cols = kv_attention.grouped_attention(q, k, v, **args)
    monkeypatch.setattr(kv_attention, "DECODE_SPLIT_KEYS", 256)
    out, cols = kv_attention.grouped_attention(q, k, v, **args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cols, ref_cols)
