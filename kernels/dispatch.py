"""Which kernel runs a layout: the dispatch behind `headwise.kernels.sparse_attention`.

CUDA tensors run the Triton kernels (shifted-group layouts, SF and LongLoRA, take the regrouped dense
form: cuDNN on strided per-group views, see ``SHIFTED_GROUPS_IMPL``; sliding-window layouts take
cuDNN's diagonal band where cudnn-frontend is installed, see ``BAND_IMPL``); CPU tensors run the torch
reference, unless ``TRITON_INTERPRET=1`` is set, in which case the Triton kernels run in the
interpreter (how CI tests them). Triton is imported only where a Triton kernel launches, so the
package imports and runs the reference where Triton is not installed (macOS, Windows, CPU-only).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Union

import torch

from . import band_attention
from .band_attention import band_layout_attention
from .interpreter import interpret_mode
from .layouts import BlockLayout, LayoutSpec
from .reference import reference_attention
from .shifted_groups import shifted_group_attention

if TYPE_CHECKING:
    from .block_sparse_attention import KernelConfig

# Which exact form runs shifted-group layouts on CUDA when both apply (16-bit inputs, no cu_seqlens,
# no lse requested): "regrouped" (the dense cuDNN kernel on strided per-group views, sinks as
# prepended keys; kernels/shifted_groups.py) or "block_sparse" (the Triton kernel). "auto" picks the
# regrouped form, except for SF-Attn (sink tokens) below REGROUPED_MIN_T tokens without GQA, where
# its per-piece launches, sink merges and copies (about 100 per fwd+bwd) cost more host time than
# the GPU work they replace. Measured on an H200 (docs/benchmarks.md, "Attention kernels"), fwd+bwd:
# - SF 8K, 32 KV heads: block-sparse 2.20-2.98 ms against regrouped 2.71-3.67 ms, in five of six runs;
# - SF 8K, 8 KV heads (GQA 4): regrouped 2.76-4.00 against block-sparse 3.07-4.01 (the Triton
#   backward sums each shared K/V head over 4 query heads, with 4x fewer programs);
# - LongLoRA (no sinks) 8K: regrouped 1.52-1.72 against block-sparse 1.75-2.25 ms;
# - 16K and 32K: regrouped, by 1.2-1.7x, with and without GQA.
# All at B = 1; a batch of B counts as B * T^2 of work against REGROUPED_MIN_T^2.
# "regrouped_fe": the regrouped form on cudnn-frontend graphs (kernels/cudnn_graphs.py; needs
# headwise[cudnn]), which write outputs and gradients in place; opt-in: measured slightly faster for SF
# at 8K and at 128K fwd, but 1.3-1.5x slower at 16K and 32K fwd+bwd.
REGROUPED_MIN_T = 16384


def impl_from_env(variable: str, default: str, choices: tuple[str, ...]) -> str:
    """An implementation switch read from the environment; a value outside `choices` is an error
    naming the variable, not a silent fallback to another kernel."""
    value = os.environ.get(variable, default)
    if value not in choices:
        raise ValueError(f"{variable}={value!r} is not one of {', '.join(choices)} (unset it for {default!r})")
    return value


SHIFTED_GROUPS_IMPL = impl_from_env("HEADWISE_SHIFTED_GROUPS_IMPL", "auto",
                                    ("auto", "regrouped", "regrouped_fe", "block_sparse"))


# Which form runs the sliding-window and streaming layouts on CUDA (16-bit inputs, no cu_seqlens, no
# lse requested), where cudnn-frontend is installed and its band passes `band_ready`'s probe:
# "auto" (default): the sliding window takes cuDNN's diagonal band (measured 1.30-1.41x FlexAttention
#   and 1.31-1.76x our Triton kernel at 8K/32K fwd+bwd and 128K fwd, docs/benchmarks.md), streaming keeps
#   the Triton kernel (its band form measured slower: 6.3 vs 4.7-5.1 ms at 32K, 11.0 vs 3.5 ms at 128K);
# "cudnn": both layouts take the band form (kernels/band_attention.py);
# "block_sparse": both take the Triton kernel.
BAND_IMPL = impl_from_env("HEADWISE_BAND_IMPL", "auto", ("auto", "cudnn", "block_sparse"))


def _use_band(spec: LayoutSpec) -> bool:
    return BAND_IMPL == "cudnn" or (BAND_IMPL == "auto" and spec.kind == "sliding_window")


def _use_regrouped(spec: LayoutSpec, q: torch.Tensor, n_kv_heads: Optional[int]) -> bool:
    if SHIFTED_GROUPS_IMPL != "auto":
        return SHIFTED_GROUPS_IMPL in ("regrouped", "regrouped_fe")
    b, hq, t = q.shape[0], q.shape[1], q.shape[2]
    # GPU work grows as B * T^2 while the host's per-piece cost does not: the batch counts toward the
    # threshold (measured at B = 1 only; this extrapolates the crossover by work).
    big = b * t * t >= REGROUPED_MIN_T * REGROUPED_MIN_T
    return spec.sink == 0 or big or (n_kv_heads is not None and n_kv_heads < hq)


def attention_impl(spec: LayoutSpec, q: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                   return_lse: bool = False, n_kv_heads: Optional[int] = None) -> str:
    """Which form `sparse_attention` runs for `spec` on `q` (``(B, Hq, T, D)``; only its device,
    dtype and sizes are read) with `n_kv_heads` KV heads (None: as many as query heads): "reference"
    (CPU without the Triton interpreter), "regrouped" or "regrouped_fe" (shifted groups, see
    `SHIFTED_GROUPS_IMPL`), "band" (see `BAND_IMPL`) or "block_sparse" (the Triton kernel). The dense
    exact forms take 16-bit CUDA inputs without packing (`cu_seqlens`), a returned log-sum-exp or the model's
    own rules on top of the layout (`LayoutSpec.composed`: a window on another kind, a softcap); everything else
    runs Triton."""
    if not (q.is_cuda or interpret_mode()):
        return "reference"
    dense_form_ok = (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and cu_seqlens is None
                     and not return_lse and not spec.composed)
    if dense_form_ok and spec.kind == "shifted_groups" and _use_regrouped(spec, q, n_kv_heads):
        return "regrouped_fe" if SHIFTED_GROUPS_IMPL == "regrouped_fe" else "regrouped"
    if dense_form_ok and _use_band(spec) and band_attention.band_ready(q.device, spec):
        return "band"
    return "block_sparse"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Union[LayoutSpec, BlockLayout],
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    max_seqlen: Optional[int] = None,
    config: Optional["KernelConfig"] = None,
):
    """Causal attention restricted to ``layout``, with transformers' attention-function layouts.

    Args:
        q: ``(B, Hq, T, D)`` queries (after RoPE); any strides with a unit last stride.
        k, v: ``(B, Hkv, T, D)``, ``Hq % Hkv == 0``; not repeated (GQA handled in the kernel).
        layout: a ``LayoutSpec`` (or a ``BlockLayout``, whose spec is used; tile lists are rebuilt
            for the kernel's tile shape from the cache).
        scale: softmax scale, default ``1/sqrt(D)``.
        cu_seqlens: int32 ``(n+1,)`` boundaries of sequences packed along T (needs ``B == 1``); the
            layout applies inside each sequence.
        return_lse: also return the log-sum-exp ``(B, Hq, T)`` fp32 (differentiable).
        max_seqlen: longest packed sequence, if known (saves a host sync).
        config: tile shapes / warps override for the Triton path.

    Returns:
        ``out (B, T, Hq, D)`` contiguous, and ``lse`` if ``return_lse``.
    """
    spec = layout.spec if isinstance(layout, BlockLayout) else layout
    impl = attention_impl(spec, q, cu_seqlens=cu_seqlens, return_lse=return_lse, n_kv_heads=k.shape[1])
    if impl == "reference":
        return reference_attention(q, k, v, spec, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    if impl in ("regrouped", "regrouped_fe"):
        backend = "cudnn_fe" if impl == "regrouped_fe" else None  # None: shifted_groups.default_backend
        return shifted_group_attention(q, k, v, spec, scale=scale, backend=backend)
    if impl == "band":
        return band_layout_attention(q, k, v, spec, scale=scale)
    # Triton: imported where its kernel launches
    from .block_sparse_attention import sparse_attention_triton

    out, lse = sparse_attention_triton(q, k, v, spec, scale=scale, cu_seqlens=cu_seqlens,
                                      max_seqlen=max_seqlen, config=config)
    return (out, lse) if return_lse else out
