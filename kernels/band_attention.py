"""Exact sliding-window and streaming attention through cuDNN's own diagonal-band SDPA.

The band layouts are the two where the Triton kernel family stays below FlexAttention or far below
cuDNN's throughput. At 32K fwd+bwd the sliding window runs 0.90x FlexAttention, and streaming with 32
KV heads 0.98x. Nsight Compute shows the kernels latency-bound at 8 warps per SM (docs/benchmarks.md,
"Targets (issue 5)"). cuDNN's SDPA takes a causal mask with a left bound (`sliding_window_length`,
cudnn-frontend >= 1.9), which torch's `scaled_dot_product_attention` does not expose. This module
runs the band layouts on it. The idea is the one `shifted_groups.py` applies to shifted groups: the
best dense kernel on an exact decomposition.

- **Sliding window `W`** (`q - W < k <= q`): one band call.
- **Streaming (`s` sinks, `r` recent)** (`k <= q` and (`k < s` or `q - k < r`)): a band of `r` over
  every row, plus the sink keys outside that band. Those are `k < s` with `k <= q - r`. For rows
  `q >= r` they form a causal attention aligned top-left, of queries `[r, T)` over keys
  `[0, min(s, T - r))`, where local row `i` sees keys `<= i`, i.e. `k <= q - r`. cuDNN's causal mask
  is aligned top-left, so it is one SDPA call, and no row is empty. The two key sets are disjoint,
  so the outputs merge through their log-sum-exps.
- **Backward: no log-sum-exp gradient.** Each part's backward kernel gets the *merged* output and
  log-sum-exp, as ring attention does. Its `P = exp(S - lse)` is then the merged softmax restricted
  to its keys, and its `D = rowsum(dO * O)` is the merged one. So each part returns its keys' exact
  gradients, and the query gradients of the two parts add up.

Backends: `cudnn` (cudnn-frontend graphs for the band, built once per shape and strides and cached;
the sink part through torch's private cuDNN SDPA op, as in `shifted_groups.py`), and `torch` (fp32
masked attention, for tests on CPU). `band_left_offset` probes once per device that cudnn-frontend
imports, that the band runs on strided GQA inputs, and which `sliding_window_length` reproduces the
rule above. It compares forward and gradients against the torch backend.

**Status: the sliding window's default; streaming's opt-in.** Measured on the H200 (docs/benchmarks.md,
"Targets (issue 5)"), the band runs the sliding window 1.30-1.41x faster than FlexAttention and
1.31-1.76x faster than the Triton kernel, at 8K and 32K fwd+bwd and 128K fwd with 32 and 8 KV heads,
so `kernels.BAND_IMPL="auto"` (`HEADWISE_BAND_IMPL`) sends the sliding window here wherever cudnn-frontend
is installed (`pip install 'headwise[cudnn]'`) and `band_ready` passes. Streaming's band form
measured slower than the Triton kernel (6.3-6.5 vs 4.7-5.1 ms at 32K fwd+bwd, 11.0 vs 3.5 ms at
128K fwd; likely the sink part's unfused fp32 merge of every row past `r`, not profiled), so
streaming takes it only with `HEADWISE_BAND_IMPL=cudnn`. Packed sequences
(`cu_seqlens`) and `return_lse=True` always take the Triton kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .cudnn_graphs import sdpa_backward, sdpa_forward
from .input_checks import check_attention_inputs
from .layouts import LayoutSpec
from .reference import (
    masked_attention_backward,
    masked_attention_forward,
    repeat_kv_heads,
    sum_kv_groups,
)
from .shifted_groups import (
    _cudnn_bwd,
    _cudnn_fwd,
    bottom_right_causal,
    join_backend_states,
    native_gqa,
    split_backend_states,
)


def _band_allowed(tq: int, tk: int, window: int, device) -> torch.Tensor:
    i = torch.arange(tq, device=device).view(-1, 1)
    j = torch.arange(tk, device=device).view(1, -1)
    return (j <= i) & (i - j < window)


def _top_left_causal(tq: int, tk: int, device) -> torch.Tensor:
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril()


# ------------------------------------------------------------------------------ the band: cudnn-frontend


def _left(window: int, device_index: int) -> int:
    offset = band_left_offset(device_index)
    if offset is None:
        raise RuntimeError("cudnn-frontend's band SDPA is not available on this device (band_left_offset)")
    return window + offset


def _cudnn_band_fwd(q, k, v, window, scale, left=None):
    """out (B, T, Hq, D) contiguous, lse (B, Hq, T, 1) fp32; q/k/v (B, H, T, D) views."""
    left = _left(window, q.device.index or 0) if left is None else left
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    lse = sdpa_forward(q, k, v, out.transpose(1, 2), scale, left=left)
    return out, lse


def _cudnn_band_bwd(do_h, q, k, v, out_h, lse, window, scale, left=None):
    """dq, dk, dv like q, k, v; do_h and out_h (B, H, T, D) views of (B, T, H, D) buffers."""
    left = _left(window, q.device.index or 0) if left is None else left
    return sdpa_backward(do_h, q, k, v, out_h, lse, scale, left=left)


# ------------------------------------------------------------------------------ the band: torch (tests, CPU)


def _torch_band_fwd(q, k, v, window, scale):
    out_h, lse = masked_attention_forward(q, k, v, _band_allowed(q.shape[2], k.shape[2], window, q.device), scale)
    return out_h.transpose(1, 2).contiguous(), lse.unsqueeze(-1)


def _torch_band_bwd(do_h, q, k, v, out_h, lse, window, scale):
    return masked_attention_backward(do_h, q, k, v, out_h, lse.squeeze(-1),
                                     _band_allowed(q.shape[2], k.shape[2], window, q.device), scale)


# ------------------------------------------------------------------------------ the sink part (top-left causal)


def _torch_corner_fwd(q, k, v, scale):
    out, lse = masked_attention_forward(q, k, v, _top_left_causal(q.shape[2], k.shape[2], q.device), scale)
    return out, lse, None


def _torch_corner_bwd(do, q, k, v, out, lse, scale, state):
    return masked_attention_backward(do, q, k, v, out, lse, _top_left_causal(q.shape[2], k.shape[2], q.device), scale)


BACKENDS = {
    "torch": (_torch_band_fwd, _torch_band_bwd, _torch_corner_fwd, _torch_corner_bwd),
    "cudnn": (_cudnn_band_fwd, _cudnn_band_bwd, _cudnn_fwd, _cudnn_bwd),  # cuDNN's causal mask is top-left
}


class BandLayoutAttention(torch.autograd.Function):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) views -> out (B, T, Hq, D) contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, window, sink, scale, backend):
        band_fwd, _, corner_fwd, _ = BACKENDS[backend]
        t = q.shape[2]
        out, lse = band_fwd(q, k, v, window, scale)
        out_h = out.transpose(1, 2)
        n_sink = min(sink, t - window) if sink else 0
        state, gqa = None, True
        if n_sink > 0:
            rep = q.shape[1] // k.shape[1]
            gqa = not q.is_cuda or native_gqa("cudnn", q.device.index or 0)  # else K/V heads are repeated
            kc, vc = (repeat_kv_heads(x[:, :, :n_sink], 1 if gqa else rep) for x in (k, v))
            oc, lc, state = corner_fwd(q[:, :, window:], kc, vc, scale)
            # merge rows [window, T): the band's part and the sink part, through their log-sum-exps
            # (in fp32, fp64 for fp64 inputs)
            acc = torch.promote_types(q.dtype, torch.float32)
            lb, ls = lse[:, :, window:, 0].to(acc), lc.reshape(lse[:, :, window:, 0].shape).to(acc)
            merged = torch.logaddexp(lb, ls)
            rows = out_h[:, :, window:]
            rows.copy_(rows.to(acc) * torch.exp(lb - merged).unsqueeze(-1) + oc.to(acc) * torch.exp(ls - merged).unsqueeze(-1))
            lse[:, :, window:, 0] = merged
            ctx.corner_lse_shape = tuple(lc.shape)
        # the cuDNN state holds tensors and None (no sequence offsets): `split_backend_states` tells them apart
        state_tensors, templates = split_backend_states([state])
        ctx.save_for_backward(q, k, v, out, lse, *state_tensors)
        ctx.meta = (window, sink, n_sink, scale, backend, gqa, templates)
        return out

    @staticmethod
    def backward(ctx, dout):
        window, sink, n_sink, scale, backend, gqa, templates = ctx.meta
        q, k, v, out, lse, *state_tensors = ctx.saved_tensors
        _, band_bwd, _, corner_bwd = BACKENDS[backend]
        do_h, out_h = dout.contiguous().transpose(1, 2), out.transpose(1, 2)
        dq, dk, dv = band_bwd(do_h, q, k, v, out_h, lse, window, scale)
        if n_sink > 0:
            (state,) = join_backend_states(templates, state_tensors)
            rep = q.shape[1] // k.shape[1]
            kc, vc = (repeat_kv_heads(x[:, :, :n_sink], 1 if gqa else rep) for x in (k, v))
            lc = lse[:, :, window:, 0].reshape(ctx.corner_lse_shape).contiguous()
            dqc, dkc, dvc = corner_bwd(do_h[:, :, window:], q[:, :, window:], kc, vc, out_h[:, :, window:], lc, scale, state)
            if not gqa:
                dkc, dvc = sum_kv_groups(dkc, rep), sum_kv_groups(dvc, rep)
            dq[:, :, window:] += dqc
            dk[:, :, :n_sink] += dkc
            dv[:, :, :n_sink] += dvc
        return dq, dk, dv, None, None, None, None


def band_layout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: LayoutSpec,
                          scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Exact sliding-window or streaming attention as a band (+ sink) decomposition.

    q: (B, Hq, T, D), k/v: (B, Hkv, T, D), any strides with a unit last stride. Returns (B, T, Hq, D)
    contiguous. `backend`: "cudnn" (default on CUDA) or "torch"."""
    check_attention_inputs(q, k, v)
    if spec.kind == "sliding_window":
        window, sink = spec.window, 0
    elif spec.kind == "streaming":
        window, sink = spec.recent, spec.sink
    else:
        raise ValueError(f"band_layout_attention takes sliding_window or streaming specs, got {spec.kind}")
    backend = backend or ("cudnn" if q.is_cuda else "torch")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return BandLayoutAttention.apply(q, k, v, window, sink, scale, backend)


