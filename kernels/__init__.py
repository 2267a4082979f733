"""headwise.kernels: block-sparse causal attention over per-head layouts, and its torch reference.

Public API::

    from headwise.kernels import LayoutSpec, sparse_attention

    spec = LayoutSpec("s2", block=64, local_blocks=16, vert_stride=8)
    out = sparse_attention(q, k, v, spec)            # q (B, Hq, T, D), k/v (B, Hkv, T, D)
    out, lse = sparse_attention(q, k, v, spec, return_lse=True)

    # the model's own rules compose with every layout: a sliding window, a logit softcap, learned sinks
    spec = LayoutSpec("shifted_groups", group_size=2048, sink=4, window=4096, softcap=50.0)
    out = attention_with_learned_sinks(*sparse_attention(q, k, v, spec, return_lse=True), sinks)

    from headwise.kernels import decode_attention      # one query token per sequence (KV-cache decode)
    out, colsums = decode_attention(q, k, v, key_valid, scaling, need_colsums=True)  # q (B, Hkv, G, D)

    from headwise.kernels import gathered_query_attention, gathered_rows   # per-head chosen query rows only (MoH)
    rows, counts = gathered_rows(chosen)                 # chosen (B, T, Hq) bool
    out = gathered_query_attention(q, k, v, rows, counts)  # (B, T, Hq, D), zero where a head was not chosen

Dispatch (``headwise.kernels.dispatch``): CUDA tensors run the Triton kernels (shifted-group layouts, SF and LongLoRA, take the
regrouped dense form: cuDNN on strided per-group views, see ``SHIFTED_GROUPS_IMPL``; sliding-window
layouts take cuDNN's diagonal band where cudnn-frontend is installed, see ``BAND_IMPL``); CPU tensors
run the torch reference, unless ``TRITON_INTERPRET=1`` is set, in which case the Triton kernels run
in the interpreter (how CI tests them).
"""

from __future__ import annotations

from typing import Any

from .band_attention import band_layout_attention
from .dispatch import BAND_IMPL, SHIFTED_GROUPS_IMPL, attention_impl, sparse_attention
from .input_checks import check_attention_inputs
from .interpreter import interpret_mode
from .learned_sinks import attention_with_learned_sinks
from .layouts import (
    BlockLayout,
    LayoutSpec,
    allowed_per_query,
    build_dense_causal_layout,
    build_layout,
    build_s2_layout,
    build_shifted_group_layout,
    build_sliding_window_layout,
    build_streaming_layout,
)
from .reference import reference_attention, token_mask
from .shifted_groups import shifted_group_attention

# Names backed by Triton modules, imported on first use so that `import headwise.kernels` works without
# Triton (the reference path needs none of them).
_TRITON_NAMES = {
    "KernelConfig": "block_sparse_attention",
    "sparse_attention_triton": "block_sparse_attention",
    "decode_attention": "decode_attention",
    "gathered_query_attention": "gathered_query",
    "gathered_rows": "gathered_query",
}


def __getattr__(name: str) -> Any:
    if name in _TRITON_NAMES:
        import importlib

        module = importlib.import_module(f"{__name__}.{_TRITON_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BAND_IMPL",
    "attention_impl",
    "allowed_per_query",
    "attention_with_learned_sinks",
    "BlockLayout",
    "KernelConfig",
    "LayoutSpec",
    "SHIFTED_GROUPS_IMPL",
    "sparse_attention_triton",
    "build_dense_causal_layout",
    "band_layout_attention",
    "build_layout",
    "build_s2_layout",
    "build_shifted_group_layout",
    "build_sliding_window_layout",
    "build_streaming_layout",
    "check_attention_inputs",
    "decode_attention",
    "gathered_query_attention",
    "gathered_rows",
    "interpret_mode",
    "reference_attention",
    "shifted_group_attention",
    "sparse_attention",
    "token_mask",
]
