"""Fused decode attention (one new query token per sequence) over a KV cache, with the column sums H2O needs.

What and why
------------
A static decode step (``headwise.inference.static_decode``) runs attention of one query token per sequence over
fixed-size slot buffers with a ``valid`` mask. The torch path (``patches/kv_attention.py::
grouped_attention``) does it as two GEMMs per layer and head group plus a chain of small elementwise
kernels (fp32 cast, scaling, masked_fill, softmax, nan_to_num, casts); at decode those small kernels,
not the GEMMs, dominate the step. Decode attention is memory-bound: the work is reading K and V once.
This module does exactly that, in at most three launches:

1. ``_decode_split_kernel``, grid ``(B * H, n_splits)``: one program per KV head and slice of the keys
   (flash-decoding's split-K). It loads the ``G`` query heads of its KV head once, walks its slice in
   ``BLOCK_N`` key tiles reading each K and V tile once, and keeps a running max / sum / accumulator
   in fp32 for the ``G`` rows together (the GQA group shares every K/V tile: K and V are never
   repeated over the group). It writes the partial ``(m, l, acc)`` of its slice or, with one split,
   the final output directly (no merge launch). With ``need_colsums`` it also writes the fp32 logits
   ``(B, H, G, L)``.
2. ``_decode_merge_kernel``, grid ``(B * H * G, D chunks)``: merges the splits' partials into the output
   and the log-sum-exp of every row.
3. ``_decode_colsum_kernel``, grid ``(B * H, L tiles)``, only with ``need_colsums``:
   ``colsums[b, h, l] = sum_g exp(logit[b, h, g, l] - lse[b, h, g])``.

Why the G rows go through ``tl.dot`` (padded to 16 rows): G is 1..8, so a tile is a ``(16, D) x (D,
BLOCK_N)`` product; the padding rows are free on tensor cores (decode is bound by reading K and V, not
by arithmetic), registers stay small (a 16 x BLOCK_N score tile), and the loads are the same 2D
vectorised tiles as in the prefill kernel. A broadcast multiply-sum would hold a ``G x BLOCK_N x D``
product in registers and run on the FMA units. In 16-bit dtypes the dots take the query and the
probabilities in the input dtype with fp32 accumulation (as the torch path's GEMMs do); fp32 inputs
use IEEE fp32 dots (no tf32), so fp32 is an exact check.

Why the column sums use stored logits and a second pass: a column sum needs every row's *final*
normaliser, which exists only after the splits are merged. Recomputing ``q . k`` afterwards would read
K a second time (K is half of all the traffic); a running column sum cannot be rescaled per row once
the row max changes, because each column mixes G rows with different maxima. Storing the logits costs
``4 G`` bytes per key (16 bytes at G = 4) against ``2 D`` bytes of K and ``2 D`` of V (256 + 256 at
D = 128, bf16) written once and read once: a few per cent of the step's traffic, and only for H2O.

Semantics (equal to the torch path for ``T == 1``): softmax over the valid keys only, fp32
accumulation; a row with no valid key gives output 0 (the torch path's ``nan_to_num``) and column sums
0; invalid slots get column sum 0 and are never read from V (NaN or garbage there does not leak in).

Capturable: no host synchronisation, every buffer is allocated from shapes, the grid comes from
shapes and the SM count (under CUDA graphs L is a fixed slot count). On CPU the kernels run under
``TRITON_INTERPRET=1`` (tests); the torch path stays the CPU default.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .block_sparse_attention import _d_mask
from .interpreter import interpret_mode

_LOG2E = 1.4426950408889634
NEG_INF = tl.constexpr(float("-inf"))

# Launch shapes per padded head dim on a GPU: (BLOCK_N, num_warps, num_stages). Chosen, not swept (the
# decode rows of docs/benchmarks.md ran with them): 64-key tiles keep 16 KiB of K and of V in flight per
# stage at D = 128 bf16.
GPU_LAUNCH = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)}
INTERPRET_BLOCK_N = 16  # the interpreter runs each program in numpy: small tiles keep tests fast
# Split-K grid: aim for this many programs per SM, each at least MIN_SPLIT_TILES key tiles long
# (a split writes G x (D + 2) fp32 partials and the merge reads them back), at most MAX_SPLITS splits.
PROGRAMS_PER_SM = int(os.environ.get("HEADWISE_DECODE_PROGRAMS_PER_SM", "4"))
MIN_SPLIT_TILES = 4
MAX_SPLITS = 128
INTERPRET_SMS = 4  # pretend SM count under the interpreter (a few splits at test sizes)

_sm_counts: dict = {}


@torch.compiler.assume_constant_result  # torch.compile: evaluated once at trace time, a Python int in the graph
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def num_splits(bh: int, length: int, block_n: int, device: torch.device) -> int:
    """Splits of the key axis so that ``bh * splits`` programs fill the GPU (host arithmetic on shapes)."""
    tiles = triton.cdiv(length, block_n)
    want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), max(1, bh))
    return max(1, min(want, triton.cdiv(tiles, MIN_SPLIT_TILES), MAX_SPLITS))


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(Q, K, V, VALID, ACTIVE, O, LSE, M_PART, L_PART, ACC_PART, LOGITS,
                         qk_scale, H, G, L, split_len, n_splits,
                         sqb, sqh, sqg, skb, skh, skl, svb, svh, svl, smb, smh, sml, sab, sah, sob, soh, sog,
                         HAS_VALID: tl.constexpr, HAS_ACTIVE: tl.constexpr, SINGLE: tl.constexpr, NEED_LOGITS: tl.constexpr,
                         UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """One KV head x one slice of keys: online softmax of the G query rows over the slice.

    Scores live in log2 units (``qk_scale`` = scaling * log2(e)); masked scores are -inf and a row
    whose running max is still -inf uses 0 as its reference, so exp2 gives 0, never NaN.
    SINGLE (one split): normalise and write out / lse here. Else write m, l (log2 units) and the
    unnormalised acc of the slice to the partial buffers ``(B*H, n_splits, G[, D])``.
    HAS_ACTIVE: a KV head whose ``ACTIVE`` flag is 0 walks no keys (its K and V are never read) and ends as a
    row without a valid key: output 0.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + offs_g[:, None] * sqg + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(K.dtype.element_ty)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_base = VALID + b * smb + h * smh
    start = pid_s * split_len
    end = tl.minimum(start + split_len, L)
    if HAS_ACTIVE:
        end = tl.where(tl.load(ACTIVE + b * sab + h * sah) != 0, end, start)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_k = n0 + offs_n
        in_range = offs_k < end
        if HAS_VALID:
            ok = in_range & (tl.load(m_base + offs_k * sml, mask=in_range, other=0) != 0)
        else:
            ok = in_range
        kt = tl.load(k_base + offs_k[None, :] * skl + offs_d[:, None],
                     mask=in_range[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        s = tl.where(ok[None, :], s, NEG_INF)
        if NEED_LOGITS:
            tl.store(LOGITS + (pid_bh * G + offs_g[:, None]) * L + offs_k[None, :], s,
                     mask=g_ok[:, None] & in_range[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # invalid slots are not read: whatever they hold (NaN included) cannot reach the output
        v = tl.load(v_base + offs_k[:, None] * svl + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    if SINGLE:
        empty = l_i == 0.0  # no valid key: output 0, lse -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(O + b * sob + h * soh + offs_g[:, None] * sog + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
        if NEED_LOGITS:
            tl.store(LSE + pid_bh * G + offs_g, tl.where(empty, NEG_INF, m_i + tl.math.log2(tl.where(empty, 1.0, l_i))),
                     mask=g_ok)
    else:
        row = (pid_bh * n_splits + pid_s) * G + offs_g
        tl.store(M_PART + row, m_i, mask=g_ok)
        tl.store(L_PART + row, l_i, mask=g_ok)
        tl.store(ACC_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_merge_kernel(O, LSE, M_PART, L_PART, ACC_PART, H, G, n_splits, sob, soh, sog,
                         NEED_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_DM: tl.constexpr):
    """One query row (b, h, g) x one chunk of D: weight the splits by exp2(m_s - max m), sum, normalise."""
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * G + g
    pid_d = tl.program_id(1)
    bh = row // G
    g = row % G
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = pid_d * BLOCK_DM + tl.arange(0, BLOCK_DM)
    s_ok = offs_s < n_splits
    d_ok = offs_d < HEAD_DIM
    part = (bh * n_splits + offs_s) * G + g
    m = tl.load(M_PART + part, mask=s_ok, other=float("-inf"))
    l = tl.load(L_PART + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == NEG_INF, 0.0, m_max)
    w = tl.math.exp2(m - m_ref)  # splits without a valid key: m = -inf, weight 0
    l_tot = tl.sum(w * l, 0)
    acc = tl.load(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(O + b * sob + h * soh + g * sog + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    if NEED_LSE:
        if pid_d == 0:
            tl.store(LSE + row, tl.where(l_tot == 0.0, NEG_INF, m_ref + tl.math.log2(tl.where(l_tot == 0.0, 1.0, l_tot))))


@triton.jit
def _decode_colsum_kernel(LOGITS, LSE, COLS, H, G, L, scb, sch,
                          BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr):
    """colsums[b, h, l] = sum_g exp2(logit2 - lse2); invalid slots hold logit -inf, so they sum to 0."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_g = tl.arange(0, BLOCK_G)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    g_ok = offs_g < G
    l_ok = offs_l < L
    lse = tl.load(LSE + pid_bh * G + offs_g, mask=g_ok, other=0.0)
    lse = tl.where(lse == NEG_INF, 0.0, lse)  # a row without valid keys has only -inf logits: exp2 -> 0
    s = tl.load(LOGITS + (pid_bh * G + offs_g[:, None]) * L + offs_l[None, :],
                mask=g_ok[:, None] & l_ok[None, :], other=float("-inf"))
    col = tl.sum(tl.math.exp2(s - lse[:, None]), 0)
    tl.store(COLS + b * scb + h * sch + offs_l, col, mask=l_ok)


# ----------------------------------------------------------------------------------------- launcher


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: Optional[torch.Tensor],
    scaling: float,
    need_colsums: bool = False,
    *,
    head_active: Optional[torch.Tensor] = None,
    n_splits: Optional[int] = None,
    block_n: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of one query token per sequence over a KV cache, grouped by KV head (GQA).

    Args:
        q: ``(B, H, G, D)``, the ``G`` query heads of each of the ``H`` KV heads (one token); any strides
            with a unit last stride.
        k, v: ``(B, H, L, D)``; any strides with a unit last stride (slot buffers or views of them).
        key_valid: ``(B, H, L)`` bool, the slots that hold real tokens; None: all.
        scaling: softmax scale (``1/sqrt(D)`` for plain attention).
        need_colsums: also return the column sums of the softmax probabilities summed over the G query
            heads (what H2O accumulates).
        head_active: ``(B, H)`` bool, the KV heads to compute; the others read neither K nor V and give
            output 0 (MoH decode, where a token's router left every query head of a KV head out). None:
            all. Not with ``need_colsums`` (a skipped head has no probabilities to sum).
        n_splits: key-axis splits (default: from L and the SM count, see ``num_splits``); clipped to
            the key tiles and ``MAX_SPLITS``.
        block_n: key tile (default: ``GPU_LAUNCH``'s, or 16 under the interpreter).

    Returns:
        ``out (B, H, G, D)`` in q's dtype and ``colsums (B, H, L)`` fp32 (zeros at invalid slots; each
        row with a valid key sums to G) or None.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode_attention: q (B, H, G, D), k/v (B, H, L, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, G, D = q.shape
    L = k.shape[2]
    if k.shape != (B, H, L, D) or v.shape != (B, H, L, D):
        raise ValueError(f"decode_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if key_valid is not None and key_valid.shape != (B, H, L):
        raise ValueError(f"decode_attention: key_valid {tuple(key_valid.shape)} is not {(B, H, L)}")
    if head_active is not None and (head_active.shape != (B, H) or need_colsums):
        raise ValueError(f"decode_attention: head_active {tuple(head_active.shape)} must be {(B, H)}, and "
                         "cannot go with need_colsums")
    dev = q.device
    if dev.type != "cuda" and not interpret_mode():
        raise ValueError("decode_attention: needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); on CPU use "
                         "patches.kv_attention.grouped_attention, which takes the torch path")
    # The interpreter's bf16 tl.dot is wrong (see block_sparse_attention._interp_upcast) and its fp32 ->
    # bf16 store does not round to nearest: under it, bf16 runs in fp32 and torch rounds the output.
    upcast = interpret_mode() and k.dtype == torch.bfloat16
    out = torch.empty(B, H, G, D, dtype=torch.float32 if upcast else q.dtype, device=dev)
    colsums = torch.empty(B, H, L, dtype=torch.float32, device=dev) if need_colsums else None
    if L == 0 or B * H * G * D == 0:
        if colsums is not None:
            colsums.zero_()
        return out.zero_().to(q.dtype), colsums
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    block_d = max(16, triton.next_power_of_2(D))
    block_g = max(16, triton.next_power_of_2(G))
    if interpret_mode() or dev.type != "cuda":
        bn, warps, stages = INTERPRET_BLOCK_N, 4, 1
    else:
        bn, warps, stages = GPU_LAUNCH[64 if block_d <= 64 else 128 if block_d <= 128 else 256]
    bn = block_n or bn
    bh = B * H
    splits = n_splits if n_splits is not None else num_splits(bh, L, bn, dev)
    tiles = triton.cdiv(L, bn)
    splits = max(1, min(splits, tiles, MAX_SPLITS))
    split_len = triton.cdiv(tiles, splits) * bn
    splits = triton.cdiv(L, split_len)  # no empty split
    single = splits == 1
    if key_valid is not None:
        valid = key_valid if key_valid.dtype == torch.bool else key_valid != 0
        valid = valid.view(torch.uint8)  # same strides, no copy
        smb, smh, sml = valid.stride()
    else:
        valid, (smb, smh, sml) = q, (0, 0, 0)  # never read
    if head_active is not None:
        active = (head_active if head_active.dtype == torch.bool else head_active != 0).view(torch.uint8)
        sab, sah = active.stride()
    else:
        active, (sab, sah) = q, (0, 0)  # never read
    f32 = dict(dtype=torch.float32, device=dev)
    lse = torch.empty(bh * G, **f32) if need_colsums else None
    logits = torch.empty(bh * G * L, **f32) if need_colsums else None
    if single:
        m_part = l_part = acc_part = None
    else:
        m_part = torch.empty(bh * splits * G, **f32)
        l_part = torch.empty(bh * splits * G, **f32)
        acc_part = torch.empty(bh * splits * G * D, **f32)
    dummy = out
    _decode_split_kernel[(bh, splits)](
        q, k, v, valid, active, out, lse if lse is not None else dummy,
        m_part if m_part is not None else dummy, l_part if l_part is not None else dummy,
        acc_part if acc_part is not None else dummy, logits if logits is not None else dummy,
        float(scaling) * _LOG2E, H, G, L, split_len, splits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), smb, smh, sml, sab, sah, out.stride(0), out.stride(1), out.stride(2),
        HAS_VALID=key_valid is not None, HAS_ACTIVE=head_active is not None, SINGLE=single, NEED_LOGITS=need_colsums, UPCAST=upcast,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=bn,
        DOT_PREC="ieee" if k.dtype == torch.float32 or upcast else "tf32",
        num_warps=warps, num_stages=stages,
    )
    if not single:
        block_dm = min(block_d, 64)
        _decode_merge_kernel[(bh * G, triton.cdiv(D, block_dm))](
            out, lse if lse is not None else dummy, m_part, l_part, acc_part, H, G, splits,
            out.stride(0), out.stride(1), out.stride(2),
            NEED_LSE=need_colsums, HEAD_DIM=D, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DM=block_dm,
            num_warps=4,
        )
    if need_colsums:
        block_l = 64 if interpret_mode() or dev.type != "cuda" else 256
        _decode_colsum_kernel[(bh, triton.cdiv(L, block_l))](
            logits, lse, colsums, H, G, L, colsums.stride(0), colsums.stride(1),
            BLOCK_G=max(2, triton.next_power_of_2(G)), BLOCK_L=block_l, num_warps=4,
        )
    return out.to(q.dtype), colsums


def _decode_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
                           scaling: float, need_colsums: bool,
                           head_active: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_attention`` as one opaque torch operator (``headwise::decode_attention``), so
    ``torch.compile`` (the static decoder's ``mode="compile"``) fuses the model's elementwise chains
    around it without tracing into the launcher's host arithmetic. Same arguments; the column sums come
    back as an empty tensor when ``need_colsums`` is false (an operator's outputs cannot be None).
    ``decode_attention`` is looked up in the module's globals at call time, so a reloaded module (the
    kernel tests reload it under the interpreter) runs its own kernels through the operator registered first."""
    out, colsums = decode_attention(q, k, v, key_valid, scaling, need_colsums, head_active=head_active)
    return out, colsums if colsums is not None else torch.empty(0, dtype=torch.float32, device=q.device)


def _decode_attention_fake(q, k, v, key_valid, scaling, need_colsums, head_active=None):
    B, H, G, D = q.shape
    cols = (B, H, k.shape[2]) if need_colsums else (0,)
    return q.new_empty(B, H, G, D), q.new_empty(cols, dtype=torch.float32)


try:  # registered once per process (a module reload must not register it twice)
    decode_attention_op = torch.ops.headwise.decode_attention
except AttributeError:
    decode_attention_op = torch.library.custom_op("headwise::decode_attention", _decode_attention_impl, mutates_args=())
    decode_attention_op.register_fake(_decode_attention_fake)
