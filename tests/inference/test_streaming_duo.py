"""Streaming (sink + recent) and DuoAttention caches: sizes, kept sets, exactness where nothing is evicted."""

from __future__ import annotations

import torch

from headwise.inference.cache import make_cache
from inference_helpers import random_ids


def _steps(model, ids, cache, steps):
    sizes, x = [], ids
    with torch.inference_mode():
        for _ in range(steps):
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
            sizes.append(cache.kept_lengths())
            x = out.logits[:, -1:].argmax(-1)
    return sizes


def test_streaming_keeps_sinks_and_recent_window_at_constant_size(llama):
    ids = random_ids(1, 30)
    cache = make_cache(llama, {"type": "streaming", "sink": 4, "recent": 8})
    sizes = _steps(llama, ids, cache, steps=10)
    assert all(s == [[12], [12]] for s in sizes)
    newest = 30 + 9 - 1
    expected = list(range(4)) + list(range(newest - 7, newest + 1))
    for layer in range(2):
        assert cache.kept_positions(layer) == [[expected, expected]]


def test_streaming_with_a_window_covering_the_sequence_is_full(llama):
    ids = random_ids(1, 20)
    full = llama.generate(ids, max_new_tokens=12, do_sample=False)
    out = llama.generate(ids, max_new_tokens=12, do_sample=False,
                         past_key_values=make_cache(llama, {"type": "streaming", "sink": 0, "recent": 64}))
    assert torch.equal(out, full)


def test_duo_with_every_head_retrieval_is_full(llama):
    ids = random_ids(1, 25)
    full = llama.generate(ids, max_new_tokens=12, do_sample=False)
    cache = make_cache(llama, {"type": "duo", "retrieval_heads": [[1, 1], [1, 1]], "sink": 2, "recent": 4})
    out = llama.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(out, full)
    assert cache.kept_lengths() == [[36], [36]]


def test_duo_streaming_heads_hold_smaller_tensors(llama):
    ids = random_ids(1, 30)
    cache = make_cache(llama, {"type": "duo", "retrieval_heads": [[1, 0], [0, 0]], "sink": 2, "recent": 6})
    sizes = _steps(llama, ids, cache, steps=5)
    assert sizes[-1] == [[34, 8], [8]]  # layer 0: retrieval head grows, streaming head stays; layer 1 all streaming
    retrieval, streaming = cache.layers[0].groups
    assert retrieval[1].keys.shape[1] == 1 and streaming[1].keys.shape[1] == 1  # one KV head each, separate tensors
    assert streaming[1].keys.shape[2] == 8
    newest = 30 + 4 - 1
    assert cache.kept_positions(0, group=1) == [[[0, 1] + list(range(newest - 5, newest + 1))]]
    assert cache.kept_positions(0, group=0) == [[list(range(newest + 1))]]


def test_duo_with_h2o_on_retrieval_heads(llama):
    ids = random_ids(1, 30)
    policy = {"type": "duo", "retrieval_heads": [[1, 0], [1, 1]], "sink": 2, "recent": 6,
              "retrieval_policy": {"type": "h2o", "heavy": 5, "recent": 3}}
    cache = make_cache(llama, policy)
    sizes = _steps(llama, ids, cache, steps=6)
    assert all(s == [[8, 8], [8]] for s in sizes)
    # H2O on retrieval heads: the 3 most recent positions are always kept
    newest = 30 + 5 - 1
    for row in cache.kept_positions(1)[0]:
        assert row[-3:] == [newest - 2, newest - 1, newest]
