"""Causal attention for chosen query rows only, per head, against all keys (forward + backward, Triton).

Mixture-of-Head attention picks, per token, which heads run. Multiplying the unchosen heads' outputs by zero
(what every released MoH model does) costs the whole dense attention; here each head's programs walk only the
query rows that chose the head (``rows``), gathered in position order, so the work falls with the share of
chosen rows. This is the gathered-query mode of the kernel family (``block_sparse_attention``): the same online
softmax, fp32 accumulation, GQA without repeated K/V, and a dK/dV pass that sums a KV head's query heads in
registers (deterministic, no atomics).

Semantics (docs/kernels.md): row ``i`` of head ``h`` is query position ``p = rows[b, h, i]``; it attends keys
``k <= p`` (and ``p - k < window`` with a window), exactly what dense causal attention gives that row. Rows not
listed get an output of exactly zero and no gradient. ``rows`` holds each head's positions in increasing order,
then ``T`` or more (``PAD_ROW``) as padding: ``gathered_rows`` builds it from a boolean choice without a host
sync, and ``counts`` is where each head's padding starts.

Why gathered rows and not a block-sparse mask: a token-level choice spreads over every 64-128-token query tile,
so a tile-skipping kernel (FlexAttention's block mask) skips nothing; gathering packs a head's chosen rows into
full tiles (the MoE-style dispatch of the research dossier, moh_s2.md §1.6).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .block_sparse_attention import (
    GPU_CONFIGS,
    INTERPRET_CONFIG,
    LN2,
    LOG2E,
    NEG,
    KernelConfig,
    _LOG2E,
    _d_mask,
    _dot_prec,
    _ensure_last_dim_contiguous,
    _interp_upcast,
)
from .input_checks import check_attention_inputs
from .interpreter import interpret_mode

# Padding position of ``rows``: past every query and every window edge, so the sorted search below puts it last.
PAD_ROW = 2**30


def gathered_rows(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``chosen (B, T, H)`` bool -> ``rows (B, H, T)`` int32 (each head's chosen positions ascending, then
    ``PAD_ROW``) and ``counts (B, H)`` int32. Compaction by a prefix sum: no sort and no host sync."""
    b, t, h = chosen.shape
    picked = chosen.transpose(1, 2)
    slot = torch.cumsum(picked, dim=-1, dtype=torch.int32) - 1
    # unchosen positions write into one dump column past the end, dropped after the scatter
    slot = torch.where(picked, slot, t)
    rows = torch.full((b, h, t + 1), PAD_ROW, dtype=torch.int32, device=chosen.device)
    pos = torch.arange(t, dtype=torch.int32, device=chosen.device).expand(b, h, t)
    rows.scatter_(-1, slot.long(), pos)
    return rows[..., :t].contiguous(), picked.sum(dim=-1, dtype=torch.int32)


# At D = 128 the dK/dV pass gains from a third pipeline stage: on an H200 (benchmarks/tune_gathered.py, 16 heads over
# 4 KV heads, half the rows chosen) 22.9 -> 20.8 ms fwd+bwd at 32K and 2.10 -> 1.95 ms at 8K; the forward tiles
# that were tried were no faster than GPU_CONFIGS' (within 5%).
GATHERED_D128 = dataclasses.replace(GPU_CONFIGS[128], dkdv_stages=3)


def _pick_config(head_dim: int, device) -> KernelConfig:
    if interpret_mode() or torch.device(device).type != "cuda":
        return INTERPRET_CONFIG
    d = triton.next_power_of_2(head_dim)
    return GATHERED_D128 if d == 128 else GPU_CONFIGS[64 if d <= 64 else 256]


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _row_tile(ROWS, COUNTS, b, h, H, n_rows, tile, BLOCK_M: tl.constexpr):
    """Rows ``tile * BLOCK_M ...`` of head h: (offsets into the compact rows, valid mask, positions, first and last
    valid position, count). Padding rows read position 0 (a valid key exists for them: no empty softmax)."""
    count = tl.load(COUNTS + b * H + h)
    offs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < count
    base = ROWS + (b * H + h) * n_rows
    pos = tl.load(base + offs, mask=ok, other=0)
    first = tl.load(base + tile * BLOCK_M)
    last = tl.load(base + tl.minimum(tile * BLOCK_M + BLOCK_M, count) - 1)
    return offs, ok, pos, first, last


