"""The method battery: every registered method on every model family, against an independent fp64 reference.

For each (family, method): a family whose attention the method implements must give, in training mode, the
logits and gradients of the same weights run with a masked fp64 attention written here from the semantics
(docs/kernels.md, "Layout semantics"; DuoAttention's gate mix), and in eval mode the stock model's logits; a
family whose attention adds a rule the method lacks must be refused before anything is patched
(tests/patches/test_model_attention.py checks the message). No case is skipped, and a registered method
without a reference rule here fails the battery, so a new method joins it by registering and writing its rule.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headwise.errors import HeadwiseError
from headwise.patches import METHODS
from headwise.patches.base import method_for
from headwise.patches.model_attention import attention_facts, attention_modules
from model_families import EXACT, FAMILIES, family_model

T = 24  # tokens per sample: three SinkLoRA groups of 8, longer than Duo's sink + recent
REFERENCE = "headwise_battery_reference"


def _causal(t: int) -> torch.Tensor:
    q = torch.arange(t).view(-1, 1)
    k = torch.arange(t).view(1, -1)
    return k <= q


def _masked_softmax_attention(q, k, v, allowed, scaling):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D), allowed (Hq, T, T) or (T, T) -> (B, Hq, T, D), fp64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


# ----------------------------------------------------------------------------------------- the rules, per method


def full_rule(module, q, k, v, scaling):
    """`full` leaves the model's attention alone: its reference is the stock model (this rule is unused)."""
    raise AssertionError("the full method is compared with the stock model")


SF = {"group_size": 8, "sinks": 2}


def sinklora_rule(module, q, k, v, scaling):
    """Shifted groups G with sinks s: k < s or grp_h(q) == grp_h(k), grp_h(x) = x // G for the lower half of the
    heads and (x + G // 2) // G for the upper half (no wrap-around)."""
    hq, t = q.shape[1], q.shape[2]
    g, s = SF["group_size"], SF["sinks"]
    pos = torch.arange(t)
    allowed = torch.zeros(hq, t, t, dtype=torch.bool)
    for h in range(hq):
        shift = g // 2 if h >= hq // 2 else 0
        grp = (pos + shift) // g
        allowed[h] = _causal(t) & ((pos.view(1, -1) < s) | (grp.view(-1, 1) == grp.view(1, -1)))
    return _masked_softmax_attention(q, k, v, allowed, scaling)


DUO = {"sink": 2, "recent": 6}


def duo_rule(module, q, k, v, scaling):
    """gate * full + (1 - gate) * streaming per KV group; streaming: k < sink or q - k < recent; the full term is
    the frozen model's attention (no gradient through it)."""
    t = q.shape[2]
    pos = torch.arange(t)
    stream_allowed = _causal(t) & ((pos.view(1, -1) < DUO["sink"]) | (pos.view(-1, 1) - pos.view(1, -1) < DUO["recent"]))
    full = _masked_softmax_attention(q, k, v, _causal(t), scaling).detach()
    stream = _masked_softmax_attention(q, k, v, stream_allowed, scaling)
    gate = module.battery_gate.double().repeat_interleave(q.shape[1] // k.shape[1]).view(1, -1, 1, 1)
    return gate * full + (1 - gate) * stream


RULES: dict[str, tuple[Callable, dict]] = {"full": (full_rule, {}), "sinklora": (sinklora_rule, SF),
                                           "duo": (duo_rule, DUO)}


def _reference_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = module.battery_rule(module, query, key, value, scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def test_every_registered_method_has_a_reference_rule():
    assert set(METHODS) == set(RULES)


# ---------------------------------------------------------------------------------------------- the battery


def _config_for(method: str):
    rule, settings = RULES[method]
    return METHODS[method].config_class(name=method, **settings) if method != "full" else \
        METHODS[method].config_class()


def _gates(model) -> dict[int, torch.Tensor]:
    return {m.layer_idx: m.duo_gate.gate.detach().clone() for m in attention_modules(model) if hasattr(m, "duo_gate")}


def _run(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
    (logits * weights).sum().backward()
    return logits.detach()


@pytest.mark.parametrize("method", sorted(RULES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_method_on_family(family, method, battery_verdict):
    # fp64 throughout, except GPT-OSS, whose expert matmul (grouped_mm) takes 32 bits at most
    stock = family_model(family, dtype=torch.float32 if family == "gpt_oss" else torch.float64)
    ids = torch.randint(0, stock.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    hooks = method_for(_config_for(method))
    patched = copy.deepcopy(stock)
    exact = not attention_facts(stock.config, stock).unsupported(fused_projections=True) or method == "full"
    facts = attention_facts(stock.config, stock)
    if not exact:
        with pytest.raises(HeadwiseError):
            hooks.prepare_model(patched)
        battery_verdict(family, stock.config.model_type, f"method {method}", "refused",
                        "; ".join(facts.unsupported(fused_projections=True)))
        return
    assert family in EXACT or facts.projections == "fused" or method == "full"
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
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    reference_params = dict(reference.named_parameters())
    compared = 0
    for name, p in patched.named_parameters():
        if "duo_gate" in name or p.grad is None:
            continue
        torch.testing.assert_close(p.grad, reference_params[name].grad, rtol=1e-8, atol=1e-10)
        compared += 1
    assert compared > 0
    for m in attention_modules(reference):
        if hasattr(m, "battery_gate"):
            torch.testing.assert_close(gate_grads[m.layer_idx], m.battery_gate.grad, rtol=1e-8, atol=1e-10)

    patched.eval()
    stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-9, atol=1e-9)
    battery_verdict(family, stock.config.model_type, f"method {method}", "matches")