def band_ready(device: torch.device, spec: LayoutSpec) -> bool:
    """Whether the cuDNN backend runs `spec` here: the band works (`band_left_offset`), and for
    streaming with sinks, cuDNN's causal mask is aligned top-left (the sink part relies on it)."""
    if device.type != "cuda" or spec.kind not in ("sliding_window", "streaming"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if band_left_offset(index) is None:
        return False
    return spec.kind == "sliding_window" or not spec.sink or not bottom_right_causal("cudnn", index)


BAND_OFFSETS = (0, -1, 1)  # candidate `sliding_window_length - window`


def compare_band_offsets(device_index: int = 0, *, t: int = 256, hq: int = 4, hkv: int = 2, d: int = 64,
                         window: int = 48) -> list[tuple[int, dict | Exception]]:
    """cudnn-frontend's band against the torch backend, for each candidate offset of
    `sliding_window_length` from `window`, on transformers' transposed (B, T, H, D) bf16 buffers with
    GQA: `(offset, errors)`, errors = max |out - ref|, max |lse - ref| and the gradients' max error
    relative to the reference's largest entry; or `(offset, exception)` where the band failed."""
    import cudnn  # noqa: F401  (ImportError: cudnn-frontend is missing)

    dev = f"cuda:{device_index}"
    gen = torch.Generator(device=dev).manual_seed(0)

    def leaf(h):
        return torch.randn(1, t, h, d, device=dev, dtype=torch.bfloat16, generator=gen).transpose(1, 2)

    q, k, v, do_h = leaf(hq), leaf(hkv), leaf(hkv), leaf(hq)
    scale = d ** -0.5
    ref_out, ref_lse = _torch_band_fwd(q, k, v, window, scale)
    ref_grads = _torch_band_bwd(do_h, q, k, v, ref_out.transpose(1, 2), ref_lse, window, scale)
    results = []
    for offset in BAND_OFFSETS:
        try:
            out, lse = _cudnn_band_fwd(q, k, v, window, scale, left=window + offset)
            grads = _cudnn_band_bwd(do_h, q, k, v, out.transpose(1, 2), lse, window, scale, left=window + offset)
        except Exception as e:  # noqa: BLE001 - the caller decides (the probe prints it, the dispatch declines)
            results.append((offset, e))
            continue
        errors = {"out": (out.float() - ref_out.float()).abs().max().item(), "lse": (lse - ref_lse).abs().max().item()}
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errors[name] = ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
        results.append((offset, errors))
    return results


def band_offset_matches(errors: dict | Exception) -> bool:
    """Whether one `compare_band_offsets` result is the sliding-window rule up to bf16 rounding."""
    return isinstance(errors, dict) and errors["out"] < 3e-2 and errors["lse"] < 1e-2 and \
        max(errors["dq"], errors["dk"], errors["dv"]) < 5e-2


@functools.lru_cache(maxsize=None)
def band_left_offset(device_index: int = 0) -> Optional[int]:
    """`sliding_window_length - window` that makes cudnn-frontend's band equal the sliding-window
    rule on this device (`compare_band_offsets`), or None where cudnn-frontend is missing or its
    band fails."""
    try:
        return next((off for off, errors in compare_band_offsets(device_index) if band_offset_matches(errors)), None)
    except Exception:  # noqa: BLE001 - cudnn-frontend missing or the device refused the inputs: no band here
        return None
