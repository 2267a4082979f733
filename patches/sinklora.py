"""SinkLoRA's SF-Attn (shifted groups + sink tokens) and LongLoRA's S2-Attn (`sinks: 0`).

Which reading of the papers this implements, and why
----------------------------------------------------
SinkLoRA's released code contains none of SinkLoRA's own parts (see
`research/sinklora_longlora.md` §0), so SF-Attn is rebuilt from the paper's prose, as the dossier's
§2.4 reconstruction ("SF-Attn (reconstructed)"):

- Groups of `G` tokens (`G = ceil(T * group_ratio)` rounded up to the kernel block, or
  `group_size`); the lower half of the query heads uses groups `[0, G), [G, 2G), ...`, the upper
  half groups shifted by `G/2`: `[0, G/2), [G/2, 3G/2), ...`. **No wrap-around.** LongLoRA's eager
  path rolls the shifted heads with wrap, which lets the first `G/2` tokens of those heads see the
  end of the sequence (future tokens under a causal LM); its flash path and our reading of
  SinkLoRA's "Segmentation & Reassembly" (which returns the shifted groups to "their un-shifted
  state", removing the "information leaking") both avoid it. We follow the flash path / S&R reading.
- Sink tokens: the first `sinks` (4) tokens are visible to every query (StreamingLLM's attention
  sinks). The paper's formula also lets the sinks see every token; taken literally that leaks the
  future into a causal LM (every token reads the sinks), so we keep causality: sinks see what
  causality allows, which the group rule already gives. The paper is ambiguous about whether sinks
  are *added* tokens or the first existing ones; its prose says existing, which we follow.
- `sinks: 0` is LongLoRA's S2-Attn exactly as its flash-attn path computes it.

Sequence lengths: any. The last group of each head may be shorter than `G` (the tail is simply a
smaller group); shifted heads start with a half group. With packed sequences (position ids that
restart, or TRL's `cu_seq_lens_q`), every rule applies inside each sequence, never across, and `G`
is computed from the sample length `T` (as LongLoRA computes it from the training length), so all
documents of a run use the same group size.

Training only: in eval mode the model runs its own SDPA attention (full attention, as both papers
evaluate), switched by a forward pre-hook on the model, so `model.eval()` / `generate` are exactly
the stock model.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from headwise.errors import HeadwiseError
from headwise.kernels.tensor_memo import LastTensorMemo
from headwise.methods import Method, register_method
from headwise.patches.training_attention import (
    check_patchable,
    check_training_call,
    eval_sdpa,
    install_training_attention,
    register_training_attention,
)
from headwise.schema_base import Section

logger = logging.getLogger(__name__)

ATTENTION_NAME = "headwise_sinklora"


class SinkLoRAMethod(Section):
    """Recipe block `method: {name: sinklora, ...}`."""

    name: Literal["sinklora"] = Field("sinklora", description="`sinklora`: shifted-group sparse attention + sink tokens (SF-Attn).")
    group_ratio: float = Field(0.25, gt=0, le=1, description="Group length as a fraction of the training length (LongLoRA: 1/4).")
    group_size: int | None = Field(None, gt=1, description="Fixed group length in tokens (even); overrides group_ratio.")
    sinks: int = Field(4, ge=0, description="Leading tokens visible to every query; 0 is LongLoRA's S2-Attn.")
    shifted_heads: Literal["upper_half", "none"] = Field(
        "upper_half", description="Heads whose groups are shifted by half a group (no wrap-around)."
    )
    train_embeddings_and_norms: bool = Field(
        True, description="LongLoRA's LoRA+: also train the embeddings and all norms (saved with the adapter)."
    )

    @model_validator(mode="after")
    def _even_group(self) -> "SinkLoRAMethod":
        if self.group_size is not None and self.group_size % 2:
            raise ValueError(f"group_size must be even (shifted heads move by G/2), got {self.group_size}")
        return self


def layout_spec(cfg: SinkLoRAMethod, n_heads: int, seq_len: int):
    """The kernel layout of this config for `n_heads` query heads and sample length `seq_len`."""
    from headwise.kernels import LayoutSpec

    shifted = tuple(range(n_heads // 2, n_heads)) if cfg.shifted_heads == "upper_half" else ()
    if cfg.group_size is not None:
        spec = LayoutSpec("shifted_groups", group_size=cfg.group_size, sink=cfg.sinks, shifted_heads=shifted)
    else:
        spec = LayoutSpec("shifted_groups", group_ratio=cfg.group_ratio, sink=cfg.sinks, shifted_heads=shifted)
    return spec.resolve(seq_len)


# The host sync that decides "one sequence or several" runs once per position_ids tensor (every layer
# of a forward, and the gradient-checkpointing recompute, gets the same one), not once per layer call.
_PACKING_SEEN = LastTensorMemo()


def _packed_boundaries(kwargs: dict[str, Any], batch: int, seq_len: int) -> torch.Tensor | None:
    """cu_seqlens over the flattened batch when the sample holds several sequences, else None."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(torch.int32)
    pos = kwargs.get("position_ids")
    if pos is None or pos.shape[-1] != seq_len:
        return None
    return _PACKING_SEEN.get(pos, batch, lambda: _boundaries_from_positions(pos.reshape(-1, seq_len), batch))


