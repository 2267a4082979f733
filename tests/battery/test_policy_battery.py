"""The KV-policy battery: every family, each policy's decode logits against an independent fp64 reference.

For a family whose attention the caches implement, a prompt is prefilled into the policy's cache and a fixed
continuation is fed one token at a time; the logits at every step must equal one forward of the whole sequence
through the same weights with a masked attention written here from the documented rules (docs/inference.md):
prompt rows are causal (eviction runs after the prompt); after each step a streaming head keeps the first `sink`
tokens and the `recent` newest ones (the current token among them), so the next query, at position `q`, sees the
keys `k < sink` or `q - k <= recent` (the kept window and itself; keys keep their absolute positions); a retrieval
head of a `duo` policy sees every earlier key. Every head's rule, prompt rows and decode rows, composes with
what the family's own attention adds, as tests/model_families.py states it per family and layer (not as headwise's
reader finds it): a sliding window `w` intersects the rule with `q - k < w`; a logit softcap `c` turns the score
`s = scaling * q.k` into `c * tanh(s / c)` before the mask and softmax; learned sink logits (the attention
module's own `sinks`, one per query head) join each softmax denominator with no value. The prompt and
continuation are long enough that the window bites in the prompt (its first tokens leave the window) and in the
decode (the streaming sinks leave it one step at a time).

A family whose attention adds a rule the caches do not declare (`CACHE_FEATURES`, the keyword flags of
`AttentionFacts.unsupported`) is refused when the cache is built; its `full` policy is the model's own cache,
checked against the model's whole-sequence forward. H2O's kept sets and tokens are checked against an eager
reference in tests/inference/test_h2o_cache.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headwise.errors import HeadwiseError
from headwise.inference.cache import CACHE_FEATURES, make_cache
from headwise.inference.prefill import cache_kwarg
from headwise.patches.model_attention import attention_facts, attention_modules
from model_families import FAMILIES, WINDOW, family_model

# Prompt tokens and continuation tokens fed one at a time. With the window of 16: prompt queries 16 and 17 lose
# keys 0 and 1; the decode queries 18 and 19 lose sinks 2 and 3, so a streaming head's sinks leave the window
# during the decode, and full or retrieval heads lose a prompt token at every step.
T, N = 18, 8
SINK, RECENT = 4, 5
assert SINK + RECENT < WINDOW < T < WINDOW + SINK <= T + N - 1
REFERENCE = "headwise_policy_battery_reference"


def _allowed(length: int, streams: bool, window: int | None) -> torch.Tensor:
    """(length, length) bool: which keys each query of one head sees under the policy's rule and the window."""
    q = torch.arange(length).view(-1, 1)
    k = torch.arange(length).view(1, -1)
    allowed = k <= q
    if streams:  # prompt rows are causal, decode rows see the sinks and the recent tokens
        allowed = allowed & ((q < T) | (k < SINK) | (q - k <= RECENT))
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed


