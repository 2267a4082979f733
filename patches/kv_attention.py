"""The attention function of the evicting KV caches (H2O, streaming, DuoAttention), `headwise_kv`.

Registered with transformers' `AttentionInterface` and, paired, `AttentionMaskInterface` (the SDPA
boolean mask, so prompt padding reaches us) under the neutral name `headwise_kv`. When the module's
layer has a headwise cache step pending (see `headwise.kv_cache.bind_cache`), the cache layer runs
attention over what it keeps: per head group, with its own kept-token mask, and, for H2O, the column
sums of the attention probabilities computed alongside the output. Otherwise (training, a forward
without cache, another cache) it is plain SDPA.

With `FUSED_DECODE` on (the default; `HEADWISE_FUSED_DECODE=0` turns it off), a decode step (one query
token, T == 1) on CUDA runs the fused Triton kernel `headwise.kernels.decode_attention` (K and V read
once, split over the keys, the column sums from stored logits); CPU runs and prefill take the torch path.

The column sums never need a T x T matrix: queries go in chunks, each chunk against all keys, so
the row softmax is exact and the column sums add up chunk by chunk. They are summed over the query
heads of each GQA group and over the chunk's queries; padding queries contribute nothing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ATTENTION_NAME = "headwise_kv"  # no flash/sdpa/flex_attention in the name: transformers special-cases those
# Elements of fp32 logits per query chunk in the column-sum path (256 MiB): bounds prefill memory at long T.
COLSUM_CHUNK_ELEMENTS = 1 << 26
# Decode (T == 1, after the prompt) on CUDA, or anywhere under TRITON_INTERPRET=1: the fused Triton kernel
# `headwise.kernels.decode_attention` (reads K and V once, split-K, column sums for H2O) instead of the
# torch chain below. On by default: on an H200 it took a CUDA-graph decode step of a Llama-3-8B shape at
# 32K from 10.3 (torch chain) to 8.6 ms (BENCHMARKS.md); HEADWISE_FUSED_DECODE=0 turns it off.
FUSED_DECODE = os.environ.get("HEADWISE_FUSED_DECODE", "1") == "1"

_registered = False


def register() -> str:
    """Register `headwise_kv` (attention + mask function); idempotent. Returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, headwise_kv_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True
    return ATTENTION_NAME


def headwise_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from headwise.kv_cache import bound_layer

    layer = bound_layer(module)
    if layer is None or not layer.pending:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return layer.attend(query, attention_mask, scaling, kwargs.get("position_ids")), None


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    key_valid: torch.Tensor | None,
    causal_tail: bool,
    prompt_mask: torch.Tensor | None = None,
    need_colsums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of grouped queries over one head group's kept keys.

    q (B, H, G, T, D): the G query heads of each of the H KV heads; k, v (B, H, L, D).
    key_valid (B, H, L) bool: kept slots that hold real tokens (None: all).
    causal_tail: the T queries are the last T slots of k (causal among them); else every valid slot
    is visible (a static decode step, T == 1).
    prompt_mask (B, 1, T, L) bool: transformers' mask of the first forward (prompt padding); when
    given it replaces key_valid/causal_tail (None with causal_tail: plain causal).
    Returns out (B, H, G, T, D) and, with need_colsums, the column sums (B, H, L) in fp32.
    T == 1 without prompt_mask on CUDA (or under TRITON_INTERPRET=1) runs the fused Triton kernel
    (`headwise.kernels.decode_attention`; switch: FUSED_DECODE); everything else the torch code below.
    """
    B, H, G, T, D = q.shape
    L = k.shape[-2]
    if T == 1 and prompt_mask is None and _fused_decode(q):
        # One query token: every slot is in its past (causal_tail changes nothing), so the kept-slot
        # mask alone decides; same semantics as the matmul path below, in one fused kernel chain.
        from headwise.kernels.decode_attention import decode_attention_op

        out, colsums = decode_attention_op(q[:, :, :, 0], k, v, key_valid, scaling, need_colsums)
        return out.unsqueeze(3), (colsums if need_colsums else None)
    if not need_colsums and (prompt_mask is not None or (key_valid is None and causal_tail)):
        return _sdpa(q, k, v, scaling, causal_tail, prompt_mask), None
    # Matmul path, queries folded into rows (B, H, G*c, D) so K and V are read once per KV head, never
    # repeated over the group.
    chunk = max(1, min(T, COLSUM_CHUNK_ELEMENTS // max(1, B * H * G * L)))
    outs = []
    colsums = torch.zeros(B, H, L, dtype=torch.float32, device=q.device) if need_colsums else None
    kt = k.transpose(-1, -2)
    for start in range(0, T, chunk):
        qc = q[:, :, :, start : start + chunk]
        c = qc.shape[3]
        qc = qc.reshape(B, H, G * c, D)
        if T > 1:  # prefill: exact fp32 logits (the ranking of heavy hitters depends on them)
            logits = torch.matmul(qc.float(), kt.float())
        else:  # decode: memory-bound, read K once in its dtype (fp32 accumulation inside the GEMM)
            logits = torch.matmul(qc, kt).float()
        logits = (logits * scaling).view(B, H, G, c, L)
        allowed = _allowed(B, H, c, L, start, T, key_valid, causal_tail, prompt_mask, q.device)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # fully masked rows (padding queries): 0
        outs.append(torch.matmul(probs.to(v.dtype).view(B, H, G * c, L), v).view(B, H, G, c, D))
        if need_colsums:
            colsums += probs.sum(dim=(2, 3))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    return out, colsums


def _fused_decode(q: torch.Tensor) -> bool:
    """Whether a T == 1 step takes the fused Triton kernel: CUDA tensors, or the interpreter on CPU (the
    kernel is one opaque operator, `headwise::decode_attention`, so this holds under torch.compile too)."""
    if not FUSED_DECODE:
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _allowed(B, H, c, L, start, T, key_valid, causal_tail, prompt_mask, device):
    """Boolean (B, H or 1, 1, c, L) mask of the keys each query of the chunk may see (None: all)."""
    if prompt_mask is not None:
        return prompt_mask[:, :, start : start + c, :].unsqueeze(2).to(torch.bool)  # (B, 1, 1, c, L)
    allowed = None
    if causal_tail and (T > 1 or key_valid is None):
        qpos = torch.arange(start, start + c, device=device) + (L - T)
        allowed = (torch.arange(L, device=device)[None, :] <= qpos[:, None])[None, None, None]  # (1,1,1,c,L)
    if key_valid is not None:
        kv = key_valid[:, :, None, None, :]
        allowed = kv if allowed is None else (allowed & kv)
    return allowed


def _sdpa(q, k, v, scaling, causal_tail, prompt_mask):
    """SDPA (no column sums): plain causal prefill, or the first forward's padding mask."""
    B, H, G, T, D = q.shape
    qf = q.reshape(B, H * G, T, D)
    if prompt_mask is not None:
        mask = prompt_mask.to(torch.bool)
        # padding query rows see nothing; let them see everything so softmax stays finite (their output is unused)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scaling, enable_gqa=G > 1)
    else:
        out = F.scaled_dot_product_attention(qf, k, v, is_causal=causal_tail and T > 1, scale=scaling, enable_gqa=G > 1)
    return out.view(B, H, G, T, D)
