"""Causal-LM loss without materialising full-sequence logits.

At 64K tokens and a 128K vocabulary, bf16 logits alone take 16 GiB and their fp32 softmax twice
that; the loss of long-context training must never hold them. Two ways:

- `chunked`: split the final hidden states into chunks of `chunk_size` tokens; each chunk's
  `lm_head` projection + cross-entropy runs under `torch.utils.checkpoint`, so only one chunk's
  logits exist at a time, in forward and in backward. Pure torch, any device.
- `liger`: Liger-Kernel's fused linear cross-entropy (Triton, CUDA), which also never writes the
  logits out.

Both take the final (post-norm) hidden states, which the model returns when called with
`output_hidden_states=True` and `logits_to_keep=<empty index tensor>` (so its own head computes a
`(B, 0, V)` tensor: nothing). That keeps the call on the top-level model, so DeepSpeed/DDP wrappers
and PEFT see an ordinary forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from headwise.errors import HeadwiseError

IGNORE_INDEX = -100


def _chunk_ce_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The loss runs outside the model's forward, so outside the autocast that mixed precision wraps
    # it in: with a trained fp32 final norm (LoRA+) the hidden states are fp32 while the head stays bf16.
    weight_dtype = next(lm_head.parameters()).dtype
    logits = lm_head(hidden if hidden.dtype == weight_dtype or not weight_dtype.is_floating_point else hidden.to(weight_dtype))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # fp32 softmax: a bf16 log-sum-exp over 100K+ classes loses ~2 digits
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with hidden states: position t predicts token t+1; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    *,
    chunk_size: int = 4096,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy computed chunk by chunk.

    hidden: (B, T, d) final hidden states; labels: (B, T) unshifted (as passed to the model);
    lm_head: the output projection, called as a module per chunk (so PEFT wrappers and ZeRO-3's
    parameter gathering hooks work). Returns the same value as the model's own
    loss (sum over valid tokens / number of valid tokens, or / `num_items_in_batch` when given).
    """
    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = flat.new_zeros((), dtype=torch.promote_types(flat.dtype, torch.float32))
    for start in range(0, flat.shape[0], chunk_size):
        h, y = flat[start : start + chunk_size], targets[start : start + chunk_size]
        if not (y != IGNORE_INDEX).any():
            continue
        total = total + checkpoint(_chunk_ce_sum, lm_head, h, y, use_reentrant=False)
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return total / torch.as_tensor(denom, device=total.device).clamp(min=1)


def liger_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy (CUDA only)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = liger_fused_linear_cross_entropy(
        flat, lm_head.weight, targets, bias=lm_head.bias, ignore_index=IGNORE_INDEX, reduction=reduction
    )
    if isinstance(loss, tuple):  # newer Liger returns (loss, extras...) when extras are requested
        loss = loss[0]
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


def resolve_fused_loss(mode: str, device_type: str) -> Callable | None:
    """The loss function a recipe's `training.fused_cross_entropy` selects (None: the model's own)."""
    if mode == "off":
        return None
    if mode == "auto":
        # The chunked loss is the one verified on every device (tests compare it with the model's own
        # loss and gradients); Liger's kernel stays opt-in until it is measured on our GPU runs.
        return chunked_lm_loss
    if mode == "liger":
        if device_type != "cuda":
            raise HeadwiseError("training.fused_cross_entropy `liger` needs a CUDA GPU; use `chunked` (or `auto`) on CPU")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise HeadwiseError("training.fused_cross_entropy `liger` needs liger-kernel: pip install 'headwise[liger]'") from None
        return liger_lm_loss
    return chunked_lm_loss
