"""H2O with real eviction: exactness at full budget, kept sets against an independent eager reference,
fixed size while generating, GQA models, left-padded batches."""

from __future__ import annotations

import sys

import pytest
import torch

from headwise.inference.cache import make_cache

from inference_helpers import random_ids, tiny_model

# ---- an independent H2O: eager attention weights + per-head masking (the original "simulation") -----

_REF = "test_h2o_masked_eager"


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def masked_eager(module, query, key, value, attention_mask, **kwargs):
        """The family's own eager attention (Gemma-2's applies its logit softcap, GPT-OSS's its learned sinks and
        returns the probabilities of the real keys only, the sink's dropped) under the evictions and the window."""
        eager_attention_forward = sys.modules[type(module).__module__].eager_attention_forward
        extra = getattr(module, "_ref_evicted", None)  # (B, Hq, Tk) bool: True = evicted for this head
        if extra is not None:
            new = key.shape[-2] - extra.shape[-1]  # this forward's own tokens are never evicted
            extra = torch.cat([extra, torch.zeros(*extra.shape[:2], new, dtype=torch.bool)], dim=-1)
            add = torch.zeros(extra.shape, dtype=query.dtype).masked_fill(extra, float("-inf"))[:, :, None, :]
            attention_mask = add if attention_mask is None else attention_mask + add
        window = getattr(module, "_ref_window", None)  # the layer's sliding window: a query sees q - k < window
        if window is not None:  # the cache holds every key, at its position; the queries are the newest tokens
            k_pos = torch.arange(key.shape[-2])
            q_pos = k_pos[key.shape[-2] - query.shape[-2]:]
            outside = q_pos.view(-1, 1) - k_pos.view(1, -1) >= window
            add = torch.zeros(outside.shape, dtype=query.dtype).masked_fill(outside, float("-inf"))
            attention_mask = add if attention_mask is None else attention_mask + add
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_REF, masked_eager)
    AttentionMaskInterface.register(_REF, eager_mask)


def reference_h2o(model, ids: torch.Tensor, heavy: int, recent: int, steps: int,
                  windows: tuple[int | None, ...] | None = None):
    """Greedy H2O by masking a full cache; scores from the family's own eager attention weights
    (`output_attentions`: with a softcap, capped scores; with learned sinks, the real keys' probabilities).

    `windows`: the model's sliding window per layer (None: none). On a windowed layer every query sees only
    `q - k < w`, and a key the next query cannot see is evicted at once: the heavy slots go to the highest
    accumulated scores among the keys still in the window.
    Returns the tokens and, per step (prefill first), per layer, the kept positions per KV head (batch 1) and the
    accumulated scores (1, H_kv, positions so far; an evicted position's is 0).
    """
    from transformers import DynamicCache

    _register_reference()
    own_implementation = model.config._attn_implementation
    model.set_attn_implementation(_REF)
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    groups = attn[0].num_key_value_groups
    windows = windows or (None,) * len(attn)
    for m in attn:
        m._ref_evicted = None
        m._ref_window = windows[m.layer_idx]
    cache = DynamicCache()  # every layer keeps every key (a sliding layer would drop what the masks index)
    scores = [None] * len(attn)
    kept_log, score_log, tokens = [], [], []
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
                if m._ref_window is not None:  # the next query, at position T, sees k > T - window
                    evicted = evicted | (torch.arange(T) <= T - m._ref_window)
                cand = s.masked_fill(evicted, float("-inf"))
                cand[..., T - recent:] = float("-inf")  # the recent window is always kept
                if T > heavy + recent:
                    top = cand[..., : T - recent].topk(heavy, dim=-1).indices
                    keep = torch.zeros_like(evicted)
                    keep.scatter_(-1, top, True)
                    keep &= cand.isfinite()  # fewer candidates than heavy slots: no evicted key comes back
                    keep[..., T - recent:] = True
                    evicted = ~keep
                s = s.masked_fill(evicted, 0.0)
                scores[i] = s
                m._ref_evicted = evicted.repeat_interleave(groups, dim=1)
                kept_step.append([sorted((~evicted[0, h]).nonzero().flatten().tolist()) for h in range(evicted.shape[1])])
            kept_log.append(kept_step)
            score_log.append([s.clone() for s in scores])
            x = out.logits[:, -1:].argmax(-1)
            tokens.append(x[0, 0].item())
    finally:
        model.set_attn_implementation(own_implementation)
        for m in attn:
            m._ref_evicted = None
            m._ref_window = None
    return tokens, kept_log, score_log


def _kept_scores(cache) -> list[list[dict[int, float]]]:
    """Per layer and KV head (batch row 0): each kept position's accumulated score in the layer's H2O store."""
    stores = [layer.groups[0][1] for layer in cache.layers]
    return [[dict(zip(s.pos[0, h][s.valid[0, h]].tolist(), s.score[0, h][s.valid[0, h]].tolist()))
             for h in range(s.pos.shape[1])] for s in stores]


