"""Pure-torch reference of every layout, and the CPU execution path.

The token-level mask is built straight from ``LayoutSpec``'s definition (docs/kernels.md's semantics
table), never from a ``BlockLayout``'s tile lists, so the kernels' agreement with this module checks
the tile-list construction too. Attention is computed in chunks of queries (``q_chunk`` rows of the
score matrix at a time), so long sequences on CPU need O(q_chunk * T) memory, not O(T^2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .input_checks import check_attention_inputs
from .layouts import BlockLayout, LayoutSpec, token_rule

# Query rows per chunk of the score matrix: 1024 x 32K fp32 scores per head = 128 MB per head-batch;
# small enough for CPU runs, large enough that the matmuls stay efficient.
Q_CHUNK = 1024


def _as_spec(layout) -> LayoutSpec:
    return layout.spec if isinstance(layout, BlockLayout) else layout


def token_mask(spec, seq_len: int, head: int, n_heads: int, device="cpu") -> torch.Tensor:
    """Full ``(T, T)`` boolean mask of one head (tests and small T only)."""
    spec = _as_spec(spec).resolve(seq_len)
    pos = torch.arange(seq_len, device=device)
    return token_rule(spec, pos.view(-1, 1), pos.view(1, -1), head, n_heads)


# Score elements per chunk across all heads (fp32: 256 MB): bounds CPU memory at long T while
# keeping the batched matmuls large.
SCORE_BUDGET = 64 * 1024 * 1024


def _attend_one(q, k, v, spec, scale, n_heads):
    """q (Hq, L, D), k/v (Hkv, L, D) of one sequence -> out (Hq, L, D), lse (Hq, L) fp32.

    All heads at once (batched matmuls, one mask per chunk from ``token_rule`` over a head index
    tensor), queries in chunks so memory stays O(H * chunk * L).
    """
    hq, length, _ = q.shape
    rep = hq // k.shape[0]
    kx, vx = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # GQA: heads h*rep..h*rep+rep-1 share kv h
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty(hq, length, dtype=torch.float32, device=q.device)
    heads = torch.arange(hq, device=q.device).view(-1, 1, 1)
    kpos = torch.arange(length, device=q.device).view(1, 1, -1)
    rows = max(16, min(Q_CHUNK, SCORE_BUDGET // max(1, hq * length)))
    for s in range(0, length, rows):
        e = min(length, s + rows)
        qpos = torch.arange(s, e, device=q.device).view(1, -1, 1)
        # keys past the chunk's last query are never allowed (causal): skip them.
        scores = torch.matmul(q[:, s:e], kx[:, :e].transpose(1, 2)).to(acc) * scale
        if spec.softcap:
            scores = spec.softcap * torch.tanh(scores / spec.softcap)
        mask = token_rule(spec, qpos, kpos[..., :e], heads, n_heads)
        scores = scores.masked_fill(~mask, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - m)
        denom = p.sum(-1, keepdim=True)
        out[:, s:e] = torch.matmul((p / denom).to(v.dtype), vx[:, :e]).to(q.dtype)
        lse[:, s:e] = (m + torch.log(denom)).squeeze(-1).float()
    return out, lse


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    upcast: bool = False,
):
    """Masked attention with the token-level rule of ``layout`` (a ``LayoutSpec`` or ``BlockLayout``).

    q ``(B, Hq, T, D)``, k/v ``(B, Hkv, T, D)`` (GQA: not repeated). Returns ``(B, T, Hq, D)`` and, if
    asked, the log-sum-exp ``(B, Hq, T)`` fp32. ``cu_seqlens`` (int32 ``(n+1,)``, needs ``B == 1``)
    splits T into packed sequences; the rule applies inside each (tokens after ``cu_seqlens[-1]``
    form one more sequence). ``upcast`` computes in fp32 and returns fp32 (the tolerance rule's exact
    reference). Differentiable with plain autograd. A ``group_ratio`` resolves against the longest
    sequence, as in the kernel path (one group size per call).
    """
    check_attention_inputs(q, k, v, cu_seqlens)
    b, hq, t, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if cu_seqlens is None:
        bounds = [(0, t)]
    else:  # B == 1, checked above
        cu = [int(x) for x in cu_seqlens.tolist()]
        if cu[-1] < t:
            cu.append(t)
        bounds = list(zip(cu[:-1], cu[1:]))
    max_len = max(e - s for s, e in bounds)
    spec = _as_spec(layout).resolve(max_len)
    outs, lses = [], []
    for bi in range(b):
        o_parts, l_parts = [], []
        for s, e in bounds:
            o, l = _attend_one(q[bi, :, s:e], k[bi, :, s:e], v[bi, :, s:e], spec, scale, hq)
            o_parts.append(o)
            l_parts.append(l)
        outs.append(torch.cat(o_parts, dim=1))
        lses.append(torch.cat(l_parts, dim=1))
    out = torch.stack(outs).transpose(1, 2).contiguous()
    if return_lse:
        return out, torch.stack(lses)
    return out


# ------------------------------------------------------------------------------ explicit masked attention


def repeat_kv_heads(x: torch.Tensor, rep: int) -> torch.Tensor:
    """K or V (B, Hkv, T, D) repeated to the query heads (B, Hkv * rep, T, D): head h serves h*rep..h*rep+rep-1."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def sum_kv_groups(x: torch.Tensor, rep: int) -> torch.Tensor:
    """The inverse for gradients: (B, Hkv * rep, T, D) -> (B, Hkv, T, D), each KV head's `rep` query
    heads summed (accumulated in fp32 at least), in x's dtype."""
    if rep == 1:
        return x
    return x.unflatten(1, (-1, rep)).sum(2, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)


def masked_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention of q (B, Hq, Tq, D) over k/v (B, Hkv, Tk, D) (GQA by repeat) under one
    (Tq, Tk) boolean `allowed` mask shared by all heads. Returns out (B, Hq, Tq, D) in q's dtype and
    the log-sum-exp (B, Hq, Tq) in fp32 (fp64 for fp64 inputs). The torch backend of the exact dense-kernel forms
    (`shifted_groups.py`, `band_attention.py`), for CPU tests: it holds the whole score matrix."""
    rep = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for 16-bit inputs, fp64 stays fp64
    s = (q.to(acc) @ repeat_kv_heads(k, rep).to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ repeat_kv_heads(v, rep).to(acc)).to(q.dtype), lse


def masked_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, allowed: torch.Tensor, scale: float):
    """Gradients (dq, dk, dv) of `masked_attention_forward`, given its output and log-sum-exp (or a
    merged output and log-sum-exp over a larger key set: then these are this key set's share of the
    merged attention's gradients). GQA gradients are summed over each KV head's query heads."""
    rep = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, dof = q.to(acc), repeat_kv_heads(k, rep).to(acc), repeat_kv_heads(v, rep).to(acc), do.to(acc)
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.exp(s.masked_fill(~allowed, float("-inf")) - lse.to(acc).unsqueeze(-1))
    dv = p.transpose(-1, -2) @ dof
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * out.to(acc)).sum(-1, keepdim=True))
    dk = ds.transpose(-1, -2) @ qf * scale
    dk, dv = sum_kv_groups(dk, rep), sum_kv_groups(dv, rep)
    return (ds @ kf * scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
