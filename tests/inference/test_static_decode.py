"""The static-shape decode step: same tokens and kept sets as the dynamic path, no graph breaks or recompiles."""

from __future__ import annotations

import pytest
import torch

from headwise.inference.cache import make_cache
from headwise.inference.prefill import cache_kwarg
from headwise.inference.static_decode import StaticDecoder
from inference_helpers import random_ids

POLICIES = [
    {"type": "full"},
    {"type": "streaming", "sink": 4, "recent": 8},
    {"type": "h2o", "heavy": 6, "recent": 6},
    {"type": "h2o", "heavy_ratio": 0.2, "recent_ratio": 0.1},
    {"type": "h2o", "heavy": 100, "recent": 100},  # budget larger than the sequence
    {"type": "duo", "retrieval_heads": [[1, 0], [0, 1]], "sink": 2, "recent": 6},
    {"type": "duo", "retrieval_heads": [[1, 0], [1, 1]], "sink": 2, "recent": 6,
     "retrieval_policy": {"type": "h2o", "heavy": 5, "recent": 4}},
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["type"] + str(len(str(p))))
def test_static_decode_equals_generate(llama, policy):
    ids = random_ids(2, 36, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in row 1
    ids[1, :7] = 0
    cache = make_cache(llama, policy)
    kw = {"past_key_values": cache} if cache is not None else {}
    dynamic = llama.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **kw)[:, 36:]
    decoder = StaticDecoder(llama, policy, max_new_tokens=16, mode="eager")
    static = decoder.generate(ids, mask)
    assert torch.equal(static, dynamic)
    if cache is not None:
        for layer in range(2):
            for group in range(len(cache.layers[layer].groups)):
                assert decoder.cache.kept_positions(layer, group) == cache.kept_positions(layer, group)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["type"] + str(len(str(p))))
def test_windowed_model_decodes_as_generate(policy):
    """A Mistral whose 16-token sliding window bites in the prompt and in every decode step: the static decoder's
    fixed slots (`full` becomes a window cache of 15 tokens) give the tokens and kept sets of the dynamic cache,
    and for `full` the tokens of transformers' own cache and attention, which apply the window themselves."""
    from model_families import family_model

    model = family_model("mistral-window")
    model.generation_config.eos_token_id = None
    ids = random_ids(2, 36, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    cache = make_cache(model, policy)
    kw = {cache_kwarg(model): cache} if cache is not None else {}
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **kw)[:, 36:]
    decoder = StaticDecoder(model, policy, max_new_tokens=16, mode="eager")
    assert torch.equal(decoder.generate(ids, mask), dynamic)
    if cache is not None:
        for layer in range(2):
            for group in range(len(cache.layers[layer].groups)):
                kept = cache.kept_positions(layer, group)
                assert decoder.cache.kept_positions(layer, group) == kept
                assert all(max(row) - min(row) < 16 for heads in kept for row in heads if row)  # inside the window


def test_chunked_prefill_applies_the_window_per_query():
    """Prompt chunks after the first run several queries over the cache at once: on a windowed layer each query
    has its own window edge. With every head a retrieval head, a duo cache prefilled 5 tokens at a time gives the
    stock model's logits (transformers' own sliding-window attention over the whole sequence)."""
    from headwise.inference.prefill import prefill_in_chunks
    from model_families import family_model

    model = family_model("mistral-window", dtype=torch.float64)
    ids = random_ids(1, 37, seed=3)
    mask = torch.ones_like(ids)
    cache = make_cache(model, {"type": "duo", "retrieval_heads": [[1, 1], [1, 1]], "sink": 2, "recent": 4})
    done = prefill_in_chunks(model, cache, ids, mask, chunk=5)
    with torch.no_grad():
        rest = model(input_ids=ids[:, done:], attention_mask=mask, position_ids=torch.arange(done, 37)[None],
                     use_cache=True, **{cache_kwarg(model): cache}).logits
        stock = model(input_ids=ids).logits[:, done:]
    torch.testing.assert_close(rest, stock, rtol=1e-9, atol=1e-9)