def run_headwise(model, ids, policy, steps):
    """Our cache, stepping the model by hand; returns tokens, kept positions per step, kept sizes, the cache and,
    for an H2O policy, the kept positions' accumulated scores per step (`_kept_scores`)."""
    cache = make_cache(model, policy)
    kept_log, sizes, tokens, score_log = [], [], [], []
    x = ids
    with torch.inference_mode():
        for _ in range(steps):
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
            kept_log.append([[heads for heads in cache.kept_positions(i)[0]] for i in range(len(cache.layers))])
            sizes.append(cache.kept_lengths())
            if policy["type"] == "h2o":
                score_log.append(_kept_scores(cache))
            x = out.logits[:, -1:].argmax(-1)
            tokens.append(x[0, 0].item())
    return tokens, kept_log, sizes, cache, score_log


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_budget_covering_the_sequence_generates_exactly_full(arch):
    model = tiny_model(arch)
    ids = random_ids(1, 24)
    full = model.generate(ids, max_new_tokens=16, do_sample=False)
    for policy in ({"type": "h2o", "heavy": 20, "recent": 20}, {"type": "h2o", "heavy_ratio": 1.0, "recent_ratio": 1.0}):
        out = model.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=make_cache(model, policy))
        assert torch.equal(out, full), policy


# tests/model_families.py: a window of 16 on every layer, on layer 1, on layer 0 (Gemma-3; Gemma-2 with a logit
# softcap; GPT-OSS with learned sinks)
WINDOWED = ("mistral-window", "qwen2-window", "gemma3", "gemma2", "gpt_oss")
CACHED_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", *WINDOWED]  # every family the caches take


@pytest.mark.parametrize("arch", CACHED_FAMILIES)
def test_kept_set_is_recent_plus_top_accumulated_scores_from_eager_weights(arch):
    """A 32-token prompt and 12 steps: on a windowed family the window (16) bites in the prompt's column sums
    and at every step, where heavy hitters leave it; Gemma-2's softcap and GPT-OSS's learned sinks change the
    probabilities the scores sum. The kept positions' accumulated scores are compared too: Gemma-2's cap of 50
    changes these small logits too little to change a kept set (and is monotone in each row), but without it
    the column sums move by up to about 1e-3, against a tolerance of 1e-5 (plus 1e-5 of the score)."""
    from model_families import FAMILIES, family_model

    model = family_model(arch) if arch in WINDOWED else tiny_model(arch)
    windows = FAMILIES[arch][2] if arch in WINDOWED else None
    ids = random_ids(1, 32, seed=3)
    heavy, recent, steps = 6, 4, 12
    ref_tokens, ref_kept, ref_scores = reference_h2o(model, ids, heavy, recent, steps, windows)
    tokens, kept, sizes, _, scores = run_headwise(model, ids, {"type": "h2o", "heavy": heavy, "recent": recent},
                                                  steps)
    assert kept[0] == ref_kept[0]  # after the prompt: recent 4 + top-6 of the prompt's column sums
    assert kept == ref_kept  # and after every decode step (scores accumulated over generated tokens)
    assert tokens == ref_tokens
    assert all(n == [heavy + recent] for step in sizes for n in step)
    for step, (got_step, want_step) in enumerate(zip(scores, ref_scores, strict=True)):
        for layer, (got_heads, want) in enumerate(zip(got_step, want_step, strict=True)):
            for h, got in enumerate(got_heads):
                positions = sorted(got)
                torch.testing.assert_close(torch.tensor([got[p] for p in positions]), want[0, h, positions],
                                           rtol=1e-5, atol=1e-5, msg=lambda text: f"step {step}, layer {layer}, "
                                           f"KV head {h}: {text}")


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
    tokens, kept, sizes, cache, _ = run_headwise(llama, ids, policy, steps=15)
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


# ---- blocked column sums: queries in blocks give the same output, scores and kept sets ------------------


