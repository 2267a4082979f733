"""The method battery: every registered method on every model family, against an independent fp64 reference.

For each (family, method): a family whose attention the method implements must give, in training mode, the
logits and gradients of the same weights run with a masked fp64 attention written here from the semantics
(docs/kernels.md, "Layout semantics"; DuoAttention's gate mix), and in eval mode the stock model's logits; a
family whose attention adds a rule the method does not declare (`Method.attention_features`, the keyword flags
of `AttentionFacts.unsupported`) must be refused before anything is patched (tests/patches/test_model_attention.py
checks the message). No case is skipped, and a registered method without a reference rule here fails the
battery, so a new method joins it by registering and writing its rule.

The reference composes each method's rule with what the family's own attention adds, as tests/model_families.py
states it per family (not as headwise's reader finds it): a layer's sliding window `w` intersects the method's
rule with `q - k < w`; a logit softcap `c` turns the score `s = scaling * q.k` into `c * tanh(s / c)` before the
mask and softmax; learned sink logits (the attention module's `sinks`, one per query head) join each softmax
denominator with no value. Duo's two terms are both the model's attention under these rules (full: causal and
the window; streaming: sink or recent, and the window), and the learned sinks' gradient is compared like every
other weight's (through the streaming term; the full term carries none).
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headwise.errors import HeadwiseError
from headwise.patches import METHODS
from headwise.patches.base import method_for
from headwise.patches.model_attention import attention_facts, attention_modules
from model_families import FAMILIES, OWN_REFUSALS, family_model

T = 24  # tokens per sample: three SinkLoRA groups of 8, longer than Duo's sink + recent
REFERENCE = "headwise_battery_reference"


def _causal(t: int) -> torch.Tensor:
    q = torch.arange(t).view(-1, 1)
    k = torch.arange(t).view(1, -1)
    return k <= q


class FamilyRules(NamedTuple):
    """What one layer of a family's attention adds to plain causal attention, from tests/model_families.py."""

    window: int | None  # the layer's sliding window in tokens, None for full attention
    softcap: float | None  # the logit softcap, None for none
    learned_sinks: bool  # whether the attention module's `sinks` logits join the softmax


def _family_rules(family: str, layer: int) -> FamilyRules:
    _, _, windows, softcap, learned_sinks, _ = FAMILIES[family]
    return FamilyRules(windows[layer], softcap, learned_sinks)


def _masked_softmax_attention(q, k, v, allowed, scaling, *, window: int | None = None, softcap: float | None = None,
                              sinks: torch.Tensor | None = None):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D), allowed (Hq, T, T) or (T, T) -> (B, Hq, T, D), fp64.

    `allowed` is the method's rule; `window` intersects it with `q - k < window`, `softcap` caps the scaled scores
    (`c * tanh(s / c)`) before the mask, and `sinks` (Hq,) adds one logit per head to the softmax denominator."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if window is not None:
        pos = torch.arange(q.shape[2])
        allowed = allowed & (pos.view(-1, 1) - pos.view(1, -1) < window)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1) @ v.double()
    sink_logits = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat([scores, sink_logits], dim=-1), dim=-1)[..., :-1]  # the sink has no value
    return weights @ v.double()


def _model_attention(module, q, k, v, allowed, scaling):
    """The family's attention under the method's rule `allowed`: the layer's window, softcap and learned sinks
    (`module.battery_family_rules`, set on each reference attention module; the sinks are the module's own)."""
    rules: FamilyRules = module.battery_family_rules
    sinks = module.sinks if rules.learned_sinks else None
    return _masked_softmax_attention(q, k, v, allowed, scaling, window=rules.window, softcap=rules.softcap,
                                     sinks=sinks)


# ----------------------------------------------------------------------------------------- the rules, per method


def full_rule(module, q, k, v, scaling):
    """`full` leaves the model's attention alone: its reference is the stock model (this rule is unused)."""
    raise AssertionError("the full method is compared with the stock model")


SF = {"group_size": 8, "sinks": 2}


def sinklora_rule(module, q, k, v, scaling):
    """Shifted groups G with sinks s: k < s or grp_h(q) == grp_h(k), grp_h(x) = x // G for the lower half of the
    heads and (x + G // 2) // G for the upper half (no wrap-around); composed with the family's attention."""
    hq, t = q.shape[1], q.shape[2]
    g, s = SF["group_size"], SF["sinks"]
    pos = torch.arange(t)
    allowed = torch.zeros(hq, t, t, dtype=torch.bool)
    for h in range(hq):
        shift = g // 2 if h >= hq // 2 else 0
        grp = (pos + shift) // g
        allowed[h] = _causal(t) & ((pos.view(1, -1) < s) | (grp.view(-1, 1) == grp.view(1, -1)))
    return _model_attention(module, q, k, v, allowed, scaling)


