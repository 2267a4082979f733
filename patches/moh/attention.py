"""MoH as a transformers attention function: every head's attention, then the router's per-token gates.

This is the masking form (what every released MoH model computes): all heads run, unselected ones are multiplied
by zero before `o_proj`. Attention itself is the model's own SDPA with transformers' mask (causal, padding,
packed sequences, a layer's sliding window), in training and in eval alike: a MoH model is a different model, so
eval and `generate` run it too. The layer's balance loss and head usage are recorded while training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from headwise.patches.moh.config import MoHMethod
from headwise.patches.moh.routers import balance_loss, moh_gates

ATTENTION_NAME = "headwise_moh"  # neutral: no flash/sdpa/flex_attention in the name
ROUTER_MODULE = "moh_router"  # the learned router's submodule on each attention module
HIDDEN_ATTRIBUTE = "_headwise_moh_hidden"  # the attention module's input, for the learned router


@dataclass
class MoHState:
    """Shared by every layer of one model: the config; per training forward, each layer's balance loss (with its
    graph, for the loss); and, since the last `take_usage`, how many tokens chose each routed unit per layer."""

    config: MoHMethod
    balance: dict[int, torch.Tensor] = field(default_factory=dict)
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (R,) token counts, summed
    tokens: dict[int, int] = field(default_factory=dict)  # layer -> tokens counted

    def clear(self) -> None:
        self.balance.clear()

    def record(self, layer: int, loss: torch.Tensor, chosen: torch.Tensor) -> None:
        self.balance[layer] = loss
        # on the model's device: a host copy here would sync the GPU on every layer of every step
        counts = chosen.reshape(-1, chosen.shape[-1]).sum(dim=0).detach().float()
        self.chosen[layer] = self.chosen[layer] + counts if layer in self.chosen else counts
        self.tokens[layer] = self.tokens.get(layer, 0) + chosen.reshape(-1, chosen.shape[-1]).shape[0]

    def take_usage(self) -> dict[int, torch.Tensor]:
        """Per layer, the share of tokens that chose each routed unit since the last call; resets the counts."""
        shares = {layer: self.chosen[layer].cpu() / max(1, self.tokens[layer]) for layer in sorted(self.chosen)}
        self.chosen.clear()
        self.tokens.clear()
        return shares


def moh_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """q `(B, Hq, T, D)`, k/v `(B, Hkv, S, D)` (S >= T with a cache) -> `(B, T, Hq, D)`: each head's output times
    its gate for the token."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # loaded with the model

    state: MoHState = module.headwise_moh
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    logits = None
    if state.config.router == "learned":
        logits = getattr(module, ROUTER_MODULE)(getattr(module, HIDDEN_ATTRIBUTE))
    gates, probs, chosen = moh_gates(state.config, query, logits, n_kv_heads=key.shape[1])
    if module.training:
        state.record(module.layer_idx, balance_loss(probs, chosen), chosen)
    return (out * gates.to(out.dtype).unsqueeze(-1)).contiguous(), None


def register() -> None:
    """Register the attention function with transformers' SDPA mask function (4D masks: padding, packing and
    sliding windows reach SDPA). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, moh_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def capture_hidden(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attention module: keep its input for the learned router."""
    setattr(module, HIDDEN_ATTRIBUTE, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
