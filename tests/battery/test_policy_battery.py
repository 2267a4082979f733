"""The KV-policy battery: every family, each policy's decode logits against an independent fp64 reference.

For a family whose attention the caches implement, a prompt is prefilled into the policy's cache and a fixed
continuation is fed one token at a time; the logits at every step must equal one forward of the whole sequence
through the same weights with a masked attention written here from the documented rules (docs/inference.md):
prompt rows are causal (eviction runs after the prompt); after each step a streaming head keeps the first `sink`
tokens and the `recent` newest ones (the current token among them), so the next query, at position `q`, sees the
keys `k < sink` or `q - k <= recent` (the kept window and itself; keys keep their absolute positions); a retrieval head of a `duo` policy sees every earlier key. A family whose attention adds a
rule the caches lack is refused when the cache is built. H2O's kept sets and tokens are checked against an eager
reference on every family the caches take in tests/inference/test_h2o_cache.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headwise.errors import HeadwiseError
from headwise.inference.cache import make_cache
from headwise.inference.prefill import cache_kwarg
from headwise.patches.model_attention import attention_facts, attention_modules
from model_families import EXACT, FAMILIES, family_model

T, N = 12, 6  # prompt tokens, continuation tokens fed one at a time
SINK, RECENT = 2, 5
REFERENCE = "headwise_policy_battery_reference"


def _streaming_allowed(length: int) -> torch.Tensor:
    q = torch.arange(length).view(-1, 1)
    k = torch.arange(length).view(1, -1)
    decode = (k < SINK) | (q - k <= RECENT)
    return (k <= q) & ((q < T) | decode)


def _reference_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Masked fp64 softmax attention; `module.battery_streaming` holds, per KV head, whether it streams."""
    b, hq, length, _ = query.shape
    g = hq // key.shape[1]
    k, v = key.repeat_interleave(g, dim=1).double(), value.repeat_interleave(g, dim=1).double()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    streaming = _streaming_allowed(length)
    allowed = torch.stack([streaming if module.battery_streaming[h // g] else causal for h in range(hq)])
    scores = (query.double() @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def _policies(n_layers: int, n_kv: int) -> dict[str, tuple[dict, list[list[int]]]]:
    """policy -> (the policy, which KV heads stream per layer)."""
    mixed = [[(layer + h) % 2 for h in range(n_kv)] for layer in range(n_layers)]  # 1: retrieval, 0: streaming
    return {
        "full": ({"type": "full"}, [[0] * n_kv for _ in range(n_layers)]),
        "streaming": ({"type": "streaming", "sink": SINK, "recent": RECENT}, [[1] * n_kv for _ in range(n_layers)]),
        "duo": ({"type": "duo", "retrieval_heads": mixed, "sink": SINK, "recent": RECENT},
                [[1 - r for r in row] for row in mixed]),
    }


def _decode_logits(model, policy) -> torch.Tensor:
    ids = _ids(model)
    cache = make_cache(model, policy, always=True)
    key = cache_kwarg(model)
    rows = [model(input_ids=ids[:, :T], use_cache=True, **{key: cache}).logits[:, -1]]
    for i in range(T, T + N - 1):
        rows.append(model(input_ids=ids[:, i:i + 1], use_cache=True, **{key: cache}).logits[:, -1])
    return torch.stack(rows, dim=1)


def _ids(model) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (1, T + N), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("policy_name", ["full", "streaming", "duo"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_policy_on_family(family, policy_name, battery_verdict):
    model = family_model(family, dtype=torch.float32 if family == "gpt_oss" else torch.float64)
    facts = attention_facts(model.config, model)
    policy, streams = _policies(facts.num_layers, facts.num_kv_heads)[policy_name]
    if facts.unsupported(fused_projections=True):
        if policy_name == "full":  # `full` is the model's own attention and cache: nothing to refuse
            battery_verdict(family, model.config.model_type, "kv_policy full", "matches")
            return
        with pytest.raises(HeadwiseError, match=f"kv_policy: {model.config.model_type} uses "):
            make_cache(model, policy)
        battery_verdict(family, model.config.model_type, f"kv_policy {policy_name}", "refused",
                        "; ".join(facts.unsupported(fused_projections=True)))
        return
    assert family in EXACT or facts.projections == "fused"
    reference = family_model(family, dtype=torch.float64)
    reference.config._attn_implementation = REFERENCE
    for m in attention_modules(reference):
        m.battery_streaming = streams[m.layer_idx]
    with torch.no_grad():
        got = _decode_logits(model, policy)
        want = reference(input_ids=_ids(model)[:, :T + N - 1]).logits[:, T - 1:]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    battery_verdict(family, model.config.model_type, f"kv_policy {policy_name}", "matches")