def _reference_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Masked fp64 softmax attention; `module.battery_streaming` holds, per KV head, whether it streams,
    `module.battery_window` the layer's sliding window, `module.battery_softcap` the logit softcap (None: none of
    either) and `module.battery_learned_sinks` whether the module's own `sinks` join the softmax."""
    _, hq, length, _ = query.shape
    g = hq // key.shape[1]
    k, v = key.repeat_interleave(g, dim=1).double(), value.repeat_interleave(g, dim=1).double()
    allowed = torch.stack([_allowed(length, bool(module.battery_streaming[h // g]), module.battery_window)
                           for h in range(hq)])
    scores = (query.double() @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if module.battery_softcap is not None:
        scores = module.battery_softcap * torch.tanh(scores / module.battery_softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if module.battery_learned_sinks:  # one more logit per query head in the denominator; the sink has no value
        sink_logits = module.sinks.double().view(1, hq, 1, 1).expand(*scores.shape[:-1], 1)
        weights = torch.softmax(torch.cat([scores, sink_logits], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(scores, dim=-1)
    return (weights @ v).to(query.dtype).transpose(1, 2).contiguous(), None


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


FAMILY_RULES = ("window", "softcap", "learned_sinks")  # what a family's attention may add, as the reference writes it


def _reference_model(family: str, streams: list[list[int]], *, without: str | None = None):
    """The family's model (in the battery's dtype) with the battery's attention: per layer, which KV heads stream,
    and the layer's window, softcap and learned sinks from tests/model_families.py (`without` names one of
    FAMILY_RULES the reference leaves out, to show that it changes the logits)."""
    assert without in (None, *FAMILY_RULES), without
    _, _, windows, softcap, learned_sinks, _ = FAMILIES[family]
    reference = family_model(family, dtype=_family_dtype(family))
    reference.config._attn_implementation = REFERENCE
    for m in attention_modules(reference):
        m.battery_streaming = streams[m.layer_idx]
        m.battery_window = windows[m.layer_idx] if without != "window" else None
        m.battery_softcap = softcap if without != "softcap" else None
        m.battery_learned_sinks = learned_sinks and without != "learned_sinks"
    return reference


def _family_adds(family: str) -> list[str]:
    """Which of FAMILY_RULES the family's attention adds to plain causal softmax attention."""
    _, _, windows, softcap, learned_sinks, _ = FAMILIES[family]
    adds = {"window": any(w is not None for w in windows), "softcap": softcap is not None,
            "learned_sinks": learned_sinks}
    return [rule for rule in FAMILY_RULES if adds[rule]]


def _decode_logits(model, cache) -> torch.Tensor:
    """Last-position logits after the prompt and after each continuation token but the last; `cache` None: the
    model's own cache."""
    ids = _ids(model)
    key = cache_kwarg(model)
    out = model(input_ids=ids[:, :T], use_cache=True, **{key: cache})
    rows = [out.logits[:, -1]]
    for i in range(T, T + N - 1):
        out = model(input_ids=ids[:, i:i + 1], use_cache=True, **{key: cache if cache is not None else
                                                                  out.past_key_values})
        rows.append(out.logits[:, -1])
    return torch.stack(rows, dim=1)


def _ids(model) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (1, T + N), generator=torch.Generator().manual_seed(0))


def _family_dtype(family: str) -> torch.dtype:
    """fp64 throughout, except GPT-OSS, whose expert matmul (grouped_mm) takes 32 bits at most."""
    return torch.float32 if family == "gpt_oss" else torch.float64


def _tolerance(precision: torch.dtype, want: torch.Tensor) -> dict[str, float]:
    """Logits equal up to the rounding of `precision`: fp64 to 1e-9; fp32 (GPT-OSS, whose experts run in fp32
    only, and Gemma-2's eager softmax, fp32 whatever the model's dtype) to fp32's rtol (1.3e-6) and an atol of
    1e-5 of the largest entry (as tests/battery/test_method_battery.py allows)."""
    if precision == torch.float64:
        return {"rtol": 1e-9, "atol": 1e-9}
    assert precision == torch.float32, precision
    return {"rtol": 1.3e-6, "atol": 1e-5 * max(1.0, want.abs().max().item())}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_with_no_head_streaming_is_the_model(family):
    """With every head causal, the reference (window, softcap and learned sinks as tests/model_families.py states
    them) gives the stock model's logits: the battery's reference is the family's attention. Each rule the family
    adds changes the logits of this sequence (without it the reference is not the model, by five times the
    tolerance at least), so the battery's cases can fail on a cache that drops it."""
    stock = family_model(family, dtype=_family_dtype(family))
    facts = attention_facts(stock.config, stock)
    no_streaming = _policies(facts.num_layers, facts.num_kv_heads)["full"][1]
    ids = _ids(stock)[:, :T + N - 1]
    # Gemma-2's eager attention takes its softmax in fp32 (modeling_gemma2.eager_attention_forward), whatever the
    # model's dtype: against it the fp64 reference is exact to fp32 rounding only
    precision = torch.float32 if family == "gemma2" else stock.dtype
    with torch.no_grad():
        want = stock(input_ids=ids).logits
        got = _reference_model(family, no_streaming)(input_ids=ids).logits
        tolerance = _tolerance(precision, want)
        torch.testing.assert_close(got, want, **tolerance)
        for rule in _family_adds(family):
            without = _reference_model(family, no_streaming, without=rule)(input_ids=ids).logits
            gap = (without - want).abs() - tolerance["rtol"] * want.abs()
            assert gap.max() > 5 * tolerance["atol"], f"without the {rule}, the reference is still the model"


@pytest.mark.parametrize("policy_name", ["full", "streaming", "duo"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_policy_on_family(family, policy_name, battery_verdict):
    model = family_model(family, dtype=_family_dtype(family))
    facts = attention_facts(model.config, model)
    policy, streams = _policies(facts.num_layers, facts.num_kv_heads)[policy_name]
    dropped = facts.unsupported(**CACHE_FEATURES)
    if dropped:  # a feature the caches do not declare (none of tests/model_families.py's families has one)
        if policy_name == "full":  # `full` is the model's own attention and cache: nothing to refuse
            assert make_cache(model, policy) is None
            with torch.no_grad():
                got = _decode_logits(model, None)
                want = model(input_ids=_ids(model)[:, :T + N - 1]).logits[:, T - 1:]
            # decode and one forward of the model agree to the rounding of its own attention, which may be fp32
            # (Gemma-2's eager softmax) in an fp64 model
            torch.testing.assert_close(got, want, **_tolerance(torch.float32, want))
            battery_verdict(family, model.config.model_type, "kv_policy full", "matches")
            return
        with pytest.raises(HeadwiseError, match=f"kv_policy: {model.config.model_type} uses "):
            make_cache(model, policy)
        battery_verdict(family, model.config.model_type, f"kv_policy {policy_name}", "refused", "; ".join(dropped))
        return
    reference = _reference_model(family, streams)
    with torch.no_grad():
        got = _decode_logits(model, make_cache(model, policy, always=True))
        want = reference(input_ids=_ids(model)[:, :T + N - 1]).logits[:, T - 1:]
    torch.testing.assert_close(got, want, **_tolerance(model.dtype, want))
    battery_verdict(family, model.config.model_type, f"kv_policy {policy_name}", "matches")
