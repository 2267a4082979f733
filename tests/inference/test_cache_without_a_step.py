"""A model switched to the cache attention (`headwise_kv`) and called without a headwise cache step (a forward with
`use_cache=False`, a perplexity pass) runs its own attention: SDPA, or, where the model has a logit softcap or
learned sinks that SDPA cannot apply, the family's own eager attention with an explicit causal mask."""

from __future__ import annotations

import copy

import pytest
import torch

from headwise.inference.cache import make_cache
from model_families import family_model


@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma2", "gpt_oss"])
def test_a_forward_without_a_cache_step_is_the_stock_model(family):
    stock = family_model(family, dtype=torch.float32)
    if family == "gemma2":
        stock.config._attn_implementation = "eager"  # its softcap: what headwise.load picks for it
    model = copy.deepcopy(stock)
    make_cache(model, {"type": "streaming", "sink": 2, "recent": 4})
    assert model.config._attn_implementation == "headwise_kv"
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))  # beyond the 16-token window
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, stock(input_ids=ids).logits)
