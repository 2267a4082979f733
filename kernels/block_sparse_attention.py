"""Block-sparse causal flash attention over a per-head ``BlockLayout`` (forward + backward, Triton).

One kernel family serves every headwise layout (docs/kernels.md):
each program walks its tile list (``kernels/layouts.py``), first the *full* tiles with no masking,
then the *partial* tiles with the layout's token rule evaluated in registers (``_token_rule``).

- Accumulation in fp32; inputs bf16, fp16 or fp32 (fp32 dots use IEEE precision, not tf32, so the
  fp32 path is an exact check under the tolerance rule).
- Head dims up to 256; dims that are not a power of two are padded to the next power of two with
  masked loads (80 -> 128, 96 -> 128).
- GQA without repeating K/V: query head ``h`` reads KV head ``h // (Hq // Hkv)``. The dK/dV program of
  one KV head and key tile loops over the query heads of its group and their column lists, so the
  gradients of shared K/V heads are summed in registers: no atomics for dK/dV, deterministic.
- dQ two ways (``KernelConfig.dq_path``). "kernel" (the default): a separate program per query tile,
  which recomputes P (one extra QK^T and exp per tile, as the Triton flash-attention tutorial does)
  and sums in a fixed order: deterministic. "tma" / "atomic": the dK/dV pass adds each tile pair's
  dS K into an fp32 buffer by TMA bulk reduce-adds / relaxed element atomics (FlashAttention-2/3's
  way): fewer matmuls, but dQ's last bits vary from run to run. Measured on the H200 (docs/benchmarks.md,
  eighth session), TMA wins only on the dense layout (1.06-1.08x), which uses it; the sparse
  layouts keep the dQ kernel. ``torch.use_deterministic_algorithms(True)`` always gets "kernel".
- Gradients come back in the inputs' memory layout (transformers' (B, H, T, D) views of (B, T, H, D)
  buffers), so autograd and the projections' backward copy nothing.
- Lengths that the tile sizes divide (one sequence) run without row masks on loads and stores
  (``EVEN``, ``KernelConfig.unmasked_even``), as FlexAttention's divisible case does; other lengths
  mask the rows past the sequence's end.
- Any length; packed sequences via ``cu_seqlens`` (int32 ``(n+1,)``, B == 1): the grid's third axis
  runs over (batch, sequence) and every position is relative to its sequence's start, so the
  layout applies inside each sequence. Keys and queries past a sequence's end are masked at load.
- Returns the log-sum-exp (natural log, fp32, ``(B, Hq, T)``) so partial results can be merged; its
  gradient is honoured in the backward (``delta -= dlse``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .input_checks import check_attention_inputs
from .interpreter import interpret_mode
from .layouts import BlockLayout, LayoutSpec, build_layout
from .tensor_memo import LastTensorMemo

# exp2 is a single MUFU instruction; exp is exp2 plus a multiply. Scores are scaled by log2(e) once.
_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # jit code may only read constexpr globals
LN2 = tl.constexpr(0.6931471805599453)
# Masked scores get a large finite negative instead of -inf: a row whose first visited tile is fully
# masked then gets m = NEG and p = 1 garbage that the first valid tile wipes out (alpha = 2^(NEG - m)
# = 0), instead of NaN from (-inf) - (-inf). Every valid row visits its diagonal tile (all layouts
# allow k == q), which comes last in its row list, so the garbage never survives.
NEG = tl.constexpr(-1.0e30)
# KIND (a constexpr) = the layout's rule code (layouts.py, < 8) + 8 when the model's window applies on top
# (q - k < P3) + 16 when scores are soft-capped (c * tanh(s / c): qk_scale carries scale / c, CAP = c * log2(e))
# + 32 when that tanh may be the GPU's one-instruction approximation (16-bit inputs on CUDA, see `_tanh`).
# Written as arithmetic on literals: the interpreter cannot mix a constexpr global into it.


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes and launch parameters. ``fwd_*`` are also used by dQ; ``bwd_*`` by dK/dV."""

    fwd_m: int = 128
    fwd_n: int = 64
    bwd_m: int = 64
    bwd_n: int = 128
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_warps: int = 8
    dq_stages: int = 2
    dkdv_warps: int = 8
    dkdv_stages: int = 2
    # dK/dV column split: a key tile whose column (summed over the query heads of its KV head) holds
    # more than this many query tiles is shared by several programs, each over at most this many
    # tiles, whose fp32 partials a reduction pass sums in a fixed order (deterministic, no atomics).
    # 0 = off: one program per key tile, however long its column (see ``_column_split_plan``).
    col_split: int = 0
    # Where dQ comes from (``DQ_PATHS``). "kernel": its own program per query tile, which recomputes
    # QK^T and exp (7 matmul-equivalents per tile pair in the whole backward instead of 5) but sums
    # in a fixed order: deterministic. "atomic" / "tma": the dK/dV pass also computes each pair's
    # dS K and adds it into an fp32 dQ buffer, by relaxed element atomics or by TMA bulk reduce-adds
    # (FlashAttention-3's way); the summation order, so dQ's last bits, then vary from run to run, and
    # the fp32 buffer (B x Hq x T x padded D) holds twice a bf16 dQ's bytes during the backward.
    # ``torch.use_deterministic_algorithms(True)`` always gets "kernel".
    dq_path: str = "kernel"
    # Tiles without row masks when one sequence's length is a multiple of both tile sizes (``_even``),
    # as FlexAttention does for divisible lengths. False keeps the masks, for comparisons. Measured on
    # an H200 (ninth session, 32K, 32 KV heads, `tune_kernels.py --stages unmasked`): fwd+bwd dense
    # 80.98 -> 78.36 ms, S2 19.04 -> 18.15, streaming 3.83 -> 3.66; forward alone 1.02x dense, 1.05x S2.
    unmasked_even: bool = True

    def __post_init__(self):
        if self.dq_path not in DQ_PATHS:
            raise ValueError(f"KernelConfig.dq_path={self.dq_path!r}: expected one of {sorted(DQ_PATHS)}")