def _boundaries_from_positions(pos: torch.Tensor, batch: int) -> torch.Tensor | None:
    if pos.shape[0] == 1 and not bool((pos[0, 1:] == 0).any()):
        return None  # one sequence
    from headwise.data_builders import cu_seqlens_from_position_ids

    return cu_seqlens_from_position_ids(pos.expand(batch, -1))[0].to(pos.device)


def sinklora_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q `(B, Hq, T, D)`, k/v `(B, Hkv, T, D)` -> `(B, T, Hq, D)`.

    Training: SF-Attn through `headwise.kernels.sparse_attention`. Eval: the model's SDPA.
    `attention_mask` is transformers' flash-style mask (None, or a 2D `(B, T)` padding mask).
    """
    if not module.training:
        return eval_sdpa("sinklora", module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    from headwise.kernels import sparse_attention

    cfg: SinkLoRAMethod = module.headwise_sinklora
    b, h, t, d = query.shape
    check_training_call("sinklora", query, key, attention_mask, dropout)
    spec = layout_spec(cfg, h, t)
    cu = _packed_boundaries(kwargs, b, t)
    if cu is not None:
        flat = lambda x: x.transpose(0, 1).reshape(1, x.shape[1], b * t, d)  # noqa: E731  (B,H,T,D)->(1,H,B*T,D)
        out = sparse_attention(flat(query), flat(key), flat(value), spec, scale=scaling, cu_seqlens=cu)
        return out.reshape(b, t, h, d), None
    return sparse_attention(query, key, value, spec, scale=scaling), None


def register() -> None:
    """Register the attention function and its (flash-style, cheap) mask function. Idempotent."""
    register_training_attention(ATTENTION_NAME, sinklora_attention)


@register_method
class SinkLoRA(Method):
    """Hooks of `method: sinklora` (see the module docstring for the algorithm)."""

    name = "sinklora"
    config: SinkLoRAMethod

    def check_model_config(self, model_config: Any) -> None:
        model_type = getattr(model_config, "model_type", "?")
        if getattr(model_config, "use_sliding_window", False) and getattr(model_config, "sliding_window", None):
            raise HeadwiseError(f"method sinklora: {model_type} uses sliding-window attention layers, which SF-Attn would override; disable use_sliding_window")
        if getattr(model_config, "attn_logit_softcapping", None):
            raise HeadwiseError(f"method sinklora: {model_type} uses attention logit soft-capping, which the sparse kernels do not implement")
        if not getattr(model_config, "num_attention_heads", 0) or getattr(model_config, "num_attention_heads") < 2:
            raise HeadwiseError("method sinklora needs at least 2 attention heads (half of them are shifted)")

    def prepare_model(self, model: torch.nn.Module) -> None:
        check_patchable(model, "sinklora")
        register()
        # The config rides on each attention module (not on model.config, which is serialised).
        for m in model.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "q_proj"):
                m.headwise_sinklora = self.config
        install_training_attention(model, ATTENTION_NAME)

    def modules_to_save(self) -> list[str]:
        return ["embed_tokens", "norm"] if self.config.train_embeddings_and_norms else []
