"""Causal-LM loss without materialising full-sequence logits.

At 64K tokens and a 128K vocabulary, bf16 logits alone take 16 GiB and their fp32 softmax twice
that; the loss of long-context training must never hold them. Two ways:

- `chunked`: split the final hidden states into chunks of `chunk_size` tokens, so only one chunk's
  logits exist at a time. Pure torch, any device. When the output head is a plain `nn.Linear`, each
  chunk's gradient is computed in the forward, as Liger's fused kernel does (`_LinearCrossEntropy`):
  the backward then only scales stored gradients, instead of recomputing the logits (one lm_head
  matmul per token, 34 TFLOP per step at 32K on a 128K vocabulary) and their softmax. Under ZeRO-3
  a frozen head's weight is gathered for that call. A PEFT-wrapped head (its own forward adds
  adapters), or a trained head under ZeRO-3, runs each chunk's projection + cross-entropy under
  `torch.utils.checkpoint` through the module call instead (reentrant under ZeRO-3).
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


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of next-token cross-entropy over `targets` of `hidden @ weight.T + bias`, chunk by chunk,
    with the gradients computed in the forward.

    hidden: (N, d); weight: (V, d); bias: (V,) or None; targets: (N,) with IGNORE_INDEX where no loss.
    Saved for the backward: d(loss)/d(hidden) (N, d) in hidden's dtype and, when the weight or bias
    trains, their fp32 gradients; the backward multiplies them by the incoming scalar gradient. The
    logits are fp32 at least (a bf16 log-sum-exp over 100K+ classes loses ~2 digits), as in `_chunk_ce_sum`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits (fp64 stays fp64, for tests)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            y = targets[start : start + chunk_size]
            valid = y != IGNORE_INDEX
            rows = valid.nonzero().squeeze(1)  # one host sync per chunk, which also tells an all-ignored chunk
            if not rows.numel():
                continue
            y_rows = y[rows]
            # the head's dtype, as the module call would (a trained fp32 final norm feeds a bf16 head)
            h = hidden[start : start + chunk_size].to(weight.dtype)
            logits = F.linear(h, weight, None if bias is None else bias.to(h.dtype)).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits[rows, y_rows]
            total += (lse[rows] - picked).sum()
            # d(sum of losses)/d(logits) = softmax - one-hot on valid rows, 0 elsewhere (in place: the
            # fp32 logits become their gradient, so a chunk holds one (chunk, V) fp32 buffer)
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits[rows, y_rows] -= 1
            dlogits[~valid] = 0
            if grad_h is not None:
                grad_h[start : start + chunk_size] = (dlogits.to(h.dtype) @ weight).to(grad_h.dtype)
            if grad_w is not None:
                grad_w += dlogits.T @ h.to(acc)
            if grad_b is not None:
                grad_b += dlogits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        g = grad_total
        return (
            None if grad_h is None else grad_h * g.to(grad_h.dtype),
            None if grad_w is None else (grad_w * g).to(w_dtype),
            None if grad_b is None else (grad_b * g).to(b_dtype),
            None,
            None,
        )


def _zero3_partitioned(lm_head: torch.nn.Module) -> bool:
    return any(hasattr(prm, "ds_id") for prm in lm_head.parameters())


def _fused_linear_ce(flat, lm_head, targets, chunk_size):
    """`_LinearCrossEntropy` on a plain Linear head; a (frozen) ZeRO-3 head is gathered for the call."""
    if not _zero3_partitioned(lm_head):
        return _LinearCrossEntropy.apply(flat, lm_head.weight, lm_head.bias, targets, chunk_size)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(lm_head.parameters()), modifier_rank=None):
        return _LinearCrossEntropy.apply(flat, lm_head.weight, lm_head.bias, targets, chunk_size)


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
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    zero3 = _zero3_partitioned(lm_head)
    # A plain Linear head (not a PEFT wrapper, whose forward adds adapters) gets its gradients in the
    # forward. Under ZeRO-3 only a frozen one: a trained partitioned head's gradient must reach
    # DeepSpeed's reduction hooks through the module's own autograd path.
    if type(lm_head) is torch.nn.Linear and not (zero3 and any(prm.requires_grad for prm in lm_head.parameters())):
        total = _fused_linear_ce(flat, lm_head, targets, chunk_size)
        return total / torch.as_tensor(denom, device=total.device).clamp(min=1)
    total = flat.new_zeros((), dtype=torch.promote_types(flat.dtype, torch.float32))
    for start in range(0, flat.shape[0], chunk_size):
        h, y = flat[start : start + chunk_size], targets[start : start + chunk_size]
        if not (y != IGNORE_INDEX).any():
            continue
        # Under ZeRO-3 the reentrant form: its recompute is an ordinary forward, in which ZeRO-3's hooks
        # gather the head; the non-reentrant recompute inside the backward sees the partition instead
        # (torch.utils.checkpoint's metadata check fails).
        total = total + checkpoint(_chunk_ce_sum, lm_head, h, y, use_reentrant=zero3)
    return total / torch.as_tensor(denom, device=total.device).clamp(min=1)


def liger_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy (CUDA only) on a plain, whole Linear head.

    A PEFT-wrapped head (its forward adds adapters) or a ZeRO-3 partition cannot be handed to Liger as
    one weight tensor; those take `chunked_lm_loss`, which handles both."""
    if type(lm_head) is not torch.nn.Linear or _zero3_partitioned(lm_head):
        return chunked_lm_loss(hidden, lm_head, labels, num_items_in_batch=num_items_in_batch)
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
