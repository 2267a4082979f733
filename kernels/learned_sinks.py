"""Learned attention-sink logits (GPT-OSS's `sinks`, "s_aux"), folded into a finished attention output.

A learned sink is one extra logit per head in the softmax denominator, with no value: for a query whose keys'
scores have log-sum-exp ``lse``, the weights of the real keys shrink by ``exp(lse) / (exp(lse) + exp(sink))
= sigmoid(lse - sink)``. So any kernel that returns its log-sum-exp composes with sinks after the fact, and the
gradients reach q, k and v through the kernel's lse gradient and the sinks through the sigmoid (autograd).
"""

from __future__ import annotations

import torch


def attention_with_learned_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``out * sigmoid(lse - sinks[h])``, computed in fp32 and returned in ``out``'s dtype.

    Args:
        out: ``(B, T, Hq, D)`` attention output without the sinks (`sparse_attention`'s layout).
        lse: ``(B, Hq, T)`` its log-sum-exp (natural log, fp32), from ``return_lse=True``.
        sinks: ``(Hq,)`` learned sink logits, one per query head.
    """
    if sinks.dim() != 1 or sinks.shape[0] != out.shape[2] or lse.shape != (out.shape[0], out.shape[2], out.shape[1]):
        raise ValueError(f"learned sinks: out {tuple(out.shape)} (B, T, Hq, D), lse {tuple(lse.shape)} (B, Hq, T) "
                         f"and sinks {tuple(sinks.shape)} (Hq,) do not agree")
    keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))  # (B, Hq, T): mass left to the real keys
    return (out.float() * keep.transpose(1, 2).unsqueeze(-1)).to(out.dtype)