def test_duo_static_prefill_is_chunked_like_generate(llama):
    """A `duo` prompt longer than the prefill chunk is prefilled chunk by chunk (as LoadedModel.generate
    does), so the static decoder generates what transformers' generate does after the same chunked
    prefill, and differs from a one-forward prefill (the chunking is not a no-op here)."""
    from headwise.inference.prefill import prefill_in_chunks

    policy = {"type": "duo", "retrieval_heads": [[1, 0], [0, 1]], "sink": 2, "recent": 6}
    ids = random_ids(2, 40, seed=13)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = make_cache(llama, policy)
    prefill_in_chunks(llama, cache, ids, mask, 8)
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              **{cache_kwarg(llama): cache})[:, 40:]
    chunked = StaticDecoder(llama, policy, max_new_tokens=10, mode="eager", prefill_chunk=8)
    assert torch.equal(chunked.generate(ids, mask), expected)
    whole = StaticDecoder(llama, policy, max_new_tokens=10, mode="eager", prefill_chunk=0).generate(ids, mask)
    assert not torch.equal(whole, expected)


def test_static_buffers_do_not_move(llama):
    """Capturability: every step writes into the same preallocated buffers (no cat, no reallocation)."""
    decoder = StaticDecoder(llama, {"type": "h2o", "heavy": 6, "recent": 6}, max_new_tokens=4, mode="eager")
    decoder.prefill(random_ids(1, 30))
    store = decoder.cache.layers[0].groups[0][1]
    ptrs = [t.data_ptr() for t in (store.keys, store.values, store.valid, store.pos, store.score, store.free)]
    decoder.decode(4)
    assert ptrs == [t.data_ptr() for t in (store.keys, store.values, store.valid, store.pos, store.score, store.free)]
    assert store.keys.shape[2] == 13 and int(store.valid.sum(-1).max()) == 12  # budget + 1 slots, one free


def test_decode_step_traces_as_one_graph_without_recompiling(llama):
    """torch.compile(fullgraph=True) fails on graph breaks; error_on_recompile catches Python state in the step."""
    import torch._dynamo

    policy = {"type": "duo", "retrieval_heads": [[1, 0], [0, 1]], "sink": 2, "recent": 6,
              "retrieval_policy": {"type": "h2o", "heavy": 5, "recent": 4}}
    ids = random_ids(1, 30, seed=4)
    expected = StaticDecoder(llama, policy, max_new_tokens=6, mode="eager").generate(ids)
    decoder = StaticDecoder(llama, policy, max_new_tokens=6, mode="eager")
    decoder.prefill(ids)
    torch._dynamo.reset()
    step = torch.compile(decoder._step, backend="eager", fullgraph=True)
    tokens = [decoder.ids[0, 0].item()]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for _ in range(5):
            step()
            tokens.append(decoder.ids[0, 0].item())
    torch._dynamo.reset()
    assert tokens == expected[0].tolist()


