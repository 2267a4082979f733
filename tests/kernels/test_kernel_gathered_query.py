"""The gathered-query kernel (MoH's skipping path): each head runs causal attention for the query rows that chose
it, against every key, and leaves the other rows at zero with no gradient.

Expected values come from an fp64 masked softmax written here (dense causal attention of every row, a window when
given, unchosen rows zeroed), not from the module's own CPU path; the kernel runs in the interpreter on CPU and on
CUDA on a GPU machine (``device`` fixture). Tolerances follow flash-attention's rule (kernel_tolerance.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from headwise.kernels import gathered_query_attention, gathered_rows
from kernel_tolerance import check_tolerance

FORWARD_RULE = (2, 1e-5)
BACKWARD_RULE = (4, 1e-4)


def expected_attention(q, k, v, chosen, window=0):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D), chosen (B, T, Hq) -> (B, T, Hq, D) in q's dtype's arithmetic."""
    b, hq, t, d = q.shape
    rep = hq // k.shape[1]
    kx, vx = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i = torch.arange(t).view(-1, 1)
    j = torch.arange(t).view(1, -1)
    allowed = j <= i
    if window:
        allowed = allowed & (i - j < window)
    scores = (q @ kx.transpose(-1, -2)) / math.sqrt(d)
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vx
    return out.transpose(1, 2) * chosen.unsqueeze(-1).to(out.dtype)


def random_choice(b, t, hq, density, generator):
    chosen = torch.rand(b, t, hq, generator=generator) < density
    chosen[:, :, 0] = True  # a head every token chose (MoH's shared heads)
    chosen[0, :, -1] = False  # a head no token chose in the first batch row
    return chosen


@pytest.mark.parametrize("t,d,window,dtype", [
    (100, 64, 0, torch.float32),
    (70, 80, 0, torch.float32),  # a head dim padded to 128, a length no tile size divides
    (96, 64, 24, torch.float32),  # the model's sliding window
    (128, 64, 0, torch.float16),
    (80, 64, 16, torch.bfloat16),
])
def test_gathered_rows_match_dense_attention_of_the_chosen_rows(device, t, d, window, dtype):
    gen = torch.Generator().manual_seed(t + d + window)
    b, hq, hkv = 2, 4, 2
    q64 = torch.randn(b, hq, t, d, generator=gen, dtype=torch.float64)
    k64 = torch.randn(b, hkv, t, d, generator=gen, dtype=torch.float64)
    v64 = torch.randn(b, hkv, t, d, generator=gen, dtype=torch.float64)
    chosen = random_choice(b, t, hq, 0.5, gen)
    grad_out = torch.randn(b, t, hq, d, generator=gen, dtype=torch.float64)

    def run(fn, dtype_, dev):
        leaves = [x.to(dtype_).to(dev).detach().requires_grad_() for x in (q64, k64, v64)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype_).to(dev))
        return [out.detach().cpu()] + [x.grad.cpu() for x in leaves]

    exact = run(lambda q, k, v: expected_attention(q, k, v, chosen, window), torch.float64, "cpu")
    own_precision = run(lambda q, k, v: expected_attention(q, k, v, chosen, window), dtype, "cpu")
    rows, counts = gathered_rows(chosen.to(device))
    got = run(lambda q, k, v: gathered_query_attention(q, k, v, rows, counts, window=window), dtype, device)
    for name, g, ref, low, rule in zip(("out", "dq", "dk", "dv"), got, exact, own_precision,
                                       (FORWARD_RULE, BACKWARD_RULE, BACKWARD_RULE, BACKWARD_RULE)):
        check_tolerance(name, g, ref, low, *rule)
    unchosen = ~chosen
    assert (got[0][unchosen] == 0).all(), "an unchosen row has a nonzero output"
    assert (got[1].transpose(1, 2)[unchosen] == 0).all(), "an unchosen row got a query gradient"


def test_gathered_rows_lists_each_heads_chosen_positions_in_order():
    chosen = torch.tensor([[[True, False], [False, False], [True, True], [True, False]]])  # (1, T=4, H=2)
    rows, counts = gathered_rows(chosen)
    assert counts.tolist() == [[3, 1]]
    assert rows[0, 0, :3].tolist() == [0, 2, 3]
    assert rows[0, 1, :1].tolist() == [2]
    assert (rows[0, 1, 1:] >= 4).all() and (rows[0, 0, 3:] >= 4).all()  # padding sorts after every position


def test_rows_of_another_shape_are_refused():
    q = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 1, 8, 16)
    rows, counts = gathered_rows(torch.ones(1, 8, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows must be int32"):
        gathered_query_attention(q, k, k, rows[:, :, :4], counts)
    with pytest.raises(ValueError, match="counts must be int32"):
        gathered_query_attention(q, k, k, rows, counts.long())