def _whole_matrix_attention(q, k, v, scaling, key_valid, causal_tail, prompt_mask):
    """Output and column sums from the whole (T, L) probability matrix, in float64."""
    B, H, G, T, D = q.shape
    L = k.shape[-2]
    logits = torch.einsum("bhgtd,bhld->bhgtl", q.double(), k.double()) * scaling
    if prompt_mask is not None:
        allowed = prompt_mask[:, :, None]  # (B, 1, 1, T, L)
    else:
        allowed = torch.ones(B, H, 1, T, L, dtype=torch.bool)
        if causal_tail:
            allowed = allowed & (torch.arange(L)[None, :] <= torch.arange(T)[:, None] + (L - T))
        if key_valid is not None:
            allowed = allowed & key_valid[:, :, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(nan=0.0)
    return torch.einsum("bhgtl,bhld->bhgtd", probs, v.double()), probs.sum(dim=(2, 3))


@pytest.mark.parametrize("case", ["causal prompt", "kept slots + new tokens", "left-padded prompt"])
def test_blocked_attention_equals_the_whole_probability_matrix(case):
    """grouped_attention in blocks of 1 query, of 4, 7 and 10 (none divides the 23 queries) and in one
    block gives the output and column sums of the whole probability matrix: same masks, exact softmax."""
    from headwise.inference.attention import grouped_attention

    gen = torch.Generator().manual_seed(11)
    B, H, G, T, D = 2, 2, 3, 23, 16
    kept = 15 if case == "kept slots + new tokens" else 0
    L = kept + T
    q = torch.randn(B, H, G, T, D, generator=gen) * 2
    k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    key_valid = prompt_mask = None
    if case == "kept slots + new tokens":  # a later forward: some kept slots hold padding, the new tokens are real
        key_valid = torch.cat([torch.rand(B, H, kept, generator=gen) < 0.7, torch.ones(B, H, T, dtype=torch.bool)], -1)
    if case == "left-padded prompt":  # row 1 starts with 6 padding tokens: their queries see nothing
        real = torch.ones(B, L, dtype=torch.bool)
        real[1, :6] = False
        prompt_mask = (torch.ones(T, L, dtype=torch.bool).tril() & real[:, None, None, :] & real[:, None, :, None])
    args = dict(scaling=D ** -0.5, key_valid=key_valid, causal_tail=True, prompt_mask=prompt_mask, need_colsums=True)
    ref_out, ref_cols = _whole_matrix_attention(q, k, v, D ** -0.5, key_valid, True, prompt_mask)
    one_out, one_cols = grouped_attention(q, k, v, block_queries=T, **args)
    for block in (1, 4, 7, 10, T):
        out, cols = grouped_attention(q, k, v, block_queries=block, **args)
        assert out.shape == (B, H, G, T, D) and cols.shape == (B, H, L)
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cols.double(), ref_cols, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, one_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cols, one_cols, rtol=1e-5, atol=1e-6)
    if prompt_mask is not None:
        assert torch.all(out[1, :, :, :6] == 0)  # padding queries: no output, nothing added to any column


def _h2o_state(cache):
    """Per layer: kept positions per row and KV head, and the accumulated scores of the kept slots."""
    stores = [layer.groups[0][1] for layer in cache.layers]
    return [s.kept_positions() for s in stores], [s.score.clone() for s in stores]


def _chunked_prefill_then_generate(model, ids, mask, policy):
    """Prompt forwards of 30 (with the left padding) and 17 tokens, then `generate` (the last 6 prompt
    tokens in one forward, then 3 decode steps): every multi-token path of the headwise attention."""
    from headwise.inference.prefill import prompt_positions

    cache = make_cache(model, policy)
    pos = prompt_positions(mask)
    with torch.inference_mode():
        for lo, hi in ((0, 30), (30, 47)):
            model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=pos[:, lo:hi],
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
        after_prefill = _h2o_state(cache)
        tokens = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, do_sample=False)
    return after_prefill, _h2o_state(cache), tokens[:, ids.shape[1]:].tolist()


def test_blocked_prefill_keeps_what_one_block_keeps(llama, monkeypatch):
    """A left-padded batch of 53-token prompts (row 1: 9 padding tokens) under H2O: query blocks of 4, 7
    and 11 (dividing none of the forwards' 30, 17 and 6 tokens) keep the same positions with the same
    scores, and generate the same tokens, as each forward in one block."""
    from headwise.inference import attention as kv_attention

    ids, mask = random_ids(2, 53, seed=13), torch.ones(2, 53, dtype=torch.long)
    ids[1, :9], mask[1, :9] = 0, 0
    policy = {"type": "h2o", "heavy": 8, "recent": 5}
    monkeypatch.setattr(kv_attention, "COLSUM_BLOCK_QUERIES", 1024)
    one = _chunked_prefill_then_generate(llama, ids, mask, policy)
    (one_kept, one_scores), (one_kept_end, one_scores_end), one_tokens = one
    assert all(len(head) == 13 for layer in one_kept for row in layer for head in row)  # evicted to heavy + recent
    for block in (4, 7, 11):
        monkeypatch.setattr(kv_attention, "COLSUM_BLOCK_QUERIES", block)
        (kept, scores), (kept_end, scores_end), tokens = _chunked_prefill_then_generate(llama, ids, mask, policy)
        assert kept == one_kept and kept_end == one_kept_end, block
        for got, want in zip(scores + scores_end, one_scores + one_scores_end):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert tokens == one_tokens, block