@triton.jit
def _key_range(first, last, W, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key tiles a query tile with positions in [first, last] visits: [lo, hi), the first [lo, full) unmasked."""
    hi = last // BLOCK_N + 1
    if HAS_WINDOW:
        lo = tl.maximum(first - W + 1, 0) // BLOCK_N
        full = lo  # window edges: every tile masked
    else:
        lo = 0
        full = (first + 1) // BLOCK_N  # tiles whose last key is at most the first row's position
    return lo, full, hi


@triton.jit
def _allowed(pos, k_pos, T, W, HAS_WINDOW: tl.constexpr):
    ok = (k_pos <= pos) & (k_pos < T)
    if HAS_WINDOW:
        ok = ok & (pos - k_pos < W)
    return ok


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, pos, offs_n, offs_d, d_ok, T, W, skt, svt, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_k = kb * BLOCK_N + offs_n
    k_ok = offs_k < T
    kt = tl.load(k_base + offs_k[None, :] * skt + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where(_allowed(pos[:, None], offs_k[None, :], T, W, HAS_WINDOW), qk, NEG)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_k[:, None] * svt + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _query_tile_setup(Q, K, V, ROWS, COUNTS, b, h, H, n_rows, tile, sqb, sqh, sqt, skb, skh, svb, svh, W, GQA,
                      HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """What a row-tile program (forward, dQ) starts from: its rows, their queries, its KV head's K and V, and the
    key tiles it visits ([lo, full) unmasked, [full, hi) masked)."""
    offs, ok, pos, first, last = _row_tile(ROWS, COUNTS, b, h, H, n_rows, tile, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + pos[:, None] * sqt + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                other=0.0)
    kvh = h // GQA
    lo, full, hi = _key_range(first, last, W, BLOCK_N, HAS_WINDOW)
    return offs, ok, pos, offs_n, offs_d, d_ok, q, K + b * skb + kvh * skh, V + b * svb + kvh * svh, lo, full, hi


@triton.jit
def _gq_fwd_kernel(Q, K, V, O, LSE, ROWS, COUNTS, qk_scale, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                   sob, sot, soh, T, H, n_rows, W, GQA, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if tile * BLOCK_M >= tl.load(COUNTS + b * H + h):
        return
    offs, ok, pos, offs_n, offs_d, d_ok, q, k_base, v_base, lo, full, hi = _query_tile_setup(
        Q, K, V, ROWS, COUNTS, b, h, H, n_rows, tile, sqb, sqh, sqt, skb, skh, svb, svh, W, GQA, HAS_WINDOW, HEAD_DIM,
        BLOCK_D, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kb in range(lo, full):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, pos, offs_n, offs_d, d_ok, T, W, skt, svt,
                                  qk_scale, BLOCK_N, False, HAS_WINDOW, DOT_PREC)
    for kb in range(full, hi):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, pos, offs_n, offs_d, d_ok, T, W, skt, svt,
                                  qk_scale, BLOCK_N, True, HAS_WINDOW, DOT_PREC)
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + pos[:, None] * sot + h * soh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * n_rows + offs, (m_i + tl.math.log2(l_i)) * LN2, mask=ok)


@triton.jit
def _gq_delta_kernel(O, DO, DELTA, ROWS, COUNTS, sob, sot, soh, sdob, sdot, sdoh, H, n_rows,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d O * dO at row i's position (the softmax-gradient row term)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if tile * BLOCK_M >= tl.load(COUNTS + b * H + h):
        return
    offs, ok, pos, first, last = _row_tile(ROWS, COUNTS, b, h, H, n_rows, tile, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & _d_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    o = tl.load(O + b * sob + pos[:, None] * sot + h * soh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + pos[:, None] * sdot + h * sdoh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + (b * H + h) * n_rows + offs, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, pos, offs_n, offs_d, d_ok, T, W, skt, svt, qk_scale,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_k = kb * BLOCK_N + offs_n
    kv_mask = (offs_k < T)[None, :] & d_ok[:, None]
    kt = tl.load(k_base + offs_k[None, :] * skt + offs_d[:, None], mask=kv_mask, other=0.0)
    vt = tl.load(v_base + offs_k[None, :] * svt + offs_d[:, None], mask=kv_mask, other=0.0)
    p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(_allowed(pos[:, None], offs_k[None, :], T, W, HAS_WINDOW), p, 0.0)
    ds = p * (tl.dot(do, vt, input_precision=DOT_PREC) - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)


@triton.jit
def _gq_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, ROWS, COUNTS, qk_scale, sm_scale, sqb, sqh, sqt, skb, skh, skt,
                  svb, svh, svt, sdob, sdot, sdoh, sdqb, sdqh, sdqt, T, H, n_rows, W, GQA,
                  HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if tile * BLOCK_M >= tl.load(COUNTS + b * H + h):
        return
    offs, ok, pos, offs_n, offs_d, d_ok, q, k_base, v_base, lo, full, hi = _query_tile_setup(
        Q, K, V, ROWS, COUNTS, b, h, H, n_rows, tile, sqb, sqh, sqt, skb, skh, svb, svh, W, GQA, HAS_WINDOW, HEAD_DIM,
        BLOCK_D, BLOCK_M, BLOCK_N)
    mask = ok[:, None] & d_ok[None, :]
    do = tl.load(DO + b * sdob + pos[:, None] * sdot + h * sdoh + offs_d[None, :], mask=mask, other=0.0)
    lse2 = tl.load(LSE + (b * H + h) * n_rows + offs, mask=ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + (b * H + h) * n_rows + offs, mask=ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kb in range(lo, full):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, pos, offs_n, offs_d, d_ok, T, W, skt, svt, qk_scale,
                      BLOCK_N, False, HAS_WINDOW, DOT_PREC)
    for kb in range(full, hi):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, pos, offs_n, offs_d, d_ok, T, W, skt, svt, qk_scale,
                      BLOCK_N, True, HAS_WINDOW, DOT_PREC)
    tl.store(DQ + b * sdqb + h * sdqh + pos[:, None] * sdqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=mask)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, ROWS, COUNTS, b, h, H, n_rows, tile, offs_n, offs_d, d_ok,
               T, W, sqt, sdot, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """One row tile's share of a key tile's dK, dV. Unmasked tiles hold BLOCK_M valid rows, all at or after the key
    tile's last key (no window)."""
    offs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < tl.load(COUNTS + b * H + h)
    pos = tl.load(ROWS + (b * H + h) * n_rows + offs, mask=ok, other=0)
    mask = ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + pos[:, None] * sqt + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + pos[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    lse2 = tl.load(LSE + (b * H + h) * n_rows + offs, mask=ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + (b * H + h) * n_rows + offs, mask=ok, other=0.0)
    pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])
    if MASKED:
        pT = tl.where(_allowed(pos[None, :], offs_n[:, None], T, W, HAS_WINDOW) & ok[None, :], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dsT = pT * (tl.dot(v, tl.trans(do), input_precision=DOT_PREC) - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _gq_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, ROWS, COUNTS, TILE_RANGE, qk_scale, sm_scale,
                    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdot, sdoh, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                    T, H, n_rows, n_kblocks, W, GQA, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per (key tile, KV head, batch row): dK, dV summed over the query heads of the KV head and the
    row tiles that can see the key tile: ``TILE_RANGE[b, h, key tile] = (first, unmasked from, unmasked to, end)``."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    kd_mask = (offs_n < T)[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GQA):  # the query heads sharing this KV head: their gradients sum here
        h = kvh * GQA + g
        span = TILE_RANGE + ((b * H + h) * n_kblocks + pid_n) * 4
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        first = tl.load(span)
        mid0 = tl.load(span + 1)
        mid1 = tl.load(span + 2)
        end = tl.load(span + 3)
        for tile in range(first, mid0):  # rows around the key tile's diagonal
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, ROWS, COUNTS, b, h, H, n_rows, tile, offs_n,
                                offs_d, d_ok, T, W, sqt, sdot, qk_scale, BLOCK_M, True, HAS_WINDOW, DOT_PREC)
        for tile in range(mid0, mid1):  # whole tiles of rows after every key of the tile
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, ROWS, COUNTS, b, h, H, n_rows, tile, offs_n,
                                offs_d, d_ok, T, W, sqt, sdot, qk_scale, BLOCK_M, False, HAS_WINDOW, DOT_PREC)
        for tile in range(mid1, end):  # the head's last, partly filled row tile
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, LSE, DELTA, ROWS, COUNTS, b, h, H, n_rows, tile, offs_n,
                                offs_d, d_ok, T, W, sqt, sdot, qk_scale, BLOCK_M, True, HAS_WINDOW, DOT_PREC)
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


