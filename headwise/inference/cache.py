"""KV caches built from a KV policy: one `HeadwiseLayer` per model layer, inside a transformers `Cache`.

    cache = make_cache(model, {"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1})
    model.generate(**inputs, past_key_values=cache)

`make_cache` switches the model's attention to `headwise_kv` (our attention function,
`headwise.inference.attention`) and binds the cache to the model's attention modules, so the
attention function finds the layer's store via `module.layer_idx` and can hand it the column sums.
The transformers contract (5.17 to 5.24): layers subclass `DynamicLayer`, `update` takes
`*args, **kwargs` (5.17 passes nothing, 5.24 `kwargs=`), `get_seq_length` is the cumulative token
count (so positions keep growing after eviction) and `get_mask_sizes(q)` is `(kept + q, 0)`.
After the prompt, the attention function builds the mask from each store's kept-token mask and
ignores transformers' mask (whose padding columns no longer line up with per-row kept sets).

A layer holds one or more head groups, each a store over a subset of the KV heads: one group for
`streaming` and `h2o`; for `duo` a retrieval group (all tokens, or H2O) and a streaming group, held
as separate, genuinely smaller tensors.

Batches: any batch size, left padding in the prompt (the first forward) supported: padding slots
are marked invalid and evicted first; every row and head has its own kept set. Tokens after the
prompt must not be padding (true for `generate`). Beam search and `num_return_sequences > 1` are not
supported (they reorder caches).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from headwise.errors import HeadwiseError
from headwise.inference.attention import bind_cache, grouped_attention, register
from headwise.inference.config import parse_kv_policy
from headwise.inference.stores import DynamicStore, EvictionRule
from headwise.patches.model_attention import attention_facts, refuse_unsupported_attention


class HeadwiseLayer(DynamicLayer):
    """One model layer: head groups `[(kv_head_index or None for all heads, store), ...]`."""

    is_croppable = False
    is_compileable = False

    def __init__(self, groups: list[tuple[torch.Tensor | None, Any]], num_kv_heads: int, window: int | None = None):
        super().__init__()
        self.groups = groups
        self.num_kv_heads = num_kv_heads
        self.window = window  # the model's sliding window on this layer
        self.cumulative_length = 0
        self._prev_length = 0
        self.pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.groups = [(None if idx is None else idx.to(self.device), store) for idx, store in self.groups]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending:
            raise HeadwiseError(
                "a headwise KV cache was updated twice without attention in between: the model's attention "
                "implementation is not `headwise_kv` (build the cache with headwise.inference.cache.make_cache(model, policy))"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._prev_length = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        outs = [
            store.append(key_states if idx is None else key_states.index_select(1, idx),
                         value_states if idx is None else value_states.index_select(1, idx))
            for idx, store in self.groups
        ]
        self.pending = True
        return outs[0] if len(outs) == 1 else (key_states, value_states)

    def attend(self, query: torch.Tensor, attention_mask, scaling: float, position_ids, *,
               softcap: float | None = None, sinks: torch.Tensor | None = None,
               head_active: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of `query` (B, Hq, T, D) over every group's kept keys; (B, T, Hq, D). Ends the step.
        `softcap` and `sinks` (Hq,) are the model's own (Gemma-2's logit softcap, GPT-OSS's learned sinks).
        `head_active` (B, Hkv) bool: the KV heads whose output is used (MoH decode); others may come back as 0."""
        B, Hq, T, D = query.shape
        G = Hq // self.num_kv_heads
        qg = query.view(B, self.num_kv_heads, G, T, D)
        sinks_g = None if sinks is None else sinks.view(self.num_kv_heads, G)
        first = self._prev_length == 0
        prompt_mask = _bool_mask(attention_mask) if first else None
        valid_new, pos_new = self._new_tokens(prompt_mask, position_ids, B, T, query.device)
        out = None if len(self.groups) == 1 else query.new_empty(B, self.num_kv_heads, G, T, D)
        for idx, store in self.groups:
            qi = qg if idx is None else qg.index_select(1, idx)
            # Several new tokens after the prompt (chunked prefill) on a windowed layer: each query has its own
            # window edge. One token or the prompt need none: the stores invalidate what leaves the window after
            # each step, and the prompt's mask is transformers' sliding-window mask.
            window = None if first or T == 1 or self.window is None else (self.window, store.key_pos(pos_new), pos_new)
            o, colsums = grouped_attention(
                qi, store.keys, store.values, scaling=scaling,
                key_valid=None if first else store.key_valid(valid_new),
                causal_tail=True if first else store.causal_tail,
                prompt_mask=prompt_mask, need_colsums=store.needs_scores, window=window, softcap=softcap,
                sinks=None if sinks_g is None else (sinks_g if idx is None else sinks_g.index_select(0, idx)),
                head_active=None if head_active is None else (head_active if idx is None
                                                              else head_active.index_select(1, idx)),
            )
            store.finish(colsums, valid_new, pos_new)
            if out is None:
                out = o
            else:
                out.index_copy_(1, idx, o)
        self.pending = False
        return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)

    def _new_tokens(self, prompt_mask, position_ids, B, T, device):
        """Validity (B, T) and absolute positions (B, T) of this step's tokens."""
        if prompt_mask is not None:
            valid = prompt_mask[:, 0, -1, -T:].expand(B, T)  # the last prompt row sees every real token (left or right padding)
        else:
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
        if position_ids is not None:
            pos = position_ids.to(device=device, dtype=torch.long).expand(B, T)
        else:
            pos = (torch.arange(T, device=device) + self._prev_length).expand(B, T)
        return valid, pos

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        kept = max((len(store) for _, store in self.groups), default=0)
        return kept + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise HeadwiseError("a headwise KV cache is used once: build a new one with make_cache for the next prompt")

    def crop(self, tokens_to_remove: int) -> None:
        raise HeadwiseError("a headwise KV cache evicts tokens and cannot be cropped (assisted decoding is not supported)")

    def _unsupported(self, *args, **kwargs):
        raise HeadwiseError(
            "headwise KV caches do not support beam search or num_return_sequences > 1 (they reorder the cache); "
            "use greedy or sampling with one sequence per prompt"
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


class HeadwiseCache(Cache):
    """A transformers `Cache` of `HeadwiseLayer`s; pass it to `generate(past_key_values=...)`."""

    def __init__(self, layers: list[HeadwiseLayer], policy: Any = None):
        super().__init__(layers=layers)
        self.policy = policy

    def kept_positions(self, layer_idx: int, group: int = 0) -> list[list[list[int]]]:
        """Per row and KV head of the group, the absolute positions of the kept tokens."""
        return self.layers[layer_idx].groups[group][1].kept_positions()

    def kept_lengths(self) -> list[list[int]]:
        """Per layer, per group: the kept slots (the stored sequence length)."""
        return [[len(store) for _, store in layer.groups] for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values (all layers and groups)."""
        total = 0
        for layer in self.layers:
            for _, store in layer.groups:
                if store.keys is not None:
                    total += store.keys.numel() * store.keys.element_size() + store.values.numel() * store.values.element_size()
        return total


def _bool_mask(mask):
    """transformers' 4D mask of the first forward as a boolean `allowed` mask, or None."""
    if mask is None or not torch.is_tensor(mask) or mask.dim() != 4:
        return None
    return mask if mask.dtype == torch.bool else mask == 0


# ---- building a cache from a policy ----------------------------------------------------------------


def _rule(policy, window: int | None = None) -> EvictionRule:
    if policy is None or policy.type == "full":
        return EvictionRule("full", window=window)
    if policy.type == "streaming":
        return EvictionRule("streaming", sink=policy.sink, recent=policy.recent, recent_ratio=policy.recent_ratio,
                            window=window)
    if policy.type == "h2o":
        return EvictionRule("h2o", heavy=policy.heavy, recent=policy.recent, heavy_ratio=policy.heavy_ratio,
                            recent_ratio=policy.recent_ratio, window=window)
    raise HeadwiseError(f"kv_policy.type: {policy.type!r} has no eviction rule")


def text_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model) -> tuple[int, int]:
    """(layers, KV heads) of a causal LM."""
    config = text_config(model)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, n_kv


def build_layers(policy, num_layers: int, num_kv_heads: int,
                 windows: tuple[int | None, ...] | None = None) -> list[HeadwiseLayer]:
    """One `HeadwiseLayer` per model layer for a (validated) non-full policy; `windows`: the model's sliding window
    per layer (None: none anywhere), which every store of the layer intersects with its rule."""
    windows = windows or (None,) * num_layers
    if policy.type in ("full", "streaming", "h2o"):
        return [HeadwiseLayer([(None, DynamicStore(_rule(policy, w)))], num_kv_heads, w) for w in windows]
    if policy.type != "duo":
        raise HeadwiseError(f"kv_policy.type: {policy.type!r} does not use a headwise cache")
    mask = policy.retrieval_heads
    if len(mask) != num_layers or len(mask[0]) != num_kv_heads:
        raise HeadwiseError(
            f"kv_policy.retrieval_heads: {len(mask)} x {len(mask[0])} (layers x KV heads) does not match the model's "
            f"{num_layers} layers x {num_kv_heads} KV heads"
        )
    layers = []
    for row, window in zip(mask, windows):
        retrieval = [h for h, r in enumerate(row) if r]
        stream = [h for h, r in enumerate(row) if not r]
        groups = []
        for heads, rule in (
            (retrieval, lambda: _rule(policy.retrieval_policy, window)),
            (stream, lambda: EvictionRule("streaming", sink=policy.sink, recent=policy.recent, window=window)),
        ):
            if heads:
                idx = None if len(heads) == num_kv_heads else torch.tensor(heads, dtype=torch.long)
                groups.append((idx, DynamicStore(rule())))
        layers.append(HeadwiseLayer(groups, num_kv_heads, window))
    return layers


def use_headwise_attention(model) -> None:
    """Register `headwise_kv` and switch the model's attention to it (plain SDPA outside our caches)."""
    name = register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) == name:
        return
    try:
        base.set_attn_implementation(name)
    except Exception as e:  # older/other models: set it on the config directly
        if not hasattr(base.config, "_attn_implementation"):
            raise HeadwiseError(f"cannot switch {type(base).__name__} to the headwise_kv attention: {e}") from e
        base.config._attn_implementation = name


