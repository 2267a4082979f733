"""H2O with real eviction: exactness at full budget, kept sets against an independent eager reference,
fixed size while generating, GQA models, left-padded batches."""

from __future__ import annotations

import pytest
import torch

from headwise.kv_cache import make_cache

from inference_helpers import random_ids, tiny_model

# ---- an independent H2O: eager attention weights + per-head masking (the original "simulation") -----

_REF = "test_h2o_masked_eager"


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def masked_eager(module, query, key, value, attention_mask, **kwargs):
        extra = getattr(module, "_ref_evicted", None)  # (B, Hq, Tk) bool: True = evicted for this head
        if extra is not None:
            new = key.shape[-2] - extra.shape[-1]  # this forward's own tokens are never evicted
            extra = torch.cat([extra, torch.zeros(*extra.shape[:2], new, dtype=torch.bool)], dim=-1)
            add = torch.zeros(extra.shape, dtype=query.dtype).masked_fill(extra, float("-inf"))[:, :, None, :]
            attention_mask = add if attention_mask is None else attention_mask + add
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_REF, masked_eager)
    AttentionMaskInterface.register(_REF, eager_mask)


def reference_h2o(model, ids: torch.Tensor, heavy: int, recent: int, steps: int):
    """Greedy H2O by masking a full cache; scores from HF's eager attention weights (`output_attentions`).

    Returns the tokens and, per step (prefill first), per layer, the kept positions per KV head (batch 1).
    """
    from transformers import DynamicCache

    _register_reference()
    model.set_attn_implementation(_REF)
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    groups = attn[0].num_key_value_groups
    for m in attn:
        m._ref_evicted = None
    cache = DynamicCache(config=model.config)
    scores = [None] * len(attn)
    kept_log, tokens = [], []
    x = ids
    try:
        for step in range(steps):
            out = model(input_ids=x, past_key_values=cache, use_cache=True, output_attentions=True)
            kept_step = []
            for i, (m, w) in enumerate(zip(attn, out.attentions)):
                col = w.float().sum(dim=2)  # (B, Hq, Tk): column sums over the queries of this forward
                col = col.view(col.shape[0], -1, groups, col.shape[-1]).sum(dim=2)  # GQA: sum over the group
                s = col if scores[i] is None else torch.cat([scores[i], col.new_zeros(*col.shape[:2], col.shape[-1] - scores[i].shape[-1])], -1) + col
                T = s.shape[-1]
                evicted = torch.zeros_like(s, dtype=torch.bool) if m._ref_evicted is None else torch.cat(
                    [m._ref_evicted[:, ::groups], torch.zeros(*s.shape[:2], T - m._ref_evicted.shape[-1], dtype=torch.bool)], -1)
                cand = s.masked_fill(evicted, float("-inf"))
                cand[..., T - recent:] = float("-inf")  # the recent window is always kept
                if T > heavy + recent:
                    top = cand[..., : T - recent].topk(heavy, dim=-1).indices
                    keep = torch.zeros_like(evicted)
                    keep.scatter_(-1, top, True)
                    keep[..., T - recent:] = True
                    evicted = ~keep
                s = s.masked_fill(evicted, 0.0)
                scores[i] = s
                m._ref_evicted = evicted.repeat_interleave(groups, dim=1)
                kept_step.append([sorted((~evicted[0, h]).nonzero().flatten().tolist()) for h in range(evicted.shape[1])])
            kept_log.append(kept_step)
            x = out.logits[:, -1:].argmax(-1)
            tokens.append(x[0, 0].item())
    finally:
        model.set_attn_implementation("sdpa")
        for m in attn:
            m._ref_evicted = None
    return tokens, kept_log