# ---------------------------------------------------------------------------------------- launchers


def _row_tile_ranges(rows: torch.Tensor, counts: torch.Tensor, t: int, window: int, block_m: int,
                     block_n: int) -> torch.Tensor:
    """``(B, H, n_kblocks, 4)`` int32: for each key tile, the row tiles that can see one of its keys,
    ``[first, end)``, and within them ``[mid0, mid1)``, the whole tiles whose rows all come at or after the key
    tile's last key, which need no mask (none with a window). ``first`` holds the first row at or after the key
    tile's start; ``end`` is past the last row within the window of its last key (every row without a window).
    Sorted rows make each a search: padding (``PAD_ROW``) sorts last."""
    n_kblocks = triton.cdiv(t, block_n)
    b, h, n = rows.shape
    flat = rows.reshape(b * h, n)
    starts = (torch.arange(n_kblocks, device=rows.device, dtype=torch.int32) * block_n).expand(b * h, n_kblocks)
    first = torch.searchsorted(flat, starts.contiguous()) // block_m
    count = counts.reshape(b * h, 1).long()
    if window:
        end = (torch.searchsorted(flat, (starts + block_n - 1 + window).contiguous()) + block_m - 1) // block_m
        mid0 = mid1 = first
    else:
        end = ((count + block_m - 1) // block_m).expand(b * h, n_kblocks)
        after_last_key = torch.searchsorted(flat, (starts + block_n - 1).contiguous())
        mid0 = torch.maximum((after_last_key + block_m - 1) // block_m, first)
        mid1 = torch.maximum(count // block_m, mid0).expand(b * h, n_kblocks)
        mid0 = torch.minimum(mid0, mid1)
    ranges = torch.stack([first, mid0, mid1, end], dim=-1)
    return ranges.to(torch.int32).reshape(b, h, n_kblocks, 4).contiguous()


def _launch_common(q, window, cfg):
    d = q.shape[-1]
    return dict(HAS_WINDOW=bool(window), HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                DOT_PREC=_dot_prec(q.dtype))


def _fwd(q, k, v, rows, counts, scale, window, cfg):
    b, hq, t, d = q.shape
    n_rows = rows.shape[-1]
    o = torch.zeros((b, t, hq, d), dtype=q.dtype, device=q.device)  # unchosen rows stay exactly zero
    lse = torch.zeros((b, hq, n_rows), dtype=torch.float32, device=q.device)
    _gq_fwd_kernel[(triton.cdiv(n_rows, cfg.fwd_m), hq, b)](
        q, k, v, o, lse, rows, counts, scale * _LOG2E, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1),
        o.stride(2), t, hq, n_rows, window, hq // k.shape[1], BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n,
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages, **_launch_common(q, window, cfg),
    )
    return o, lse


def _bwd(do, q, k, v, o, lse, rows, counts, scale, window, cfg):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    n_rows = rows.shape[-1]
    do = do if do.stride(-1) == 1 else do.contiguous()
    common = _launch_common(q, window, cfg)
    delta = torch.zeros_like(lse)
    _gq_delta_kernel[(triton.cdiv(n_rows, 64), hq, b)](
        o, do, delta, rows, counts, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        hq, n_rows, HEAD_DIM=d, BLOCK_D=common["BLOCK_D"], BLOCK_M=64,
    )
    dq = torch.zeros_like(q)  # unchosen rows get no gradient
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _gq_dq_kernel[(triton.cdiv(n_rows, cfg.fwd_m), hq, b)](
        q, k, v, do, dq, lse, delta, rows, counts, scale * _LOG2E, scale, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), t, hq, n_rows, window,
        hq // hkv, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, num_warps=cfg.dq_warps, num_stages=cfg.dq_stages, **common,
    )
    ranges = _row_tile_ranges(rows, counts, t, window, cfg.bwd_m, cfg.bwd_n)
    _gq_dkdv_kernel[(triton.cdiv(t, cfg.bwd_n), hkv, b)](
        q, k, v, do, dk, dv, lse, delta, rows, counts, ranges, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), t, hq, n_rows, ranges.shape[2], window, hq // hkv,
        BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages, **common,
    )
    return dq, dk, dv