DQ_PATHS = {"kernel": 0, "atomic": 1, "tma": 2}  # -> the kernels' DQ_MODE


# Fixed configs per padded head dim (no autotune: the first call must not take minutes, and the
# layout is built per tile shape). Chosen, not yet tuned: the usual flash-attention Triton shapes
# (128x64 forward/dQ tiles, 64x128 dK/dV tiles, 8 warps for D = 128); D = 256 halves the tiles to fit
# shared memory. docs/benchmarks.md has what they give on an H200 and what is left to tune.
GPU_CONFIGS = {
    64: KernelConfig(128, 64, 64, 128, 4, 3, 4, 2, 4, 2),
    128: KernelConfig(128, 64, 64, 128, 8, 3, 8, 2, 8, 2),
    256: KernelConfig(64, 32, 32, 64, 4, 2, 4, 1, 4, 1),
}
# Per-layout configs at D = 128 that beat GPU_CONFIGS in `benchmarks/tune_kernels.py` on an H200
# (2026-11-30, T = 32K, 32 KV heads, bf16; rows in benchmarks/results/kernel_tuning.jsonl): smaller
# backward tiles with 4 warps and one stage win for the sparse layouts, whose programs visit few tiles
# (S2 fwd+bwd 26.5 -> 20.8 ms, streaming 7.6 -> 5.9 ms). Stage 3 (same day) added streaming's column
# split: the sink key tiles are visited by every query tile, so without it one dK/dV program per sink
# tile runs the whole column alone (Nsight Compute: 8% SM throughput, a 15-wave tail); splitting at
# 32 query tiles gives 9.30 -> 4.76 ms with 8 KV heads and 5.86 -> 5.03 ms with 32. S2 gains <= 4%
# from a split, inside run-to-run noise, so it keeps none. The sliding window (all three stages, 32K,
# window 4K) gains only from wider forward key tiles (fwd 5.42 -> 5.28 ms; its backward keeps
# GPU_CONFIGS'). Dense takes dQ from the dK/dV pass by TMA reduce-adds (eighth session, stage
# dq_path: 89.9 -> 82.9 ms at 32K, 6.51 -> 6.16 ms at 8K); for S2 and streaming the TMA path was
# 1.13-1.17x slower and for the sliding window equal, so they keep the dQ kernel (deterministic).
# Layouts not listed keep GPU_CONFIGS.
TUNED_D128 = {
    "dense": dataclasses.replace(GPU_CONFIGS[128], dq_path="tma"),
    "sliding_window": KernelConfig(128, 128, 64, 128, 8, 3, 8, 2, 8, 2),
    "s2": KernelConfig(128, 64, 64, 64, 4, 2, 4, 1, 4, 1),
    "streaming": KernelConfig(64, 64, 64, 64, 4, 3, 4, 1, 4, 1, col_split=32),
}
# The interpreter runs each program in numpy: small tiles keep CPU tests in seconds.
INTERPRET_CONFIG = KernelConfig(32, 32, 32, 32, 4, 1, 4, 1, 4, 1)


def pick_config(head_dim: int, spec: LayoutSpec, device) -> KernelConfig:
    if interpret_mode() or torch.device(device).type != "cuda":
        cfg = INTERPRET_CONFIG
    else:
        d = triton.next_power_of_2(head_dim)
        cfg = GPU_CONFIGS[64 if d <= 64 else 128 if d <= 128 else 256]
        if d == 128:
            cfg = TUNED_D128.get(spec.kind, cfg)
    if spec.kind == "s2" and spec.block >= 16 and spec.block & (spec.block - 1) == 0:
        # Key tiles wider than the S2 block would turn every stride column into a half-masked tile.
        cfg = dataclasses.replace(cfg, fwd_n=min(cfg.fwd_n, spec.block), bwd_n=min(cfg.bwd_n, spec.block))
    return cfg