# What of a model's attention the caches compose with (keyword flags of AttentionFacts.unsupported): its sliding
# windows (every store keeps the intersection of its rule and the window), its logit softcap and learned sinks (the
# cache attention applies them); the projections are upstream of a cache.
CACHE_FEATURES = {"sliding_window": True, "softcap": True, "learned_sinks": True, "fused_projections": True}


def check_model_supported(model) -> None:
    """Refuse a model whose attention adds a rule the headwise caches and their attention do not implement
    (`CACHE_FEATURES` says which they do): they would keep or attend over other tokens than it does."""
    refuse_unsupported_attention(attention_facts(model.config, model), "kv_policy",
                                 "use kv_policy full (the model's own attention and cache)", **CACHE_FEATURES)


def check_config_supported(config, policy_type: str, way_out: str) -> None:
    """`check_model_supported` from the config alone, for a run that will export a `policy_type` policy: refused
    before any weights load or the run folder is touched (`full` runs on the model's own cache: always fine)."""
    if policy_type != "full":
        refuse_unsupported_attention(attention_facts(config), f"kv_policy {policy_type}", way_out, **CACHE_FEATURES)


def check_policy(model, policy) -> None:
    """Raise a HeadwiseError naming the field when `policy` cannot run on `model`."""
    check_model_supported(model)
    build_layers(policy, *model_shape(model), attention_facts(model.config, model).windows)


def make_cache(model, policy, *, always: bool = False) -> HeadwiseCache | None:
    """A fresh cache for one generation under `policy` (dict, string or policy model), bound to `model`.

    Returns None for `full` (transformers' `DynamicCache`, SDPA attention) unless `always`: then a
    headwise cache that keeps every token (what the static decoder starts from).
    """
    policy = parse_kv_policy(policy)
    if policy.type == "full" and not always:
        return None
    check_model_supported(model)
    n_layers, n_kv = model_shape(model)
    cache = HeadwiseCache(build_layers(policy, n_layers, n_kv, attention_facts(model.config, model).windows), policy)
    use_headwise_attention(model)
    return bind_cache(model, cache)
