"""Gates to the 0/1 retrieval mask: a strict order, so equal gates always pick the same heads."""

from __future__ import annotations

import math

import torch
from headwise.patches.base import HeadwiseError


def _as_grid(gates) -> torch.Tensor:
    try:
        g = torch.as_tensor(gates, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):  # text, None or ragged rows: not a grid of numbers
        raise HeadwiseError(f"gates must be a (layers, kv_heads) grid of numbers, got {str(gates)[:60]}") from None
    if g.dim() != 2 or g.numel() == 0:
        raise HeadwiseError(f"gates must be a non-empty (layers, kv_heads) grid, got shape {tuple(g.shape)}")
    if bool(torch.isnan(g).any()):
        raise HeadwiseError("gates contain NaN")
    return g.clamp(0.0, 1.0)


def streaming_order(gates) -> list[tuple[int, int]]:
    """Every (layer, kv_head), ranked by `(gate, layer, kv_head)` ascending: the first become streaming heads."""
    g = _as_grid(gates)
    cells = [(float(g[l, h]), l, h) for l in range(g.shape[0]) for h in range(g.shape[1])]
    return [(l, h) for _, l, h in sorted(cells)]


def binarize_gates(gates, *, streaming_fraction: float | None = None, threshold: float | None = None) -> list[list[int]]:
    """The retrieval mask (1 = retrieval / full KV, 0 = streaming), one row per layer.

    `streaming_fraction`: exactly `floor(fraction * n + 0.5)` heads become streaming, the lowest by the
    strict order `(gate, layer, kv_head)`, so ties always resolve the same way. `threshold`: every head
    with `gate < threshold` is streaming. Gates are clipped to [0, 1] first (DuoAttention's files hold
    tiny negatives). Give exactly one of the two.
    """
    if (streaming_fraction is None) == (threshold is None):
        raise HeadwiseError("binarize_gates: give exactly one of streaming_fraction or threshold")
    g = _as_grid(gates)
    mask = [[1] * g.shape[1] for _ in range(g.shape[0])]
    if threshold is not None:
        for l in range(g.shape[0]):
            for h in range(g.shape[1]):
                if float(g[l, h]) < threshold:
                    mask[l][h] = 0
        return mask
    if not 0.0 <= streaming_fraction <= 1.0:
        raise HeadwiseError(f"streaming_fraction must be in [0, 1], got {streaming_fraction}")
    n_stream = int(math.floor(streaming_fraction * g.numel() + 0.5))
    for l, h in streaming_order(g)[:n_stream]:
        mask[l][h] = 0
    return mask