# ------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _token_rule(q_pos, k_pos, hp, P0, P1, P2, P3, KIND: tl.constexpr):
    """allowed(q, k) of docs/kernels.md's table; q_pos/k_pos broadcastable int tensors (sequence-relative),
    hp the head's parameter (group offset or S2 stride offset), P3 the model's window when KIND carries
    a window (KIND's 8). Kind codes from layouts.py in KIND % 8."""
    ok = k_pos <= q_pos
    if (KIND // 8) % 2 == 1:
        ok = ok & (q_pos - k_pos < P3)
    if KIND % 8 == 1:  # sliding window: P0 = window
        ok = ok & (q_pos - k_pos < P0)
    elif KIND % 8 == 2:  # streaming: P0 = sink, P1 = recent
        ok = ok & ((k_pos < P0) | (q_pos - k_pos < P1))
    elif KIND % 8 == 3:  # shifted groups: P0 = sink, P1 = G, hp = 0 or G/2
        ok = ok & ((k_pos < P0) | ((q_pos + hp) // P1 == (k_pos + hp) // P1))
    elif KIND % 8 == 4:  # S2: P0 = block, P1 = local blocks, P2 = vertical stride, hp = o_h
        kb = k_pos // P0
        ok = ok & (((q_pos // P0) - kb < P1) | ((kb + hp + 1) % P2 == 0))
    return ok


@triton.jit
def _tanh(x, KIND: tl.constexpr):
    if KIND >= 32:
        # PTX tanh.approx.f32 (one MUFU op, relative error below 2^-10.9): finer than the bf16/fp16 rounding of
        # the probabilities that follow; the sigmoid form below costs an exp and a division per score, which
        # measured 1.4x the uncapped kernel's time at 32K.
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        # fp32 inputs (the exact path) and the interpreter: tanh from the sigmoid, to fp32 rounding
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_src, v_src, kb, offs_m, offs_n, offs_d, d_ok, seqlen, skt, svt, qk_scale,
              hp, P0, P1, P2, P3, CAP, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              KIND: tl.constexpr, DOT_PREC: tl.constexpr, EVEN: tl.constexpr):
    """One key tile of the online softmax; ``k_src``/``v_src`` point at the KV head's first token."""
    offs_k = kb * BLOCK_N + offs_n
    k_ok = _in_seq(offs_k, seqlen, EVEN)
    kt = tl.load(k_src + offs_k[None, :] * skt + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    if (KIND // 16) % 2 == 1:
        qk = CAP * _tanh(qk, KIND)
    if MASKED:
        ok = _token_rule(offs_m[:, None], offs_k[None, :], hp, P0, P1, P2, P3, KIND) & k_ok[None, :]
        qk = tl.where(ok, qk, NEG)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_src + offs_k[:, None] * svt + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _d_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # A splat of True when the head dim is a power of two: the compiler then sees a mask that is
    # constant along D and keeps 16-byte vector loads (offs_d < HEAD_DIM would not fold).
    if HEAD_DIM == BLOCK_D:
        return tl.full([BLOCK_D], 1, tl.int1)
    else:
        return offs_d < HEAD_DIM


@triton.jit
def _in_seq(offs, seqlen, EVEN: tl.constexpr):
    """offs < seqlen, or a constant all-true mask when every tile lies inside the sequence (EVEN: one
    sequence whose length is a multiple of both tile sizes). Triton folds an all-true mask away, so
    EVEN tiles load and store without predicates, as FlexAttention does for divisible lengths."""
    if EVEN:
        return tl.full(offs.shape, 1, tl.int1)
    else:
        return offs < seqlen


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _sequence(CU, bs, n_seq):
    """Program axis ``bs`` = batch row x packed sequence -> (batch row, first token, length)."""
    s = bs % n_seq
    start = tl.load(CU + s)
    return (bs // n_seq).to(tl.int64), start.to(tl.int64), tl.load(CU + s + 1) - start


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, HP, ROW_PTR, ROW_IDX, ROW_NFULL,
                qk_scale, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, sot, soh, slb, slh,
                n_seq, n_qblocks, P0, P1, P2, P3, CAP,
                GQA, KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, EVEN: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    bs = tl.program_id(2)
    b, start, seqlen = _sequence(CU, bs, n_seq)
    if pid_m * BLOCK_M >= seqlen:
        return
    kvh = h // GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    m_ok = _in_seq(offs_m, seqlen, EVEN)
    q = tl.load(Q + b * sqb + h * sqh + (start + offs_m[:, None]) * sqt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + kvh * skh + start * skt
    v_base = V + b * svb + kvh * svh + start * svt
    row = h * n_qblocks + pid_m
    r0 = tl.load(ROW_PTR + row)
    r1 = tl.load(ROW_PTR + row + 1)
    nf = tl.load(ROW_NFULL + row)
    hp = tl.load(HP + h)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for e in range(r0, r0 + nf):
        kb = tl.load(ROW_IDX + e)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, d_ok, seqlen,
                                  skt, svt, qk_scale, hp, P0, P1, P2, P3, CAP, BLOCK_N, False, KIND, DOT_PREC, EVEN)
    for e in range(r0 + nf, r1):
        kb = tl.load(ROW_IDX + e)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, offs_m, offs_n, offs_d, d_ok, seqlen,
                                  skt, svt, qk_scale, hp, P0, P1, P2, P3, CAP, BLOCK_N, True, KIND, DOT_PREC, EVEN)
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + (start + offs_m[:, None]) * sot + h * soh + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + b * slb + h * slh + start + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, sob, sot, soh, sdob, sdot, sdoh, slb, slh, T, H,
                           HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """delta[b, h, t] = sum_d O * dO - dlse (the softmax-gradient row term)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & _d_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    o = tl.load(O + b * sob + offs_m[:, None] * sot + h * soh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + offs_m[:, None] * sdot + h * sdoh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * slb + h * slh + offs_m, mask=offs_m < T, other=0.0)
    tl.store(DELTA + b * slb + h * slh + offs_m, delta, mask=offs_m < T)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, d_ok, seqlen, skt, svt,
                 qk_scale, hp, P0, P1, P2, P3, CAP, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, KIND: tl.constexpr, DOT_PREC: tl.constexpr, EVEN: tl.constexpr):
    offs_k = kb * BLOCK_N + offs_n
    k_ok = _in_seq(offs_k, seqlen, EVEN)
    kv_mask = k_ok[None, :] & d_ok[:, None]
    kt = tl.load(k_base + offs_k[None, :] * skt + offs_d[:, None], mask=kv_mask, other=0.0)
    vt = tl.load(v_base + offs_k[None, :] * svt + offs_d[:, None], mask=kv_mask, other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    if (KIND // 16) % 2 == 1:
        th = _tanh(qk, KIND)
        qk = CAP * th
    p = tl.math.exp2(qk - lse2[:, None])
    if MASKED:
        ok = _token_rule(offs_m[:, None], offs_k[None, :], hp, P0, P1, P2, P3, KIND) & k_ok[None, :]
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    if (KIND // 16) % 2 == 1:
        ds = ds * (1.0 - th * th)  # d(c tanh(s / c)) / ds
    dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU, HP, ROW_PTR, ROW_IDX, ROW_NFULL,
                   qk_scale, sm_scale, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdot, sdoh,
                   sdqb, sdqh, sdqt, slb, slh, n_seq, n_qblocks, P0, P1, P2, P3, CAP,
                   GQA, KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, EVEN: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    bs = tl.program_id(2)
    b, start, seqlen = _sequence(CU, bs, n_seq)
    if pid_m * BLOCK_M >= seqlen:
        return
    kvh = h // GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    m_ok = _in_seq(offs_m, seqlen, EVEN)
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + (start + offs_m[:, None]) * sqt + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdob + (start + offs_m[:, None]) * sdot + h * sdoh + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + start + offs_m, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + b * slb + h * slh + start + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + kvh * skh + start * skt
    v_base = V + b * svb + kvh * svh + start * svt
    row = h * n_qblocks + pid_m
    r0 = tl.load(ROW_PTR + row)
    r1 = tl.load(ROW_PTR + row + 1)
    nf = tl.load(ROW_NFULL + row)
    hp = tl.load(HP + h)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for e in range(r0, r0 + nf):
        kb = tl.load(ROW_IDX + e)
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, d_ok, seqlen, skt, svt,
                          qk_scale, hp, P0, P1, P2, P3, CAP, BLOCK_N, False, KIND, DOT_PREC, EVEN)
    for e in range(r0 + nf, r1):
        kb = tl.load(ROW_IDX + e)
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb, offs_m, offs_n, offs_d, d_ok, seqlen, skt, svt,
                          qk_scale, hp, P0, P1, P2, P3, CAP, BLOCK_N, True, KIND, DOT_PREC, EVEN)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + (start + offs_m[:, None]) * sdqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, qb, offs_n, offs_mm, offs_d, d_ok,
                   seqlen, sqt, sdot, qk_scale, hp, P0, P1, P2, P3, CAP, DQ_ACC, dq_row, BLOCK_M: tl.constexpr,
                   MASKED: tl.constexpr, KIND: tl.constexpr, DOT_PREC: tl.constexpr, DQ_MODE: tl.constexpr,
                   EVEN: tl.constexpr):
    offs_m = qb * BLOCK_M + offs_mm
    m_ok = _in_seq(offs_m, seqlen, EVEN)
    mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
    if (KIND // 16) % 2 == 1:
        thT = _tanh(qkT, KIND)
        qkT = CAP * thT
    pT = tl.math.exp2(qkT - lse2[None, :])
    if MASKED:
        ok = _token_rule(offs_m[None, :], offs_n[:, None], hp, P0, P1, P2, P3, KIND) & m_ok[None, :]
        pT = tl.where(ok, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    if (KIND // 16) % 2 == 1:
        dsT = dsT * (1.0 - thT * thT)
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    if DQ_MODE != 0:
        _add_dq(DQ_ACC, dq_row, qb, tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PREC),
                offs_mm, offs_d, m_ok, BLOCK_M, DQ_MODE)
    return dk, dv


@triton.jit
def _add_dq(DQ_ACC, dq_row, qb, dq, offs_mm, offs_d, m_ok, BLOCK_M: tl.constexpr, DQ_MODE: tl.constexpr):
    """Add one tile pair's unscaled fp32 dQ share (BLOCK_M, BLOCK_D) into the dQ buffer, whose rows
    are (batch, head, token) flattened, ``dq_row`` the sequence's first row, BLOCK_D wide.

    The element atomics (DQ_MODE 1) are masked to the sequence (``m_ok``). A TMA box (DQ_MODE 2) has
    no mask: it is clipped at the buffer's end only, so it may spill a tile's rows past the sequence's
    end onto the next sequence's or head's rows. Those rows hold exact zeros (their q, dO, lse and
    delta load as 0, so dS is 0), and adding 0 changes nothing."""
    if DQ_MODE == 1:
        rows = dq_row + qb * BLOCK_M + offs_mm
        tl.atomic_add(DQ_ACC + rows[:, None] * dq.shape[1] + offs_d[None, :], dq, mask=m_ok[:, None],
                      sem="relaxed")
    else:
        DQ_ACC.atomic_add([(dq_row + qb * BLOCK_M).to(tl.int32), 0], dq)


@triton.jit
def _load_kv_tile(K, V, b, kvh, start, pid_n, seqlen, skb, skh, skt, svb, svh, svt, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr):
    """Key tile ``pid_n`` of KV head ``kvh`` in the sequence starting at ``start``: offsets, masks, K, V."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    kd_mask = _in_seq(offs_n, seqlen, EVEN)[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + (start + offs_n[:, None]) * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + (start + offs_n[:, None]) * svt + offs_d[None, :], mask=kd_mask, other=0.0)
    return offs_n, offs_d, d_ok, kd_mask, k, v


@triton.jit
def _dkdv_column(dk, dv, k, v, q_base, do_base, lse_base, delta_base, COL_IDX, c0, nf, e0, e1, offs_n, offs_mm,
                 offs_d, d_ok, seqlen, sqt, sdot, qk_scale, hp, P0, P1, P2, P3, CAP, DQ_ACC, dq_row, BLOCK_M: tl.constexpr,
                 KIND: tl.constexpr, DOT_PREC: tl.constexpr, DQ_MODE: tl.constexpr, EVEN: tl.constexpr):
    """Entries [e0, e1) of a column that starts at c0 with nf unmasked (full) entries first."""
    for e in range(e0, tl.minimum(e1, c0 + nf)):
        qb = tl.load(COL_IDX + e)
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, qb, offs_n, offs_mm,
                                offs_d, d_ok, seqlen, sqt, sdot, qk_scale, hp, P0, P1, P2, P3, CAP, DQ_ACC, dq_row,
                                BLOCK_M, False, KIND, DOT_PREC, DQ_MODE, EVEN)
    for e in range(tl.maximum(e0, c0 + nf), e1):
        qb = tl.load(COL_IDX + e)
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, qb, offs_n, offs_mm,
                                offs_d, d_ok, seqlen, sqt, sdot, qk_scale, hp, P0, P1, P2, P3, CAP, DQ_ACC, dq_row,
                                BLOCK_M, True, KIND, DOT_PREC, DQ_MODE, EVEN)
    return dk, dv


@triton.jit
def _partial_offsets(slot, bs, n_bs, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets of the (BLOCK_N, BLOCK_D) fp32 scratch tile of (slot, sequence ``bs``): the one layout of
    the column split's partials, written by the dK/dV programs and read by the reduction."""
    rows = (slot.to(tl.int64) * n_bs + bs) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _store_partial(PART_K, PART_V, slot, bs, n_bs, dk, dv, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 partials of one program into its scratch tile (slot, bs)."""
    base = _partial_offsets(slot, bs, n_bs, BLOCK_N, BLOCK_D)
    tl.store(PART_K + base, dk)
    tl.store(PART_V + base, dv)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC, CU, HP, COL_PTR, COL_IDX, COL_NFULL, TILE_SLOT,
                     PART_K, PART_V, qk_scale, sm_scale, T_all, H_all, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                     sdob, sdot, sdoh, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, slb, slh, n_seq, n_kblocks, P0, P1, P2, P3, CAP,
                     split, n_bs, GQA, KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                     HAS_SPLIT: tl.constexpr, DQ_MODE: tl.constexpr, EVEN: tl.constexpr):
    """One program per (key tile, KV head, sequence): dK, dV of the tile summed over the GQA group's
    query heads. With HAS_SPLIT, each column contributes only its first ``split`` entries here; a tile
    with a longer column (TILE_SLOT >= 0) writes its fp32 partial to scratch for ``_bwd_dkdv_reduce_kernel``
    and ``_bwd_dkdv_items_kernel`` covers the rest. With DQ_MODE != 0, every tile pair's dQ share is
    added into DQ_ACC too (``_add_dq``)."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    bs = tl.program_id(2)
    b, start, seqlen = _sequence(CU, bs, n_seq)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_mm = tl.arange(0, BLOCK_M)
    offs_n, offs_d, d_ok, kd_mask, k, v = _load_kv_tile(K, V, b, kvh, start, pid_n, seqlen, skb, skh, skt,
                                                        svb, svh, svt, HEAD_DIM, BLOCK_D, BLOCK_N, EVEN)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GQA):  # the query heads sharing this KV head: their gradients sum here
        h = kvh * GQA + g
        q_base = Q + b * sqb + h * sqh + start * sqt
        do_base = DO + b * sdob + h * sdoh + start * sdot
        lse_base = LSE + b * slb + h * slh + start
        delta_base = DELTA + b * slb + h * slh + start
        col = h * n_kblocks + pid_n
        c0 = tl.load(COL_PTR + col)
        c1 = tl.load(COL_PTR + col + 1)
        nf = tl.load(COL_NFULL + col)
        hp = tl.load(HP + h)
        if HAS_SPLIT:
            c1 = tl.minimum(c1, c0 + split)
        dk, dv = _dkdv_column(dk, dv, k, v, q_base, do_base, lse_base, delta_base, COL_IDX, c0, nf, c0, c1,
                              offs_n, offs_mm, offs_d, d_ok, seqlen, sqt, sdot, qk_scale, hp, P0, P1, P2, P3, CAP,
                              DQ_ACC, (b * H_all + h) * T_all + start, BLOCK_M, KIND, DOT_PREC, DQ_MODE, EVEN)
    if HAS_SPLIT:
        slot = tl.load(TILE_SLOT + kvh * n_kblocks + pid_n)
        if slot >= 0:
            _store_partial(PART_K, PART_V, slot, bs, n_bs, dk, dv, BLOCK_N, BLOCK_D)
            return
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + kvh * sdkh + (start + offs_n[:, None]) * sdkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + (start + offs_n[:, None]) * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_mask)


@triton.jit
def _bwd_dkdv_items_kernel(Q, K, V, DO, LSE, DELTA, DQ_ACC, CU, HP, COL_PTR, COL_IDX, COL_NFULL, ITEMS, PART_K,
                           PART_V, qk_scale, T_all, H_all, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdot,
                           sdoh, slb, slh, n_seq, n_kblocks, P0, P1, P2, P3, CAP, n_bs, GQA, KIND: tl.constexpr,
                           HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT_PREC: tl.constexpr, DQ_MODE: tl.constexpr, EVEN: tl.constexpr):
    """One program per (work item, sequence): entries [e0, e1) of query head h's column of key tile n,
    written as an fp32 partial to scratch slot ``slot`` (ITEMS rows: h, n, e0, e1, slot)."""
    item = tl.program_id(0)
    bs = tl.program_id(1)
    h = tl.load(ITEMS + item * 5)
    pid_n = tl.load(ITEMS + item * 5 + 1)
    e0 = tl.load(ITEMS + item * 5 + 2)
    e1 = tl.load(ITEMS + item * 5 + 3)
    slot = tl.load(ITEMS + item * 5 + 4)
    b, start, seqlen = _sequence(CU, bs, n_seq)
    if pid_n * BLOCK_N >= seqlen:  # no such key tile in this sequence: the reduction skips it too
        return
    kvh = h // GQA
    offs_mm = tl.arange(0, BLOCK_M)
    offs_n, offs_d, d_ok, kd_mask, k, v = _load_kv_tile(K, V, b, kvh, start, pid_n, seqlen, skb, skh, skt,
                                                        svb, svh, svt, HEAD_DIM, BLOCK_D, BLOCK_N, EVEN)
    col = h * n_kblocks + pid_n
    c0 = tl.load(COL_PTR + col)
    nf = tl.load(COL_NFULL + col)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_column(dk, dv, k, v, Q + b * sqb + h * sqh + start * sqt, DO + b * sdob + h * sdoh + start * sdot,
                          LSE + b * slb + h * slh + start, DELTA + b * slb + h * slh + start, COL_IDX, c0, nf, e0, e1,
                          offs_n, offs_mm, offs_d, d_ok, seqlen, sqt, sdot, qk_scale, tl.load(HP + h), P0, P1, P2, P3, CAP,
                          DQ_ACC, (b * H_all + h) * T_all + start, BLOCK_M, KIND, DOT_PREC, DQ_MODE, EVEN)
    _store_partial(PART_K, PART_V, slot, bs, n_bs, dk, dv, BLOCK_N, BLOCK_D)


@triton.jit
def _bwd_dkdv_reduce_kernel(DK, DV, CU, RED_TILE, RED_PTR, RED_SLOT, PART_K, PART_V, sm_scale,
                            sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, n_seq, n_kblocks, n_bs,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (split key tile, sequence): dK, dV = the sum of its partials' slots, in slot order."""
    t = tl.program_id(0)
    bs = tl.program_id(1)
    tile = tl.load(RED_TILE + t)  # kvh * n_kblocks + key tile
    kvh = tile // n_kblocks
    pid_n = tile % n_kblocks
    b, start, seqlen = _sequence(CU, bs, n_seq)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r in range(tl.load(RED_PTR + t), tl.load(RED_PTR + t + 1)):
        base = _partial_offsets(tl.load(RED_SLOT + r), bs, n_bs, BLOCK_N, BLOCK_D)
        dk += tl.load(PART_K + base)
        dv += tl.load(PART_V + base)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kd_mask = (offs_n[:, None] < seqlen) & _d_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    tl.store(DK + b * sdkb + kvh * sdkh + (start + offs_n[:, None]) * sdkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + (start + offs_n[:, None]) * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_mask)


# ---------------------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class ColumnSplitPlan:
    """Which dK/dV key tiles are shared by several programs (``KernelConfig.col_split``).

    ``tile_slot (Hkv * n_kblocks,)``: the scratch slot of a split tile's main program, -1 elsewhere.
    ``items (n_items, 5)``: (query head, key tile, first entry, end entry, slot) of the extra programs.
    ``red_tile / red_ptr / red_slot``: per split tile, the slots the reduction sums (main slot first,
    then its items in head and entry order, so the sum order is fixed).
    """

    tile_slot: torch.Tensor
    items: torch.Tensor
    red_tile: torch.Tensor
    red_ptr: torch.Tensor
    red_slot: torch.Tensor
    n_slots: int


def _column_split_plan(lay: BlockLayout, hkv: int, split: int, device) -> Optional[ColumnSplitPlan]:
    """The split plan of ``lay`` for ``hkv`` KV heads (cached on the layout), or None when no column of
    any KV head is longer than ``split`` entries summed over its query heads.

    A tile is split when its column, over the G query heads of its KV head, holds more than ``split``
    entries; its main program keeps each head's first ``split`` entries and every further run of up to
    ``split`` entries of a head becomes one item. Built on the host from the column pointers, once.
    """
    key = ("col_split", hkv, split)
    if key in lay.extra:
        return lay.extra[key]
    hq, nk = lay.n_heads, lay.n_kblocks
    gqa = hq // hkv
    lengths = (lay.col_ptr[1:] - lay.col_ptr[:-1]).view(hq, nk).cpu()
    ptr = lay.col_ptr[:-1].view(hq, nk).cpu()
    long_tiles = (lengths.view(hkv, gqa, nk).sum(1) > split).nonzero().tolist()  # [(kvh, n)]
    plan = None
    if long_tiles:
        tile_slot = torch.full((hkv * nk,), -1, dtype=torch.int32)
        items, red_ptr, red_slot = [], [0], []
        n_slots = len(long_tiles)  # slots 0..len-1: the main programs' partials
        for slot, (kvh, n) in enumerate(long_tiles):
            tile_slot[kvh * nk + n] = slot
            red_slot.append(slot)
            for h in range(kvh * gqa, (kvh + 1) * gqa):
                c0, c1 = int(ptr[h, n]), int(ptr[h, n]) + int(lengths[h, n])
                for e0 in range(c0 + split, c1, split):
                    items.append((h, n, e0, min(e0 + split, c1), n_slots))
                    red_slot.append(n_slots)
                    n_slots += 1
            red_ptr.append(len(red_slot))
        as_dev = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        plan = ColumnSplitPlan(tile_slot.to(device), as_dev(items).view(-1, 5),
                               as_dev([kvh * nk + n for kvh, n in long_tiles]), as_dev(red_ptr), as_dev(red_slot),
                               n_slots)
    lay.extra[key] = plan
    return plan


def _dot_prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=64)
def _whole_sequence_cu(t: int, device: torch.device) -> torch.Tensor:
    """[0, t] as int32 on ``device``, built once per (T, device): ``torch.tensor(..., device="cuda")``
    copies from pageable memory and synchronises the stream, which would stall the host on every
    attention call (once per layer) and leave the GPU idle while the next launches are issued."""
    return torch.tensor([0, t], dtype=torch.int32, device=device)


# Packed boundaries are read to the host (a sync) once per boundaries tensor, not once per layer call.
_PACKING = LastTensorMemo()


def _seq_info(t: int, cu_seqlens: Optional[torch.Tensor], device, max_seqlen: Optional[int]):
    """(cu int32 on device, n_seq, max_len) with tokens past cu[-1] forming one more sequence.
    A single sequence costs no host sync; packed sequences cost one per boundaries tensor (they are
    checked, and their longest length sizes the grid), however many layers read it."""
    if cu_seqlens is None:
        return _whole_sequence_cu(t, torch.device(device)), 1, t
    return _PACKING.get(cu_seqlens, (t, str(device), max_seqlen),
                        lambda: _read_packing(t, cu_seqlens, device, max_seqlen))


def _read_packing(t: int, cu_seqlens: torch.Tensor, device, max_seqlen: Optional[int]):
    cu_list = [int(x) for x in cu_seqlens.tolist()]
    if cu_list[0] != 0 or any(b < a for a, b in zip(cu_list, cu_list[1:])) or cu_list[-1] > t:
        raise ValueError(f"bad cu_seqlens {cu_list} for T={t}")
    if cu_list[-1] < t:
        cu_list.append(t)
    lens = [b - a for a, b in zip(cu_list, cu_list[1:])]
    if max_seqlen is not None and max_seqlen < max(lens):
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest packed sequence ({max(lens)} tokens)")
    max_len = max(lens) if max_seqlen is None else max_seqlen
    return torch.tensor(cu_list, dtype=torch.int32, device=device), len(cu_list) - 1, max_len


def _layout_for(spec: LayoutSpec, max_len: int, n_heads: int, bm: int, bn: int, device) -> BlockLayout:
    tile = max(bm, bn)
    padded = -(-max_len // tile) * tile  # lengths with the same tile count share one cached layout
    return build_layout(spec, padded, n_heads, bm, bn, device)


def _fwd(q, k, v, spec, scale, cu, n_seq, max_len, cfg):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    lay = _layout_for(spec, max_len, hq, cfg.fwd_m, cfg.fwd_n, q.device)
    o = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    p0, p1, p2, p3 = spec.scalar_params()
    qk_scale, cap, kind = _score_params(spec, scale, q.dtype)
    grid = (triton.cdiv(max_len, cfg.fwd_m), hq, b * n_seq)
    _fwd_kernel[grid](
        q, k, v, o, lse, cu, lay.head_param, lay.row_ptr, lay.row_idx, lay.row_nfull,
        qk_scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        n_seq, lay.n_qblocks, p0, p1, p2, p3, cap,
        GQA=hq // hkv, KIND=kind, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, DOT_PREC=_dot_prec(q.dtype),
        EVEN=_even(n_seq, max_len, t, cfg.fwd_m, cfg.fwd_n, cfg),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return o, lse


def _score_params(spec: LayoutSpec, scale: float, dtype: torch.dtype) -> tuple[float, float, int]:
    """(qk_scale, CAP, KIND) of a launch: scores in log2 units, ``q.k * scale * log2(e)``; with a softcap
    ``c`` the kernel computes ``CAP * tanh(q.k * qk_scale)`` with ``qk_scale = scale / c`` and ``CAP = c *
    log2(e)``, the same capped score in log2 units."""
    kind = spec.code | (8 if spec.extra_window else 0) | (16 if spec.softcap else 0)
    if spec.softcap and dtype != torch.float32 and not interpret_mode():
        kind |= 32
    if spec.softcap:
        return scale / spec.softcap, spec.softcap * _LOG2E, kind
    return scale * _LOG2E, 0.0, kind


def _even(n_seq: int, max_len: int, t: int, bm: int, bn: int, cfg: KernelConfig) -> bool:
    """Whether every tile of a kernel with (bm, bn) tiles lies inside its sequence: one sequence over
    all ``t`` tokens, whose length both tile sizes divide (the layout is then built for exactly that
    length). The kernels then load and store without row masks (``_in_seq``), unless
    ``cfg.unmasked_even`` is off."""
    return (cfg.unmasked_even and n_seq == 1 and max_len == t
            and t % bm == 0 and t % bn == 0)


def _bwd(do, q, k, v, o, lse, dlse, spec, scale, cu, n_seq, max_len, cfg):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    block_d = max(16, triton.next_power_of_2(d))
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    if has_dlse:
        dlse = dlse.to(torch.float32).contiguous()
    pre_m = 64
    _bwd_preprocess_kernel[(triton.cdiv(t, pre_m), hq, b)](
        o, do, dlse if has_dlse else lse, delta, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1), t, hq,
        HAS_DLSE=has_dlse, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_m,
    )
    # Gradients in their inputs' memory layout: q/k/v reach attention as (B, H, T, D) views of the
    # projections' (B, T, H, D) outputs, and a contiguous (B, H, T, D) gradient would cost one copy
    # each (autograd's layout contract for leaves, the projection's reshape otherwise): at 8K, 3 copies
    # took 0.26 ms of a 1.3 ms streaming forward + backward on the H200.
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    p0, p1, p2, p3 = spec.scalar_params()
    qk_scale, cap, kind = _score_params(spec, scale, q.dtype)
    common = dict(GQA=hq // hkv, KIND=kind, HEAD_DIM=d, BLOCK_D=block_d, DOT_PREC=_dot_prec(q.dtype))
    dq_mode = _dq_mode(cfg)
    if dq_mode == 0:
        dq = torch.empty_like(q)
        dq_acc = dq  # placeholder, never read with DQ_MODE 0
        lay = _layout_for(spec, max_len, hq, cfg.fwd_m, cfg.fwd_n, q.device)
        _bwd_dq_kernel[(triton.cdiv(max_len, cfg.fwd_m), hq, b * n_seq)](
            q, k, v, do, dq, lse, delta, cu, lay.head_param, lay.row_ptr, lay.row_idx, lay.row_nfull,
            qk_scale, scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), lse.stride(0), lse.stride(1), n_seq, lay.n_qblocks, p0, p1, p2, p3, cap,
            BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
            EVEN=_even(n_seq, max_len, t, cfg.fwd_m, cfg.fwd_n, cfg), **common,
        )
    else:  # fp32 rows (batch, head, token) x BLOCK_D, filled by the dK/dV pass
        dq = torch.zeros((b * hq * t, block_d), dtype=torch.float32, device=q.device)
        dq_acc = dq
        if dq_mode == 2:
            from triton.tools.tensor_descriptor import TensorDescriptor

            dq_acc = TensorDescriptor.from_tensor(dq, [cfg.bwd_m, block_d])
    common.update(DQ_MODE=dq_mode, EVEN=_even(n_seq, max_len, t, cfg.bwd_m, cfg.bwd_n, cfg))
    lay = _layout_for(spec, max_len, hq, cfg.bwd_m, cfg.bwd_n, q.device)
    plan = _column_split_plan(lay, hkv, cfg.col_split, q.device) if cfg.col_split > 0 else None
    n_bs = b * n_seq
    part_k = part_v = tile_slot = dk  # placeholders, never read without a plan
    if plan is not None:
        part_k = torch.empty(plan.n_slots * n_bs * cfg.bwd_n * block_d, dtype=torch.float32, device=q.device)
        part_v = torch.empty_like(part_k)
        tile_slot = plan.tile_slot
    _bwd_dkdv_kernel[(triton.cdiv(max_len, cfg.bwd_n), hkv, n_bs)](
        q, k, v, do, dk, dv, lse, delta, dq_acc, cu, lay.head_param, lay.col_ptr, lay.col_idx, lay.col_nfull,
        tile_slot, part_k, part_v, qk_scale, scale, t, hq, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), n_seq, lay.n_kblocks, p0, p1, p2, p3, cap, cfg.col_split, n_bs,
        BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
        HAS_SPLIT=plan is not None, **common,
    )
    if plan is not None:
        if plan.items.shape[0]:
            _bwd_dkdv_items_kernel[(plan.items.shape[0], n_bs)](
                q, k, v, do, lse, delta, dq_acc, cu, lay.head_param, lay.col_ptr, lay.col_idx, lay.col_nfull,
                plan.items, part_k, part_v, qk_scale, t, hq, q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                lse.stride(0), lse.stride(1), n_seq, lay.n_kblocks, p0, p1, p2, p3, cap, n_bs,
                BLOCK_M=cfg.bwd_m, BLOCK_N=cfg.bwd_n, num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages, **common,
            )
        _bwd_dkdv_reduce_kernel[(plan.red_tile.shape[0], n_bs)](
            dk, dv, cu, plan.red_tile, plan.red_ptr, plan.red_slot, part_k, part_v, scale,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            n_seq, lay.n_kblocks, n_bs, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=cfg.bwd_n, num_warps=4,
        )
    if dq_mode != 0:  # scale, cast and lay out the fp32 sums in one pass
        dq = torch.mul(dq.view(b, hq, t, block_d)[..., :d], scale, out=torch.empty_like(q))
    return dq, dk, dv


def _dq_mode(cfg: KernelConfig) -> int:
    """DQ_MODE of ``cfg.dq_path``: 0 (own kernel) whenever torch asks for deterministic algorithms.
    The interpreter has no TMA reduce-add, so there "tma" runs the element atomics: the same tile
    math, which the CPU tests check; the TMA store itself is checked by the GPU tests."""
    if torch.are_deterministic_algorithms_enabled():
        return 0
    mode = DQ_PATHS[cfg.dq_path]
    return 1 if mode == 2 and interpret_mode() else mode


def _ensure_last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _interp_upcast(*xs):
    # Triton 3.9's interpreter computes bf16 tl.dot wrongly (garbage of order 1e10 on a 16x16
    # product; fp16 and fp32 are right), so under TRITON_INTERPRET=1 bf16 runs as fp32 and the result
    # is rounded back to bf16. The bf16 path itself is checked by the GPU tests.
    if interpret_mode() and xs[0].dtype == torch.bfloat16:
        return tuple(x.float() for x in xs)
    return xs


class BlockSparseAttentionFunction(torch.autograd.Function):
    """out (B, T, Hq, D), lse (B, Hq, T) = attention of q (B, Hq, T, D), k/v (B, Hkv, T, D) over a
    layout. Use through ``headwise.kernels.sparse_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, spec, scale, cu_seqlens, max_seqlen, config):
        q, k, v = (_ensure_last_dim_contiguous(x) for x in (q, k, v))
        b, hq, t, d = q.shape
        cu, n_seq, max_len = _seq_info(t, cu_seqlens, q.device, max_seqlen)
        spec = spec.resolve(max_len)
        cfg = config or pick_config(d, spec, q.device)
        o, lse = _fwd(*_interp_upcast(q, k, v), spec, scale, cu, n_seq, max_len, cfg)
        o = o.to(q.dtype)
        ctx.set_materialize_grads(False)  # an unused lse output then gives dlse=None, not zeros
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.meta = (spec, scale, n_seq, max_len, cfg)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu = ctx.saved_tensors
        spec, scale, n_seq, max_len, cfg = ctx.meta
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _bwd(*_interp_upcast(do, q, k, v, o), lse, dlse, spec, scale, cu, n_seq, max_len, cfg)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def sparse_attention_triton(q, k, v, spec: LayoutSpec, scale: Optional[float] = None,
                           cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                           config: Optional[KernelConfig] = None):
    """Triton path of ``sparse_attention``: returns (out (B, T, Hq, D), lse (B, Hq, T) fp32)."""
    check_attention_inputs(q, k, v, cu_seqlens, kernel=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return BlockSparseAttentionFunction.apply(q, k, v, spec, scale, cu_seqlens, max_seqlen, config)
