"""A model's own attention, read once from its config (and, when at hand, its modules): what every method and
KV policy must compose with or refuse.

Per layer: full causal attention or a sliding window of `w` tokens (a query at `q` sees keys `q - k < w`).
For the model: a logit softcap `c` (scores become `c * tanh(s / c)` before the softmax), learned sink logits
(one per head, in the softmax denominator without a value), the projection layout (separate `q_proj`/`k_proj`/
`v_proj`, or one fused `qkv_proj`), head counts and head dim.

Families spell these differently; this module is the one place that knows how:

- sliding window: `layer_types` (`"sliding_attention"` layers, window `sliding_window`: Gemma-2/3, GPT-OSS,
  Qwen2/3 with `use_sliding_window`), else `sliding_window` alone on every layer (Mistral: 4096 in
  Mistral-7B-v0.1's config), unless `use_sliding_window` is false (older Qwen2 configs);
- softcap: `attn_logit_softcapping` (Gemma-2);
- learned sinks: a `sinks` parameter on the attention modules (GPT-OSS's `s_aux`), or the family when only
  the config is at hand;
- fused projections: a `qkv_proj` module without `q_proj` (Phi-3), or the family when only the config is at hand.

It sits at the bottom of `headwise.patches` so a method can consult it on the Python path (`prepare_model`)
as the core does on the recipe path (`headwise.models.attention_facts`), without importing the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from headwise.patches.base import HeadwiseError

# Families known from their config alone (the modules, when given, are the ground truth).
LEARNED_SINK_FAMILIES = ("gpt_oss",)
FUSED_QKV_FAMILIES = ("phi3",)


@dataclass(frozen=True)
class LayerRules:
    """What one layer's attention adds to causal softmax attention: the rules a training patch composes with."""

    window: int | None  # keys with q - k < window only
    softcap: float | None  # scores c * tanh(s / c)
    learned_sinks: bool  # the module's `sinks` logits join the softmax denominator


@dataclass(frozen=True)
class AttentionFacts:
    """What a model's attention computes besides plain causal softmax attention."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None
    windows: tuple[int | None, ...]  # per layer: the sliding window in tokens, None for full attention
    softcap: float | None
    learned_sinks: bool
    projections: Literal["separate", "fused"]

    def layer_rules(self, layer: int) -> LayerRules:
        return LayerRules(self.windows[layer], self.softcap, self.learned_sinks)

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.windows) if w is not None]

    def unsupported(self, *, sliding_window: bool = False, softcap: bool = False, learned_sinks: bool = False,
                    fused_projections: bool = False) -> list[str]:
        """The features of this model that a consumer supporting only the flagged ones would drop, in words
        (empty: it computes exactly what the model does)."""
        found = []
        if self.sliding_layers and not sliding_window:
            layers = self.sliding_layers
            which = ("every layer" if len(layers) == self.num_layers else
                     f"layer {layers[0]}" if len(layers) == 1 else f"layers {_layer_list(layers)}")
            found.append(f"sliding-window attention ({self.windows[layers[0]]} tokens on {which})")
        if self.softcap is not None and not softcap:
            found.append(f"attention logit soft-capping ({self.softcap:g})")
        if self.learned_sinks and not learned_sinks:
            found.append("learned attention-sink logits")
        if self.projections == "fused" and not fused_projections:
            found.append("a fused qkv_proj projection")
        return found


def refuse_unsupported_attention(facts: AttentionFacts, consumer: str, way_out: str, **supported: bool) -> None:
    """Raise one HeadwiseError naming the model type, every feature of its attention that `consumer` would drop
    (the keyword flags of `AttentionFacts.unsupported` say what it implements) and the way out."""
    dropped = facts.unsupported(**supported)
    if dropped:
        raise HeadwiseError(f"{consumer}: {facts.model_type} uses {' and '.join(dropped)}, which {consumer} does not "
                            f"implement (it would compute something else than the model); {way_out}")


def _layer_list(layers: list[int]) -> str:
    shown = ", ".join(map(str, layers[:6]))
    return shown + (f", ... ({len(layers)} in all)" if len(layers) > 6 else "")


def text_config(config: Any) -> Any:
    """The language model's config of a (possibly multimodal) model config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_facts(config: Any, model: torch.nn.Module | None = None) -> AttentionFacts:
    """Read a model's attention facts from its config, and from its attention modules when `model` is given."""
    config = text_config(config)
    model_type = getattr(config, "model_type", "?") or "?"
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    n_heads = int(getattr(config, "num_attention_heads", 0) or 0)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", 0) // n_heads if n_heads else None)
    return AttentionFacts(
        model_type=model_type, num_layers=n_layers, num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
        windows=_windows(config, n_layers), softcap=getattr(config, "attn_logit_softcapping", None) or None,
        learned_sinks=_learned_sinks(model_type, model), projections=_projections(model_type, model),
    )


def _windows(config: Any, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return (int(window),) * n_layers
    return (None,) * n_layers


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a model, in layer order: the modules with an integer `layer_idx` and an output
    projection `o_proj` (what every attention block of the transformers families has, whatever its q/k/v
    projections are called)."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "o_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _learned_sinks(model_type: str, model: torch.nn.Module | None) -> bool:
    if model is not None and attention_modules(model):
        return any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in attention_modules(model))
    return model_type in LEARNED_SINK_FAMILIES


def _projections(model_type: str, model: torch.nn.Module | None) -> Literal["separate", "fused"]:
    if model is not None and attention_modules(model):
        fused = any(hasattr(m, "qkv_proj") and not hasattr(m, "q_proj") for m in attention_modules(model))
        return "fused" if fused else "separate"
    return "fused" if model_type in FUSED_QKV_FAMILIES else "separate"
