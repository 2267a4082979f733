"""What the attention functions accept, checked before any kernel runs.

A kernel handed tensors it was not written for does not fail cleanly: a K shorter than Q makes it read
past K's end, a V with another head dim gives a wrong output, a head dim above 256 runs out of shared
memory. `check_attention_inputs` turns each of these into one error that names the argument, what it
got and what would fix it.
"""

from __future__ import annotations

from typing import Optional

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = 256


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor] = None, *, kernel: bool = False) -> None:
    """Raise ValueError unless q (B, Hq, T, D), k and v (B, Hkv, T, D) fit the attention functions:
    same batch, length, head dim, dtype and device, Hq a multiple of Hkv, a floating dtype, and
    ``cu_seqlens`` a 1-D integer tensor with B == 1. ``kernel``: the Triton kernels will run, which
    also need fp16 / bf16 / fp32 and a head dim of at most 256."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, T, head_dim) as transformers' attention "
                             f"functions receive it; got {got}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape (B, Hkv, T, head_dim)")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t:
        raise ValueError(f"k/v have B={k.shape[0]}, T={k.shape[2]} but q has B={b}, T={t}: these kernels take "
                         "training-time self-attention with equal lengths (no KV cache); decoding with a cache "
                         "goes through headwise.kernels.decode_attention")
    if k.shape[3] != d:
        raise ValueError(f"q's head dim {d} differs from k/v's {k.shape[3]}: these kernels need one head dim for q, k "
                         "and v")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"{hq} query heads are not a multiple of {k.shape[1]} KV heads")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor of sequence boundaries; got {cu_seqlens.dtype} "
                             f"of shape {tuple(cu_seqlens.shape)}")
        if b != 1:
            raise ValueError("cu_seqlens needs B == 1 (sequences packed along T)")
    if kernel:
        if q.dtype not in KERNEL_DTYPES:
            raise ValueError(f"the Triton kernels take float16, bfloat16 or float32; got {q.dtype}")
        if d > MAX_KERNEL_HEAD_DIM:
            raise ValueError(f"head dim {d} is above {MAX_KERNEL_HEAD_DIM}, the largest the Triton kernels support")
