"""The attention function of the evicting KV caches (H2O, streaming, DuoAttention), `headwise_kv`.

Registered with transformers' `AttentionInterface` and, paired, `AttentionMaskInterface` (the SDPA
boolean mask, so prompt padding reaches us) under the neutral name `headwise_kv`. When the module's
layer has a headwise cache step pending (see `headwise.inference.cache.bind_cache`), the cache layer runs
attention over what it keeps: per head group, with its own kept-token mask, and, for H2O, the column
sums of the attention probabilities computed alongside the output. Otherwise (training, a forward
without cache, another cache) it is plain SDPA.

With `FUSED_DECODE` on (the default; `HEADWISE_FUSED_DECODE=0` turns it off), a decode step (one query
token, T == 1) on CUDA runs the fused Triton kernel `headwise.kernels.decode_attention` (K and V read
once, split over the keys, the column sums from stored logits); CPU runs and prefill take the torch path.

The column sums never need a T x T matrix: queries go in blocks, each block against the keys it can
see (up to its last query under the causal mask), so the row softmax is exact, the column sums add up
block by block, and the work is that of causal attention. They are summed over the query heads of each
GQA group and over the block's queries; padding queries contribute nothing.

A MoH model (`headwise.patches.moh`: the module carries `headwise_moh`) keeps its router under a headwise cache:
the gates multiply each head's output, and at decode the fused kernel skips the KV heads that no chosen query head
of the token uses (with `kv_group` routing, the groups the router left out), so their K and V are never read.
Outside a cache such a module runs MoH's own attention.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from headwise.errors import HeadwiseError
from headwise.patches.moh import moh_attention, moh_head_gates

ATTENTION_NAME = "headwise_kv"  # no flash/sdpa/flex_attention in the name: transformers special-cases those
# Query positions per block of the torch path (column sums, masked prefill; see `_blocked_attention`). A
# block's fp32 logits are (B, H, G * block, keys): 256 queries of SmolLM2-135M (9 query heads) at 4K tokens
# are 36 MiB. Smaller blocks fit the caches better, larger ones launch fewer operators (on a busy CPU each
# operator waits for all its threads). COLSUM_BLOCK_ELEMENTS caps a block's logits (256 MiB) at long contexts.
COLSUM_BLOCK_QUERIES = 256
COLSUM_BLOCK_ELEMENTS = 1 << 26
# Decode (T == 1, after the prompt) on CUDA, or anywhere under TRITON_INTERPRET=1: the fused Triton kernel
# `headwise.kernels.decode_attention` (reads K and V once, split-K, column sums for H2O) instead of the
# torch chain below. On by default: on an H200 it took a CUDA-graph decode step of a Llama-3-8B shape at
# 32K from 10.3 (torch chain) to 8.6 ms (docs/benchmarks.md, "Decode speed per KV policy"); HEADWISE_FUSED_DECODE=0 turns it off.
FUSED_DECODE = os.environ.get("HEADWISE_FUSED_DECODE", "1") == "1"

_registered = False
_BOUND_ATTR = "_headwise_kv_cache"  # attribute of an attention module: a weak reference to its cache


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


def bind_cache(model, cache: Any) -> Any:
    """Let the attention modules of `model` find `cache` (weakly referenced) by their `layer_idx`."""
    ref = weakref.ref(cache)
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            setattr(module, _BOUND_ATTR, ref)
    return cache


def bound_layer(module):
    """The headwise cache layer bound to an attention module, or None."""
    ref = getattr(module, _BOUND_ATTR, None)
    cache = ref() if ref is not None else None
    if cache is None:
        return None
    layer = cache.layers[module.layer_idx]
    return layer if getattr(layer, "pending", None) is not None else None


def headwise_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    moh = getattr(module, "headwise_moh", None) is not None
    layer = bound_layer(module)
    if layer is None or not layer.pending:
        if moh:
            return moh_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return _without_cache(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    gates = head_active = None
    if moh:
        B, Hq, T, _ = query.shape
        gates, chosen_heads = moh_head_gates(module, query, key.shape[1])
        if T == 1:  # (B, Hkv): a KV head is needed when any query head of its group is chosen
            head_active = chosen_heads[:, 0].view(B, key.shape[1], Hq // key.shape[1]).any(dim=-1)
    # Gemma-2's logit softcap and GPT-OSS's learned sinks, as the model hands them to its attention function
    out = layer.attend(query, attention_mask, scaling, kwargs.get("position_ids"), softcap=kwargs.get("softcap"),
                       sinks=kwargs.get("s_aux"), head_active=head_active)
    return (out if gates is None else out * gates.to(out.dtype).unsqueeze(-1)), None


def _without_cache(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """A forward outside a headwise cache: SDPA, or, for a softcap or learned sinks (which SDPA cannot apply), the
    family's own eager attention from its modeling module (every transformers family defines one)."""
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    import importlib  # the family's modeling module, known only from the module's class

    eager = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise HeadwiseError(f"{type(module).__name__} has a logit softcap or learned sinks but no eager attention "
                            "function to run them outside a headwise cache")
    if attention_mask is None and query.shape[2] > 1:
        # the SDPA mask function skips a plain causal mask (SDPA then runs is_causal); eager needs it spelled out
        t, s = query.shape[2], key.shape[2]
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # our mask function's; eager adds it
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill_(~attention_mask, float("-inf"))
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


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
    block_queries: int | None = None,
    window: tuple[int, torch.Tensor, torch.Tensor] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    head_active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of grouped queries over one head group's kept keys.

    q (B, H, G, T, D): the G query heads of each of the H KV heads; k, v (B, H, L, D).
    key_valid (B, H, L) bool: kept slots that hold real tokens (None: all).
    causal_tail: the T queries are the last T slots of k (causal among them); else every valid slot
    is visible (a static decode step, T == 1).
    prompt_mask (B, 1, T, L) bool: transformers' mask of the first forward (prompt padding); when
    given it replaces key_valid/causal_tail (None with causal_tail: plain causal).
    block_queries: query positions per block of the torch path (None: COLSUM_BLOCK_QUERIES, fewer where
    a block's logits would pass COLSUM_BLOCK_ELEMENTS); any block size gives the same result.
    window: `(w, key_pos (B, H, L), query_pos (B, T))` for several queries on a sliding-window layer: query `q`
    sees only slots at positions `k > q - w` (the model's window, per query).
    softcap: scores `s` become `softcap * tanh(s / softcap)` before the mask and softmax (Gemma-2).
    sinks (H, G): learned sink logits of the group's query heads (GPT-OSS), one more softmax term without a value;
    the column sums stay those of the real keys. Both run on the torch path (neither SDPA nor the fused decode
    kernel applies them).
    head_active (B, H) bool: the KV heads whose output the caller uses (MoH decode gates the others to zero); the
    fused decode kernel reads no K or V of the others and gives them 0, the torch path computes them all.
    Returns out (B, H, G, T, D) and, with need_colsums, the column sums (B, H, L) in fp32.
    T == 1 without prompt_mask on CUDA (or under TRITON_INTERPRET=1) runs the fused Triton kernel
    (`headwise.kernels.decode_attention`; switch: FUSED_DECODE); everything else the torch code below.
    """
    B, H, G, T, D = q.shape
    L = k.shape[-2]
    plain = softcap is None and sinks is None
    if T == 1 and prompt_mask is None and plain and _fused_decode(q):
        # One query token: every slot is in its past (causal_tail changes nothing), so the kept-slot
        # mask alone decides; same semantics as the matmul path below, in one fused kernel chain.
        from headwise.kernels.decode_attention import decode_attention_op

        out, colsums = decode_attention_op(q[:, :, :, 0], k, v, key_valid, scaling, need_colsums,
                                           None if need_colsums else head_active)
        return out.unsqueeze(3), (colsums if need_colsums else None)
    if not need_colsums and window is None and plain and (prompt_mask is not None or (key_valid is None and causal_tail)):
        return _sdpa(q, k, v, scaling, causal_tail, prompt_mask), None
    if block_queries is None:
        block_queries = max(1, min(COLSUM_BLOCK_QUERIES, COLSUM_BLOCK_ELEMENTS // max(1, B * H * G * L)))
    return _blocked_attention(q, k, v, scaling, key_valid, causal_tail, prompt_mask, need_colsums, block_queries,
                              window, softcap, sinks)


def _blocked_attention(q, k, v, scaling, key_valid, causal_tail, prompt_mask, need_colsums, block_queries,
                       window=None, softcap=None, sinks=None):
    """The torch path of `grouped_attention`: queries in blocks of `block_queries` positions, each block
    against the keys it can see, an exact row softmax, the output and the column sums added block by block.

    Memory is O(block x L) and the work that of causal attention: under `causal_tail` a block stops at the
    key of its last query (the keys after it are masked for every query of the block). Queries are laid
    out (B * H, T * G, D), a query's G heads in adjacent rows, so that a block is one contiguous row range:
    K and V are read once per KV head, never repeated over the group, and the output GEMM writes straight
    into its rows of the result. Few operators per block, since on a busy CPU each one waits for all its
    threads.
    """
    B, H, G, T, D = q.shape
    L = k.shape[-2]
    acc = torch.promote_types(q.dtype, torch.float32)  # logits in fp32, or the model's dtype above it
    if T > 1:  # prefill: exact fp32 logits (the ranking of heavy hitters depends on them), scaled once
        rows_q = (q.to(acc) * scaling).transpose(2, 3).reshape(B * H, T * G, D)
        kt = k.to(acc).reshape(B * H, L, D).transpose(1, 2)
    else:  # decode: memory-bound, read K once in its dtype (fp32 accumulation inside the GEMM)
        rows_q = q.reshape(B * H, G, D)
        kt = k.reshape(B * H, L, D).transpose(1, 2)
    v_rows = v.reshape(B * H, L, D)
    offset = L - T  # slot of the first query under causal_tail
    future = None  # (block, 1, block): key j of the block is after query i
    if causal_tail and prompt_mask is None and T > 1:
        n = min(block_queries, T)
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)[:, None]
    invalid = ~key_valid[:, :, None, None, :] if key_valid is not None and prompt_mask is None else None
    # Rows without a visible key (padding queries, emptied rows) give NaN from the softmax; they become 0.
    may_empty_rows = prompt_mask is not None or key_valid is not None
    out = v.new_empty(B * H, T * G, D)
    colsums = torch.zeros(B, H, L, dtype=torch.float32, device=q.device) if need_colsums else None
    for start in range(0, T, block_queries):
        stop = min(T, start + block_queries)
        c = stop - start
        keys = offset + stop if causal_tail else L
        logits = torch.bmm(rows_q[:, start * G : stop * G], kt[..., :keys])
        if T == 1:
            logits = logits.to(acc).mul_(scaling)
        if softcap is not None:
            logits = torch.tanh(logits / softcap).mul_(softcap)
        blk = logits.view(B, H, c, G, keys)
        if prompt_mask is not None:  # transformers' causal mask of the first forward: nothing past `keys`
            blk.masked_fill_(~prompt_mask[:, :, start:stop, None, :keys].to(torch.bool), float("-inf"))
        else:
            if future is not None:  # the block's own keys: query i sees keys up to its own slot
                blk[..., keys - c :].masked_fill_(future[:c, :, :c], float("-inf"))
            if invalid is not None:
                blk.masked_fill_(invalid[..., :keys], float("-inf"))
            if window is not None:  # (B, H, c, 1, keys): slots at or before each query's window edge
                w, key_pos, query_pos = window
                edge = query_pos[:, None, start:stop, None, None] - w
                blk.masked_fill_(key_pos[:, :, None, None, :keys] <= edge, float("-inf"))
        if sinks is None:
            probs = torch.softmax(logits, dim=-1)
        else:  # one more logit per row (query t, head g: rows t * G + g), dropped after the softmax
            sink_col = sinks.to(logits.dtype)[None, :, None, :].expand(B, H, c, G).reshape(B * H, c * G, 1)
            probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :keys]
        if may_empty_rows:
            probs.nan_to_num_(nan=0.0)
        torch.bmm(probs.to(v.dtype), v_rows[:, :keys], out=out[:, start * G : stop * G])
        if colsums is not None:
            colsums[..., :keys].add_(probs.view(B, H, c * G, keys).sum(dim=2))
    return out.view(B, H, T, G, D).transpose(2, 3), colsums


def _fused_decode(q: torch.Tensor) -> bool:
    """Whether a T == 1 step takes the fused Triton kernel: CUDA tensors, or the interpreter on CPU (the
    kernel is one opaque operator, `headwise::decode_attention`, so this holds under torch.compile too)."""
    if not FUSED_DECODE:
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


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
