"""MoH as a transformers attention function: the routed heads' attention, then the router's per-token gates.

Two forms compute the same outputs and gradients (`MoHMethod.compute`):

- gathered (the default where it applies): the shared heads run the model's causal attention over every token
  (SDPA), and each routed head runs only the query rows of the tokens that chose it, against all keys
  (`headwise.kernels.gathered_query_attention`); unchosen rows are exact zeros with no gradient, so the attention
  work falls with the activation ratio. It needs the kernel (CUDA, or Triton's interpreter) and a plain causal
  mask (transformers hands no mask: no padding, no packed sequences, no window shorter than the sequence), and
  the query and key lengths equal (training, a prefill without a cache);
- masking (everywhere else, and what every released MoH model computes): every head runs through the model's
  own SDPA with transformers' mask (padding, packed sequences, a layer's sliding window, a KV cache), and the
  unchosen ones are multiplied by zero.

Gating happens here, before `o_proj`, in training and in eval alike: a MoH model is a different model, so eval
and `generate` run it too. The layer's balance loss and head usage are recorded while training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from headwise.kernels.interpreter import interpret_mode
from headwise.patches.moh.config import MoHMethod, head_split
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
        if layer in self.balance:
            # activation checkpointing's recompute in the backward runs the layer again: the loss has been taken,
            # and keeping the recomputed graph alive until the next forward would only hold memory
            return
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
    gates, chosen_heads = moh_head_gates(module, query, key.shape[1])
    if gathered_applies(state.config, query, key, attention_mask, dropout):
        split = head_split(state.config, query.shape[1], key.shape[1])
        out = gathered_attention(query, key, value, chosen_heads, split.n_shared * split.group, scaling)
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                        **kwargs)
    return (out * gates.to(out.dtype).unsqueeze(-1)).contiguous(), None


def moh_head_gates(module: torch.nn.Module, query: torch.Tensor, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's decision for one layer's call: gates `(B, T, Hq)` and the heads each token uses, `chosen_heads
    (B, T, Hq)` bool (shared heads always). `query (B, Hq, T, D)`. While the module trains, the layer's balance loss
    and head usage are recorded. Also what a decode-time cache's attention applies (`headwise.inference.attention`):
    a KV head none of whose query heads is chosen needs no K/V reads."""
    state: MoHState = module.headwise_moh
    logits = None
    if state.config.router == "learned":
        logits = getattr(module, ROUTER_MODULE)(getattr(module, HIDDEN_ATTRIBUTE))
    gates, probs, chosen = moh_gates(state.config, query, logits, n_kv_heads=n_kv_heads)
    if module.training:
        state.record(module.layer_idx, balance_loss(probs, chosen), chosen)
    split = head_split(state.config, query.shape[1], n_kv_heads)
    chosen_heads = torch.cat([chosen.new_ones(*chosen.shape[:2], split.n_shared * split.group),
                              chosen.repeat_interleave(split.group, dim=-1)], dim=-1)
    return gates, chosen_heads


def gathered_applies(config: MoHMethod, query: torch.Tensor, key: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float) -> bool:
    """Whether the gathered form computes exactly this call: the kernel can run, transformers handed no mask (so
    the attention is plain causal: SDPA's `is_causal` case), no cache (equal lengths) and no attention dropout."""
    return (config.compute == "gathered" and (query.is_cuda or interpret_mode()) and attention_mask is None
            and query.shape[2] == key.shape[2] > 1 and not dropout)


def gathered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chosen_heads: torch.Tensor,
                       n_shared_heads: int, scaling: float | None) -> torch.Tensor:
    """q `(B, Hq, T, D)`, k/v `(B, Hkv, T, D)`, `chosen_heads (B, T, Hq)` bool -> `(B, T, Hq, D)`, zero where a
    head was not chosen. The shared heads (the first `n_shared_heads`, every token) run SDPA's causal attention
    when they fill whole KV groups; every other head runs the gathered-query kernel on its chosen rows."""
    from headwise.kernels import gathered_query_attention, gathered_rows  # Triton: imported where it runs

    group = query.shape[1] // key.shape[1]
    shared = n_shared_heads if n_shared_heads % group == 0 else 0
    parts = []
    if shared:
        kv = shared // group
        dense = F.scaled_dot_product_attention(query[:, :shared], key[:, :kv], value[:, :kv], is_causal=True,
                                               scale=scaling, enable_gqa=group > 1)
        parts.append(dense.transpose(1, 2))
    if shared < query.shape[1]:
        kv = shared // group
        rows, counts = gathered_rows(chosen_heads[..., shared:])
        parts.append(gathered_query_attention(query[:, shared:], key[:, kv:], value[:, kv:], rows, counts,
                                              scale=scaling))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


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