DUO = {"sink": 2, "recent": 6}


def duo_rule(module, q, k, v, scaling):
    """gate * full + (1 - gate) * streaming per KV group; streaming: k < sink or q - k < recent; the full term is
    the frozen model's attention (no gradient through it). Both terms are the family's attention (window, softcap,
    learned sinks) under their rule."""
    t = q.shape[2]
    pos = torch.arange(t)
    stream_allowed = _causal(t) & ((pos.view(1, -1) < DUO["sink"]) | (pos.view(-1, 1) - pos.view(1, -1) < DUO["recent"]))
    full = _model_attention(module, q, k, v, _causal(t), scaling).detach()
    stream = _model_attention(module, q, k, v, stream_allowed, scaling)
    gate = module.battery_gate.double().repeat_interleave(q.shape[1] // k.shape[1]).view(1, -1, 1, 1)
    return gate * full + (1 - gate) * stream


MOH = {"router": "query_norm", "activation": 0.75, "shared": 0.25}  # 1 shared + 2 of 3 routed of 4 heads


def moh_rule(module, q, k, v, scaling):
    """Every head's attention (the family's own) times its gate: the first `shared` share of the heads gate 1;
    of the rest, the top-k by the softmax of their query norms over the norms' standard deviation across those
    heads gate 1 in value and carry the softmax's gradient (straight-through), the others 0 with no gradient (an
    unchosen head's output is never computed on the skipping path); k makes
    `activation` of the heads active (MoH-LLaMA3's router, research dossier §1.5)."""
    b, hq, t, _ = q.shape
    n_shared = round(hq * MOH["shared"])
    n_chosen = round(hq * MOH["activation"]) - n_shared
    norms = q.double().norm(dim=-1)[:, n_shared:]  # (B, routed heads, T)
    probs = torch.softmax(norms / norms.std(dim=1, keepdim=True), dim=1)
    chosen = torch.zeros_like(probs).scatter(1, probs.topk(n_chosen, dim=1).indices, 1.0)
    gates = torch.cat([torch.ones(b, n_shared, t, dtype=probs.dtype), chosen * (1 + (probs - probs.detach()))], dim=1)
    return _model_attention(module, q, k, v, _causal(t), scaling) * gates.unsqueeze(-1)


RULES: dict[str, tuple[Callable, dict]] = {"full": (full_rule, {}), "sinklora": (sinklora_rule, SF),
                                           "duo": (duo_rule, DUO), "moh": (moh_rule, MOH)}
# Methods whose eval mode is their own model (MoH's routing stays); the others train a patch and evaluate the stock
# attention.
CHANGES_THE_MODEL = ("moh",)


def _reference_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = module.battery_rule(module, query, key, value, scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def test_every_registered_method_has_a_reference_rule():
    assert set(METHODS) == set(RULES)


def _family_dtype(family: str) -> torch.dtype:
    """fp64 throughout, except GPT-OSS, whose expert matmul (grouped_mm) takes 32 bits at most."""
    return torch.float32 if family == "gpt_oss" else torch.float64


def _causal_rule(module, q, k, v, scaling):
    return _model_attention(module, q, k, v, _causal(q.shape[2]), scaling)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_under_the_causal_rule_is_the_model(family):
    """The reference's composition (window, softcap, learned sinks as tests/model_families.py states them) under
    plain causal attention gives the stock model's logits and gradients: the rules' reference is the family's
    attention, not plain softmax attention."""
    stock = family_model(family, dtype=_family_dtype(family)).train()
    ids = torch.randint(0, stock.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    # Gemma-2's eager attention takes its softmax in fp32 (modeling_gemma2.eager_attention_forward), whatever the
    # model's dtype: against it the fp64 reference is exact to fp32 rounding only
    precision = torch.float32 if family == "gemma2" else stock.dtype
    reference = copy.deepcopy(stock)
    reference.config._attn_implementation = REFERENCE
    for m in attention_modules(reference):
        m.battery_rule = _causal_rule
        m.battery_family_rules = _family_rules(family, m.layer_idx)
    got, want = _run(reference, ids), _run(stock, ids)
    _assert_close(got, want, "logits", precision=precision)
    stock_params = dict(stock.named_parameters())
    for name, p in reference.named_parameters():
        _assert_close(p.grad, stock_params[name].grad, "grads", precision=precision, name=name)


# ---------------------------------------------------------------------------------------------- the battery


def _config_for(method: str):
    rule, settings = RULES[method]
    return METHODS[method].config_class(name=method, **settings) if method != "full" else \
        METHODS[method].config_class()


def _gates(model) -> dict[int, torch.Tensor]:
    return {m.layer_idx: m.duo_gate.gate.detach().clone() for m in attention_modules(model) if hasattr(m, "duo_gate")}


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, *, precision: torch.dtype | None = None,
                  name: str = "") -> None:
    """Logits or gradients equal up to the rounding of `precision` (the case's dtype unless given): fp64 cases
    agree to 1e-9 (gradients: rtol 1e-8, atol 1e-10); an fp32 comparison (GPT-OSS, whose experts run in fp32 only)
    rounds every matmul to fp32, so it allows fp32's rtol (1.3e-6) and an atol of 1e-5 of the largest entry
    (gradients here reach hundreds: a fixed atol would fail on rounding, not on a rule)."""
    precision = precision or got.dtype
    if precision == torch.float64:
        tolerance = {"rtol": 1e-9, "atol": 1e-9} if what == "logits" else {"rtol": 1e-8, "atol": 1e-10}
    else:
        assert precision == torch.float32, precision
        tolerance = {"rtol": 1.3e-6, "atol": 1e-5 * max(1.0, want.abs().max().item())}
    torch.testing.assert_close(got, want, **tolerance, msg=lambda text: f"{name or what}: {text}")


def _run(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
    (logits * weights).sum().backward()
    return logits.detach()


@pytest.mark.parametrize("method", sorted(RULES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_method_on_family(family, method, battery_verdict):
    stock = family_model(family, dtype=_family_dtype(family))
    ids = torch.randint(0, stock.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    hooks = method_for(_config_for(method))
    patched = copy.deepcopy(stock)
    facts = attention_facts(stock.config, stock)
    # what the model's attention adds and the method does not declare it computes
    dropped = facts.unsupported(**{feature: True for feature in hooks.attention_features})
    own = OWN_REFUSALS.get(method, {}).get(family)
    if own and not dropped:
        with pytest.raises(HeadwiseError, match=r"q_norm"):
            hooks.prepare_model(patched)
        battery_verdict(family, stock.config.model_type, f"method {method}", "refused", own)
        return
    if dropped:
        with pytest.raises(HeadwiseError):
            hooks.prepare_model(patched)
        battery_verdict(family, stock.config.model_type, f"method {method}", "refused", "; ".join(dropped))
        return
    hooks.prepare_model(patched)
    gates = _gates(patched)
    for layer, gate in gates.items():  # distinct gates per (layer, KV head), so the mix is checked, not 1.0
        next(m for m in attention_modules(patched) if m.layer_idx == layer).duo_gate.gate.data = \
            torch.linspace(0.2, 0.8, gate.numel(), dtype=gate.dtype) + 0.05 * layer

    reference = copy.deepcopy(stock)  # `full` is the model's own attention, whatever its family adds
    if method != "full":
        reference.config._attn_implementation = REFERENCE
    for m in attention_modules(reference):
        m.battery_rule = RULES[method][0]
        m.battery_family_rules = _family_rules(family, m.layer_idx)
        if gates:
            src = next(p for p in attention_modules(patched) if p.layer_idx == m.layer_idx)
            m.battery_gate = src.duo_gate.gate  # the same tensor: its gradient is compared below

    patched.train()
    reference.train()
    got = _run(patched, ids)
    gate_grads = {k: g.grad.clone() for k, g in ((m.layer_idx, m.duo_gate.gate) for m in attention_modules(patched)
                                                 if hasattr(m, "duo_gate"))}
    for m in attention_modules(patched):
        if hasattr(m, "duo_gate"):
            m.duo_gate.gate.grad = None
    want = _run(reference, ids)
    _assert_close(got, want, "logits")
    reference_params = dict(reference.named_parameters())
    compared = set()
    for name, p in patched.named_parameters():
        if "duo_gate" in name or p.grad is None:
            continue
        _assert_close(p.grad, reference_params[name].grad, "grads", name=name)
        compared.add(name)
    assert compared
    # the learned sinks are trained weights: their gradient must be there and compared, not skipped as None
    learned_sinks = {name for name in reference_params if name.endswith("self_attn.sinks")}
    assert bool(learned_sinks) == FAMILIES[family][4]
    assert learned_sinks <= compared, f"no gradient compared for {sorted(learned_sinks - compared)}"
    for m in attention_modules(reference):
        if hasattr(m, "battery_gate"):
            _assert_close(gate_grads[m.layer_idx], m.battery_gate.grad, "grads", name=f"layer {m.layer_idx} gate")

    patched.eval()
    expected = reference if method in CHANGES_THE_MODEL else stock
    expected.eval()
    with torch.no_grad():
        _assert_close(patched(input_ids=ids).logits, expected(input_ids=ids).logits, "logits", name="eval logits")
    battery_verdict(family, stock.config.model_type, f"method {method}", "matches")
