"""SF-Attn as a transformers attention function: shifted groups + sink tokens on `headwise.kernels`.

`layout_spec` maps the recipe block to the kernel layout; `sinklora_attention` is registered under
`ATTENTION_NAME` and runs in training (the model's SDPA in eval mode); packed samples (position ids
that restart, or TRL's `cu_seq_lens_q`) run every rule inside each sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from headwise.data_builders import cu_seqlens_from_position_ids
from headwise.kernels import LayoutSpec
from headwise.kernels.tensor_memo import LastTensorMemo
from headwise.patches.sinklora.config import SinkLoRAMethod
from headwise.patches.training_attention import attend, register_training_attention, training_attention

ATTENTION_NAME = "headwise_sinklora"


def layout_spec(cfg: SinkLoRAMethod, n_heads: int, seq_len: int):
    """The kernel layout of this config for `n_heads` query heads and sample length `seq_len`."""
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
    return cu_seqlens_from_position_ids(pos.expand(batch, -1))[0].to(pos.device)


@training_attention("sinklora")
def sinklora_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scaling: float | None, **kwargs: Any) -> torch.Tensor:
    """SF-Attn through `headwise.kernels.sparse_attention`: q `(B, Hq, T, D)`, k/v `(B, Hkv, T, D)` ->
    `(B, T, Hq, D)`, composed with the layer's own window, softcap and learned sinks (`attend`); eval mode runs
    the model's own attention (`training_attention`)."""
    cfg: SinkLoRAMethod = module.headwise_sinklora
    b, h, t, d = query.shape
    spec = layout_spec(cfg, h, t)
    cu = _packed_boundaries(kwargs, b, t)
    if cu is not None:
        flat = lambda x: x.transpose(0, 1).reshape(1, x.shape[1], b * t, d)  # noqa: E731  (B,H,T,D)->(1,H,B*T,D)
        out = attend(module, flat(query), flat(key), flat(value), spec, scaling, cu_seqlens=cu)
        return out.reshape(b, t, h, d)
    return attend(module, query, key, value, spec, scaling)


def register() -> None:
    """Register the attention function and its (flash-style, cheap) mask function. Idempotent."""
    register_training_attention(ATTENTION_NAME, sinklora_attention)