def run_headwise(model, ids, policy, steps):
    """Our cache, stepping the model by hand; returns tokens, kept positions per step and kept sizes."""
    cache = make_cache(model, policy)
    kept_log, sizes, tokens = [], [], []
    x = ids
    with torch.inference_mode():
        for _ in range(steps):
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
            kept_log.append([[heads for heads in cache.kept_positions(i)[0]] for i in range(len(cache.layers))])
            sizes.append(cache.kept_lengths())
            x = out.logits[:, -1:].argmax(-1)
            tokens.append(x[0, 0].item())
    return tokens, kept_log, sizes, cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_budget_covering_the_sequence_generates_exactly_full(arch):
    model = tiny_model(arch)
    ids = random_ids(1, 24)
    full = model.generate(ids, max_new_tokens=16, do_sample=False)
    for policy in ({"type": "h2o", "heavy": 20, "recent": 20}, {"type": "h2o", "heavy_ratio": 1.0, "recent_ratio": 1.0}):
        out = model.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=make_cache(model, policy))
        assert torch.equal(out, full), policy


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kept_set_is_recent_plus_top_accumulated_scores_from_eager_weights(arch):
    model = tiny_model(arch)
    ids = random_ids(1, 32, seed=3)
    heavy, recent, steps = 6, 4, 12
    ref_tokens, ref_kept = reference_h2o(model, ids, heavy, recent, steps)
    tokens, kept, sizes, _ = run_headwise(model, ids, {"type": "h2o", "heavy": heavy, "recent": recent}, steps)
    assert kept[0] == ref_kept[0]  # after the prompt: recent 4 + top-6 of the prompt's column sums
    assert kept == ref_kept  # and after every decode step (scores accumulated over generated tokens)
    assert tokens == ref_tokens
    assert all(n == [heavy + recent] for step in sizes for n in step)


def test_scores_are_column_sums_summed_over_the_gqa_group(llama):
    """The accumulated scores equal the eager attention weights summed over queries and each group's heads."""
    ids = random_ids(1, 20, seed=5)
    with torch.inference_mode():
        cache = make_cache(llama, {"type": "h2o", "heavy": 64, "recent": 64})
        llama(input_ids=ids, past_key_values=cache, use_cache=True)
        llama.set_attn_implementation("eager")
        try:
            w = llama(input_ids=ids, output_attentions=True).attentions
        finally:
            llama.set_attn_implementation("sdpa")
    for i, wl in enumerate(w):
        expected = wl.sum(dim=2).view(1, 2, 2, 20).sum(dim=2)
        got = cache.layers[i].groups[0][1].score
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cache_stays_at_the_budget_while_generating(llama):
    ids = random_ids(1, 40)
    policy = {"type": "h2o", "heavy_ratio": 0.2, "recent_ratio": 0.1}  # 8 + 4 slots for a 40-token prompt
    tokens, kept, sizes, cache = run_headwise(llama, ids, policy, steps=15)
    assert all(step == [[12], [12]] for step in sizes)
    assert cache.get_seq_length() == 40 + 14  # cumulative: positions keep growing after eviction
    last = kept[-1][0][0]
    assert last[-4:] == list(range(50, 54))  # the recent window ends at the newest position
    assert cache.kv_bytes() == 2 * 2 * (1 * 2 * 12 * 16) * 4  # layers x (K, V) x (B, H, L, D) x fp32


@pytest.mark.parametrize("policy", [
    {"type": "h2o", "heavy": 6, "recent": 5},
    {"type": "streaming", "sink": 2, "recent": 6},
    {"type": "duo", "retrieval_heads": [[1, 0], [0, 1]], "sink": 2, "recent": 6},
    {"type": "duo", "retrieval_heads": [[1, 0], [1, 1]], "sink": 2, "recent": 6,
     "retrieval_policy": {"type": "h2o", "heavy": 5, "recent": 4}},
])
def test_left_padded_batch_matches_each_prompt_alone(llama, policy):
    """Per-row kept sets: padding slots are invalid and evicted first, positions ignore padding."""
    a, b = random_ids(1, 30, seed=7), random_ids(1, 21, seed=8)
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 9:], mask[1, 9:] = b[0], 1
    batch = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           past_key_values=make_cache(llama, policy))[:, 30:]
    for row, single in enumerate((a, b)):
        alone = llama.generate(single, max_new_tokens=10, do_sample=False, past_key_values=make_cache(llama, policy))
        assert batch[row].tolist() == alone[0, single.shape[1]:].tolist(), row
