"""Prompt prefill into a headwise KV cache: in chunks (`duo` policies) or whole, with the positions and
cache keyword `generate` would use."""

from __future__ import annotations

import inspect

import torch

# Prompt tokens per prefill forward for `duo` policies (`LoadedModel.generate`): streaming heads hold at most
# sink + recent + DUO_PREFILL_CHUNK tokens during prefill, and a streaming query sees at most recent + chunk
# recent tokens (training: recent). 256 keeps that window within 2x DuoAttention's recent of 256; on a GPU at
# long context a larger chunk (e.g. 4096) trades that fidelity for fewer forwards: pass `prefill_chunk=`.
DUO_PREFILL_CHUNK = 256


def cache_kwarg(model) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (5.17): the forward's name for the cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left-)padded prompt, as `generate` computes them (padding counts nothing)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


@torch.inference_mode()
def prefill_in_chunks(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int) -> int:
    """Run the prompt through `model` into `cache`, `chunk` tokens per forward, all but its last chunk.

    Chunks start at the prompt's beginning; the first one also takes all left padding (a headwise cache
    only accepts padding in its first forward). The last chunk (1 to `chunk` tokens) is left to `generate`,
    which runs it as one forward and continues from there, so a prompt that fits in one chunk is prefilled
    exactly as without chunking. Returns the number of tokens prefilled here.
    """
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    T = input_ids.shape[1]
    n_pad = int((attention_mask == 0).sum(dim=1).max())
    bounds = [min(T, n_pad + chunk)]
    while bounds[-1] < T:
        bounds.append(min(T, bounds[-1] + chunk))
    cache_kw = cache_kwarg(model)
    position_ids = prompt_positions(attention_mask)  # as generate computes them
    start = 0
    for stop in bounds[:-1]:
        model(input_ids=input_ids[:, start:stop], attention_mask=attention_mask[:, :stop],
              position_ids=position_ids[:, start:stop], use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        start = stop
    return start

