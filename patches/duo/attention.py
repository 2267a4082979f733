"""The gated attention function: `gate * full + (1 - gate) * streaming` per KV group, in training.

Both terms are the layer's own attention (`attend`): on a sliding-window layer the full term is the model's
windowed attention and the streaming term is sink + recent within the window; a softcap and learned sinks enter
both."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from headwise.kernels import LayoutSpec
from headwise.patches.duo.gates import GATE_MODULE, DuoState
from headwise.patches.training_attention import RULES_ATTRIBUTE, attend, register_training_attention, training_attention

ATTENTION_NAME = "headwise_duo"  # neutral: no flash/sdpa/flex_attention in the name


def _full_attention(module, query, key, value, scaling):
    """The layer's own attention (B, Hq, T, D) x (B, Hkv, T, D) -> (B, T, Hq, D), no gradient: SDPA's causal
    kernel for plain causal attention, else the causal layout composed with the layer's rules."""
    rules = getattr(module, RULES_ATTRIBUTE)
    with torch.no_grad():
        if rules.window is None and rules.softcap is None and not rules.learned_sinks:
            g = query.shape[1] // key.shape[1]
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=g > 1)
            return out.transpose(1, 2).contiguous()
        return attend(module, query, key, value, LayoutSpec("dense"), scaling)


@training_attention("duo")
def duo_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: float | None, **kwargs: Any) -> torch.Tensor:
    """`gate * full + (1 - gate) * streaming` per KV group, q `(B, Hq, T, D)`, k/v `(B, Hkv, T, D)` ->
    `(B, T, Hq, D)` (see the package docstring); eval mode runs the model's SDPA (`training_attention`)."""
    state: DuoState = module.headwise_duo
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    scale = scaling if scaling is not None else d**-0.5

    if state.mode == "teacher":
        full = _full_attention(module, query, key, value, scale)
        state.stash[module.layer_idx] = full
        return full

    full = state.stash.get(module.layer_idx) if state.use_stash else None
    if full is None or full.shape != (b, t, hq, d):
        full = _full_attention(module, query, key, value, scale)  # no teacher pass: the module's own, detached
    cfg = state.config
    stream = attend(module, query, key, value, LayoutSpec("streaming", sink=cfg.sink, recent=cfg.recent), scale)
    mix = torch.promote_types(query.dtype, torch.float32)  # fp32 for 16-bit models, the model's dtype above it
    gate = getattr(module, GATE_MODULE).values().to(query.device, mix)
    gate = gate.repeat_interleave(hq // hkv).view(1, 1, hq, 1)  # a KV head's gate covers its query heads
    out = gate * full.to(mix) + (1.0 - gate) * stream.to(mix)
    return out.to(query.dtype).contiguous()


def register() -> None:
    """Register the attention function and its flash-style mask function (None or a (B, T) mask). Idempotent."""
    register_training_attention(ATTENTION_NAME, duo_attention)


def _reset_per_forward(state: DuoState):
    def reset(model: torch.nn.Module) -> None:
        state.mode, state.use_stash = "student", False  # a direct model call never reuses a teacher pass
        state.stash.clear()

    return reset