class GatheredQueryAttentionFunction(torch.autograd.Function):
    """out (B, T, Hq, D) = causal attention of the listed query rows of q (B, Hq, T, D) against k/v (B, Hkv, T, D);
    unlisted rows zero. Use through ``gathered_query_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, rows, counts, scale, window, config):
        q, k, v = (_ensure_last_dim_contiguous(x) for x in (q, k, v))
        cfg = config or _pick_config(q.shape[-1], q.device)
        o, lse = _fwd(*_interp_upcast(q, k, v), rows, counts, scale, window, cfg)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse, rows, counts)
        ctx.meta = (scale, window, cfg)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, rows, counts = ctx.saved_tensors
        scale, window, cfg = ctx.meta
        dq, dk, dv = _bwd(*_interp_upcast(do, q, k, v, o), lse, rows, counts, scale, window, cfg)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _check_rows(q: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> None:
    b, hq, t, _ = q.shape
    if rows.shape != (b, hq, t) or rows.dtype != torch.int32:
        raise ValueError(f"rows must be int32 (B, Hq, T) = {(b, hq, t)} (see gathered_rows); got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    if counts.shape != (b, hq) or counts.dtype != torch.int32:
        raise ValueError(f"counts must be int32 (B, Hq) = {(b, hq)}; got {counts.dtype} {tuple(counts.shape)}")
    if rows.device != q.device or counts.device != q.device:
        raise ValueError(f"rows and counts must be on q's device {q.device}")


def reference_gathered_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                                       counts: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """The CPU path: dense causal (windowed) attention for every row, then the unlisted rows zeroed. Same result as
    the kernel, none of its savings."""
    b, hq, t, _ = q.shape
    rep = hq // k.shape[1]
    kx, vx = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    pos = torch.arange(t, device=q.device)
    allowed = pos.view(-1, 1) >= pos.view(1, -1)
    if window:
        allowed &= pos.view(-1, 1) - pos.view(1, -1) < window
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), kx.to(acc).transpose(-1, -2)) * scale
    out = torch.matmul(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), vx.to(acc))
    listed = torch.zeros(b, hq, t + 1, dtype=torch.bool, device=q.device)
    listed.scatter_(-1, rows.long().clamp(max=t), True)
    return (out * listed[..., :t, None]).to(q.dtype).transpose(1, 2)


def gathered_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                             counts: torch.Tensor, scale: Optional[float] = None, window: int = 0,
                             config: Optional[KernelConfig] = None) -> torch.Tensor:
    """Causal attention for each head's listed query rows only: ``q (B, Hq, T, D)``, ``k``/``v`` ``(B, Hkv, T, D)``,
    ``rows (B, Hq, T)`` int32 and ``counts (B, Hq)`` int32 from ``gathered_rows`` -> ``(B, T, Hq, D)``, zero on the
    unlisted rows. ``window`` > 0: the model's sliding window (``q - k < window``). CUDA tensors (or
    ``TRITON_INTERPRET=1``) run the Triton kernels, with work in proportion to the listed rows; CPU tensors the
    dense reference."""
    use_kernel = q.is_cuda or interpret_mode()
    check_attention_inputs(q, k, v, kernel=use_kernel)
    _check_rows(q, rows, counts)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not use_kernel:
        return reference_gathered_query_attention(q, k, v, rows, counts, scale, window)
    return GatheredQueryAttentionFunction.apply(q, k, v, rows, counts, scale, int(window), config)