def test_compiled_decode_equals_eager(llama):
    """mode="compile": the inductor-compiled step (fused kernels, on CPU here) generates the eager tokens
    and keeps the same sets, with left padding and a policy that mixes head groups (Duo + H2O)."""
    import torch._dynamo

    policy = POLICIES[-1]
    ids = random_ids(2, 30, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    eager = StaticDecoder(llama, policy, max_new_tokens=6, mode="eager")
    compiled = StaticDecoder(llama, policy, max_new_tokens=6, mode="compile")
    torch._dynamo.reset()
    try:
        assert torch.equal(compiled.generate(ids, mask), eager.generate(ids, mask))
        assert compiled._compiled is not None
    finally:
        torch._dynamo.reset()
    for layer in range(2):
        for group in range(len(eager.cache.layers[layer].groups)):
            assert compiled.cache.kept_positions(layer, group) == eager.cache.kept_positions(layer, group)


def test_compile_failure_names_the_way_out(llama):
    """A real inductor failure (its C++ compiler pointed at a missing program) becomes one HeadwiseError
    that says how to decode without compiling; nothing is left half-built for the next call."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from headwise.errors import HeadwiseError

    torch._dynamo.reset()
    decoder = StaticDecoder(llama, {"type": "streaming", "sink": 2, "recent": 6}, max_new_tokens=4, mode="compile")
    try:
        with inductor_config.patch({"cpp.cxx": ("headwise-no-such-compiler",), "fx_graph_cache": False}):
            with pytest.raises(HeadwiseError, match="mode='cuda_graph'.*--static"):
                decoder.generate(random_ids(1, 20, seed=3))
    finally:
        torch._dynamo.reset()
    assert not decoder._warm
    eager = StaticDecoder(llama, {"type": "streaming", "sink": 2, "recent": 6}, max_new_tokens=4, mode="eager")
    assert torch.equal(decoder.generate(random_ids(1, 20, seed=3)), eager.generate(random_ids(1, 20, seed=3)))


def test_dropped_compiled_decoder_frees_its_cache(llama):
    """Tracing leaves reference cycles around the traced buffers; with automatic garbage collection off,
    a dropped compiled decoder must still free its KV buffers (else a GPU holds them until a collection)."""
    import gc
    import weakref

    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    gc.disable()
    try:
        decoder = StaticDecoder(llama, {"type": "full"}, max_new_tokens=4, mode="compile")
        decoder.generate(random_ids(1, 20, seed=2))
        keys = weakref.ref(decoder.cache.layers[0].groups[0][1].keys)
        del decoder
        assert keys() is None
    finally:
        gc.enable()
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["type"] + str(len(str(p))))
def test_cuda_graph_decode_equals_eager(policy):
    """The captured step replays exactly the eager step: same tokens and kept sets, batch 2 with left padding."""
    from inference_helpers import tiny_model

    model = tiny_model("llama").cuda()
    ids = random_ids(2, 36, seed=11).cuda()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    eager = StaticDecoder(model, policy, max_new_tokens=16, mode="eager")
    graphed = StaticDecoder(model, policy, max_new_tokens=16, mode="cuda_graph")
    assert torch.equal(graphed.generate(ids, mask), eager.generate(ids, mask))
    assert graphed._graph is not None  # really replayed a captured graph
    for layer in range(2):
        for group in range(len(eager.cache.layers[layer].groups)):
            assert graphed.cache.kept_positions(layer, group) == eager.cache.kept_positions(layer, group)


def test_static_from_releases_the_dynamic_cache_layer_by_layer(llama):
    """The hand-over from the prefilled dynamic cache to the slot stores frees every dynamic K/V tensor
    (else it holds twice the KV bytes at once), and the decoder still generates what it did before."""
    import weakref

    from headwise.inference.prefill import prompt_positions

    policy = {"type": "duo", "retrieval_heads": [[1, 0], [0, 1]], "sink": 2, "recent": 6}
    ids = random_ids(1, 30, seed=5)
    mask = torch.ones_like(ids)
    expected = StaticDecoder(llama, policy, max_new_tokens=8, mode="eager", prefill_chunk=0).generate(ids, mask)

    dyn = make_cache(llama, policy, always=True)
    with torch.inference_mode():
        out = llama(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask), use_cache=True,
                    logits_to_keep=1, **{cache_kwarg(llama): dyn})
    first = out.logits[:, -1].argmax(-1)
    del out
    held = [weakref.ref(t) for layer in dyn.layers for _, store in layer.groups for t in (store.keys, store.values)]
    assert all(r() is not None for r in held)
    decoder = StaticDecoder(llama, policy, max_new_tokens=8, mode="eager", prefill_chunk=0)
    decoder.static_from(dyn, first, torch.full((1,), 30))
    assert all(r() is None for r in held)  # freed, not merely dropped from the store
    assert torch.equal(decoder.decode(8), expected)
