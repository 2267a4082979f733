"""Exact shifted-group attention (SF-Attn, LongLoRA S2-Attn) through a dense kernel on strided views.

A shifted-group layout is block-diagonal: inside its group a query sees every earlier key (plus the
sink tokens), and the groups of a head never interact. So instead of a block-sparse kernel we run
the best dense causal kernel (SDPA's cuDNN backend on Hopper, the flash backend as a fallback, a
plain torch implementation on CPU) once per *piece*: a run of equal-length groups, evenly spaced,
over a run of heads of one kind (shifted or not).

- **No regrouping copies.** A piece is an ``as_strided`` view of the caller's tensor: ``n`` groups of
  ``G`` tokens become the batch dimension (``batch stride = G x token stride``), the head run is a
  slice. transformers hands us ``q``/``k``/``v`` as transposed ``(B, T, H, D)`` buffers; cuDNN and
  flash read those strides directly, so the forward copies nothing but the output pieces into the
  ``(B, T, Hq, D)`` result, and the backward nothing but the gradient pieces. The ``cudnn_fe``
  backend (cudnn-frontend graphs, ``cudnn_graphs.py``) copies not even those: its graphs write each
  piece's output and dQ (and dK/dV of pieces without sink keys) straight into place, and its causal
  mask is aligned bottom-right, so no dummy query rows either. Only K/V pieces with sinks and their
  gradients are still copied. Opt-in (``HEADWISE_SHIFTED_GROUPS_IMPL=regrouped_fe``): its GPU tests
  pass, but on an H200 it measured 1.3-1.5x slower than the SDPA backend at 16K-32K fwd+bwd
  (slightly faster at 8K and 128K fwd; docs/benchmarks.md), for reasons not yet profiled.
- **GQA without repeating K/V** when the backend does it natively (probed once; cuDNN and flash do in
  recent torch): a head run maps to the KV heads of its query heads (runs are split at KV-head
  boundaries, so any set of shifted heads works).
- **Sinks as prepended keys.** A group that does not start at token 0 gets the first ``s`` tokens
  (``min(s, start)``) copied in front of its keys and values: with a causal mask aligned
  bottom-right (``s + G`` keys, ``G`` queries), group query ``i`` sees the ``s`` sinks and group keys
  ``0..i``, exactly the SF-Attn rule. Backends whose causal mask is aligned top-left (cuDNN and flash
  in torch; `bottom_right_causal` probes which) get ``s`` dummy query rows in front as well (outputs
  dropped, output gradient zero, so they add nothing to any gradient). Any values do for those rows,
  so they are the ``s`` real rows just before the group, read in place through an overlapping view
  (`reads_overlapping_views` probes that the backend takes one) rather than copied; only the output
  gradient needs a copy with zero rows. The sink keys' gradients from every group are
  summed into ``dk[:, :, :s]``. The copies are of K/V (small under GQA), and replace the separate
  sink attention + log-sum-exp merge of the first version, which cost more than it saved (30.7 ms
  vs 25.7 ms block-sparse at 32K, 2026-11 measurements).

Shifted heads take groups ``[0, G/2), [G/2, 3G/2), ...`` (no wrap-around); the last group of any
head may be shorter. No log-sum-exp is returned (``sparse_attention`` routes ``return_lse=True`` and
packed ``cu_seqlens`` to the block-sparse kernel).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
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

# ------------------------------------------------------------------------------ dense causal backends
# Each backend: fwd(q, k, v, scale) -> (out, lse, state), and bwd(do, q, k, v, out, lse, scale, state)
# -> (dq, dk, dv), for (B, H, T, D) inputs with a unit last stride; k/v may have fewer heads (GQA)
# when the backend handles GQA natively (`native_gqa`), else the caller expands them.


def _causal(tq, tk, device):
    """Masked (True) pairs of causal attention aligned bottom-right: query i sees keys <= i + tk - tq."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).triu(1 + tk - tq)


def _torch_fwd(q, k, v, scale, out=None):
    o, lse = masked_attention_forward(q, k, v, ~_causal(q.shape[2], k.shape[2], q.device), scale)
    return (o if out is None else out.copy_(o)), lse, None


def _torch_bwd(do, q, k, v, out, lse, scale, state, grads=(None, None, None)):
    res = masked_attention_backward(do, q, k, v, out, lse, ~_causal(q.shape[2], k.shape[2], q.device), scale)
    return tuple(r if g is None else g.copy_(r) for r, g in zip(res, grads))


def _cudnn_fwd(q, k, v, scale, out=None):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    return r[0], r[1], tuple(r[2:8])  # keep the scalars/seeds, not the output (the caller owns it)


def _cudnn_bwd(do, q, k, v, out, lse, scale, state, grads=None):
    cum_q, cum_k, max_q, max_k, seed, offset = state
    # attn_bias is a non-optional Tensor in the backward's schema; None reaches C++ as an undefined
    # tensor (no bias). default_backend() probes this once and falls back to flash if it fails.
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale
    )


def _flash_fwd(q, k, v, scale, out=None):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return r[0], r[1], tuple(r[2:8])


def _flash_bwd(do, q, k, v, out, lse, scale, state, grads=None):
    cum_q, cum_k, max_q, max_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
    )


def _cudnn_fe_fwd(q, k, v, scale, out=None):
    out = torch.empty_like(q) if out is None else out
    return out, sdpa_forward(q, k, v, out, scale, bottom_right=True), None


def _cudnn_fe_bwd(do, q, k, v, out, lse, scale, state, grads=(None, None, None)):
    return sdpa_backward(do, q, k, v, out, lse, scale, grads, bottom_right=True)


# `out` / `grads`: where the caller wants the output / gradients (views into its full tensors). The
# torch and cudnn-frontend backends write there (no copy afterwards); torch's private cuDNN and flash
# ops allocate their own, and the caller copies those into place.
BACKENDS = {"torch": (_torch_fwd, _torch_bwd), "cudnn": (_cudnn_fwd, _cudnn_bwd), "flash": (_flash_fwd, _flash_bwd),
            "cudnn_fe": (_cudnn_fe_fwd, _cudnn_fe_bwd)}


def _probe(backend: str, device_index: int, hkv: int, bthd: bool, extra_keys: int = 0, lead: int = 0) -> bool:
    """Forward + backward of `backend` on piece views (two groups as the batch, see `_view`) of a
    (B, T, H, D)-transposed (`bthd`) or contiguous (B, H, T, D) buffer, K/V with `hkv` of 4 heads
    (and `extra_keys` more keys than queries: bottom-right causal alignment; or queries and outputs
    read as overlapping views that start `lead` rows before each group, those rows' output gradient
    zero: `_query_rows`), match the torch backend's."""
    try:
        dev = f"cuda:{device_index}"
        gen = torch.Generator(device=dev).manual_seed(0)

        def buf(h):
            x = torch.randn(1, 256, h, 64, device=dev, dtype=torch.bfloat16, generator=gen)
            return x.transpose(1, 2) if bthd else x.transpose(1, 2).contiguous()

        piece = _Piece(lead, 128 - lead, 2, 0, 4, 0, hkv, 0)
        q = _view(buf(4), 0, piece, (0, 4), lead)
        k, v = (_view(buf(hkv), 0, _Piece(0, 128, 2, 0, 4, 0, hkv, 0), (0, hkv)) for _ in range(2))
        if extra_keys:
            k, v = (torch.cat([x[:, :, :extra_keys], x], dim=2) for x in (k, v))
        fwd, bwd = BACKENDS[backend]
        o, lse, st = fwd(q, k, v, 0.125)
        do = torch.ones_like(o)
        do[:, :, :lead] = 0
        if lead:  # the outputs as the overlapping view the backward of `_query_rows` passes
            out = buf(4)
            _view(out, 0, piece, (0, 4)).copy_(o[:, :, lead:])
            o = _view(out, 0, piece, (0, 4), lead)
        grads = bwd(do, q, k, v, o, lse, 0.125, st)
        o_ref, lse_ref, _ = _torch_fwd(q, k, v, 0.125)
        g_ref = _torch_bwd(do, q, k, v, o_ref, lse_ref, 0.125, None)
        rows = slice(lead, None)  # the dummy rows' outputs and query gradients are dropped
        ok = torch.allclose(o[:, :, rows].float(), o_ref[:, :, rows].float(), atol=2e-2, rtol=2e-2)
        grads, g_ref = (grads[0][:, :, rows], *grads[1:]), (g_ref[0][:, :, rows], *g_ref[1:])
        return ok and all(g.shape == r.shape and torch.allclose(g.float(), r.float(), atol=5e-2, rtol=5e-2)
                          for g, r in zip(grads, g_ref))
    except Exception:  # cuDNN missing, this torch's private op signature differs, or strides refused
        return False


@functools.lru_cache(maxsize=None)
def _works(backend: str, device_index: int) -> bool:
    return _probe(backend, device_index, 4, bthd=True)


@functools.lru_cache(maxsize=None)
def native_gqa(backend: str, device_index: int = 0) -> bool:
    """Whether `backend` takes K/V with fewer heads than Q (else K/V are expanded per piece)."""
    return backend == "torch" or _probe(backend, device_index, 2, bthd=True)


@functools.lru_cache(maxsize=None)
def bottom_right_causal(backend: str, device_index: int = 0) -> bool:
    """Whether `backend`'s causal mask with more keys than queries is aligned bottom-right (then sink
    keys go in front of a group's keys alone; else dummy query rows are prepended as well)."""
    return backend == "torch" or _probe(backend, device_index, 4, bthd=True, extra_keys=4)


@functools.lru_cache(maxsize=None)
def reads_head_major_views(backend: str, device_index: int = 0) -> bool:
    """Whether `backend` takes piece views of contiguous (B, H, T, D) buffers (batch stride below
    the head stride); else such inputs are first copied to the (B, T, H, D) layout."""
    return backend == "torch" or _probe(backend, device_index, 4, bthd=False)


@functools.lru_cache(maxsize=None)
def reads_overlapping_views(backend: str, device_index: int = 0) -> bool:
    """Whether `backend` takes queries and outputs as overlapping views (each group's view starting
    a few rows early: the dummy query rows of `_query_rows`), so they need no copy."""
    return backend == "torch" or _probe(backend, device_index, 4, bthd=True, lead=4)


def default_backend(device) -> str:
    """cuDNN on Hopper and newer (fastest dense causal there: docs/kernels.md) when its private
    ops work in this torch on strided inputs, flash elsewhere on CUDA, torch on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return "cudnn" if major >= 9 and _works("cudnn", index) else "flash"


# ------------------------------------------------------------------------------------ pieces


@dataclass(frozen=True)
class _Piece:
    """``count`` groups of ``length`` tokens starting at ``start``, ``length`` apart, over query heads
    ``[h0, h1)`` and KV heads ``[k0, k1)``; ``sink`` rows (tokens ``[0, sink)``) go in front of each."""

    start: int
    length: int
    count: int
    h0: int
    h1: int
    k0: int
    k1: int
    sink: int


def _groups(t: int, g: int, offset: int) -> list[tuple[int, int]]:
    """(start, length) of the groups of a head whose groups are shifted by `offset` (no wrap-around)."""
    starts = [0] + list(range(offset if offset else g, t, g))
    return [(a, min(t, b) - a) for a, b in zip(starts, starts[1:] + [t]) if min(t, b) > a]


# Largest number of query heads one dense-kernel call takes (None: a whole run of heads of one kind).
# Smaller pieces shrink the per-piece temporaries (the kernel's output and gradient pieces, the sink
# copies) at the price of more, smaller calls. Runs are cut at KV-head boundaries, so the effective
# cap is rounded up to a whole KV head's query heads.
MAX_PIECE_HEADS = int(os.environ["HEADWISE_SG_MAX_PIECE_HEADS"]) if os.environ.get("HEADWISE_SG_MAX_PIECE_HEADS") else None


def _head_runs(hq: int, hkv: int, shifted: frozenset, max_heads: int | None = None) -> list[tuple[int, int, int, int, bool]]:
    """Runs of query heads of one kind, split so that each maps onto whole KV heads:
    (h0, h1, k0, k1, shifted). Within a KV head of mixed kinds, each kind gets its own run; with
    `max_heads`, a run takes at most that many query heads (at least one KV head's)."""
    rep = hq // hkv
    runs = []
    for j in range(hkv):
        heads = range(j * rep, (j + 1) * rep)
        kinds = {h in shifted for h in heads}
        if len(kinds) == 1:
            kind = kinds.pop()
            if runs and runs[-1][4] == kind and runs[-1][1] == j * rep and runs[-1][3] == j and (runs[-1][1] - runs[-1][0]) % rep == 0:
                runs[-1] = (runs[-1][0], (j + 1) * rep, runs[-1][2], j + 1, kind)
            else:
                runs.append((j * rep, (j + 1) * rep, j, j + 1, kind))
        else:
            for h in heads:
                runs.append((h, h + 1, j, j + 1, h in shifted))
    if max_heads is None:
        return runs
    cut = []
    for h0, h1, k0, k1, kind in runs:
        step = max(1, max_heads // rep) if (h1 - h0) % rep == 0 and h1 - h0 >= rep else None
        if step is None or k1 - k0 <= step:
            cut.append((h0, h1, k0, k1, kind))
            continue
        for j in range(k0, k1, step):
            cut.append((h0 + (j - k0) * rep, min(h1, h0 + (j - k0 + step) * rep), j, min(k1, j + step), kind))
    return cut


@functools.lru_cache(maxsize=256)
def _pieces(t: int, hq: int, hkv: int, g: int, shifted: frozenset, sink: int,
            max_heads: int | None = None) -> tuple[_Piece, ...]:
    out = []
    for h0, h1, k0, k1, is_shifted in _head_runs(hq, hkv, shifted, max_heads):
        cur = None
        for a, n in _groups(t, g, g // 2 if is_shifted else 0):
            pre = min(sink, a)
            if cur and cur.length == n and cur.sink == pre and cur.start + cur.count * n == a:
                cur = _Piece(cur.start, n, cur.count + 1, h0, h1, k0, k1, pre)
            else:
                if cur:
                    out.append(cur)
                cur = _Piece(a, n, 1, h0, h1, k0, k1, pre)
        out.append(cur)
    return tuple(out)


def _view(x: torch.Tensor, b: int, p: _Piece, heads: tuple[int, int], lead: int = 0) -> torch.Tensor:
    """Batch row `b` of x (B, H, T, D), piece `p` over `heads`, as a (count, h, lead + length, D) strided
    view. With `lead`, each group's view starts `lead` tokens early: consecutive groups' views overlap
    (the rows before a group are the previous group's last rows, real memory, only read)."""
    sb, sh, st, _ = x.stride()
    h0, h1 = heads
    return x.as_strided((p.count, h1 - h0, lead + p.length, x.shape[-1]), (p.length * st, sh, st, 1),
                        x.storage_offset() + b * sb + h0 * sh + (p.start - lead) * st)


def _with_sink_rows(x: torch.Tensor, b: int, p: _Piece, heads: tuple[int, int], zero_sinks: bool = False) -> torch.Tensor:
    """A (count, h, sink + length, D) copy of the piece's rows of x with the first `sink` tokens in front of
    every group (zeros instead when `zero_sinks`: the dummy query rows' output gradient).

    The copy is allocated in x's own memory order (token-major for transformers' transposed (B, T, H, D)
    buffers), so filling it is a plain strided copy rather than a transpose, and the dense kernels read
    that order directly."""
    view = _view(x, b, p, heads)
    c, h, n, d = view.shape
    if x.stride(1) < x.stride(2):  # token-major source
        buf = x.new_empty(c, p.sink + n, h, d).transpose(1, 2)
    else:
        buf = x.new_empty(c, h, p.sink + n, d)
    if zero_sinks:
        buf[:, :, : p.sink].zero_()
    else:
        buf[:, :, : p.sink] = x[b, heads[0] : heads[1], : p.sink].unsqueeze(0)
    buf[:, :, p.sink :] = view
    return buf


def _key_rows(x: torch.Tensor, b: int, p: _Piece, heads: tuple[int, int]) -> torch.Tensor:
    """The piece's keys or values: the sink tokens in front of each group (a copy) when it has any."""
    return _with_sink_rows(x, b, p, heads) if p.sink else _view(x, b, p, heads)


def _query_rows(x: torch.Tensor, b: int, p: _Piece, heads: tuple[int, int], pad_q: bool, overlap: bool,
                zero_lead: bool = False) -> torch.Tensor:
    """The piece's queries (or forward outputs, or output gradients), with `sink` dummy rows in front of
    each group when the backend's causal mask is aligned top-left (`pad_q`). The dummy rows' outputs are
    dropped and their output gradient is zero, so any query/output values do: where the backend reads
    overlapping views (`overlap`) they are the `sink` real rows just before each group, read in place
    instead of copied. `zero_lead` (the output gradient) always copies, with those rows zero."""
    if not (pad_q and p.sink):
        return _view(x, b, p, heads)
    if overlap and not zero_lead:
        return _view(x, b, p, heads, lead=p.sink)
    return _with_sink_rows(x, b, p, heads, zero_sinks=zero_lead)


_SAVED = object()  # marks where a backend state held a tensor (restored from the saved tensors)


def split_backend_states(states: list) -> tuple[list[torch.Tensor], list]:
    """Backend states (tuples of tensors, ints and None, or None) -> (their tensors, for
    `save_for_backward`; templates with `_SAVED` where a tensor was). A state's own None entries stay
    None, so they are never mistaken for a saved tensor."""
    tensors = [x for st in states for x in (st or ()) if isinstance(x, torch.Tensor)]
    templates = [st if st is None else tuple(_SAVED if isinstance(x, torch.Tensor) else x for x in st)
                 for st in states]
    return tensors, templates


def join_backend_states(templates: list, tensors) -> list:
    """The inverse of `split_backend_states`: `tensors` in the order they were saved."""
    saved = iter(tensors)
    return [st if st is None else tuple(next(saved) if x is _SAVED else x for x in st) for st in templates]


class ShiftedGroupAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec, scale, backend):
        bsz, hq, t, d = q.shape
        hkv = k.shape[1]
        fwd, _ = BACKENDS[backend]
        index = q.device.index or 0
        gqa = native_gqa(backend, index) if q.is_cuda else True
        pad_q = not bottom_right_causal(backend, index)
        overlap = pad_q and reads_overlapping_views(backend, index)
        pieces = _pieces(t, hq, hkv, spec.group_size, frozenset(spec.shifted(hq)), min(spec.sink, t), MAX_PIECE_HEADS)
        out = q.new_empty(bsz, t, hq, d)
        out_h = out.transpose(1, 2)  # (B, Hq, T, D) view of the result
        lses, states = [], []
        for b in range(bsz):
            for p in pieces:
                rep = (p.h1 - p.h0) // (p.k1 - p.k0)
                qp = _query_rows(q, b, p, (p.h0, p.h1), pad_q, overlap)
                kp, vp = (_key_rows(x, b, p, (p.k0, p.k1)) for x in (k, v))
                if not gqa:
                    kp, vp = repeat_kv_heads(kp, rep), repeat_kv_heads(vp, rep)
                o_rows = _view(out_h, b, p, (p.h0, p.h1))
                o, lse, st = fwd(qp, kp, vp, scale, out=None if pad_q else o_rows)
                if o is not o_rows:
                    o_rows.copy_(o[:, :, p.sink :] if pad_q else o)
                lses.append(lse)
                states.append(st)
                del qp, kp, vp, o  # one piece's temporaries at a time (peak memory)
        # Every tensor the backward needs goes through save_for_backward: held on ctx as an attribute it
        # outlives a checkpointed layer's forward (gradient checkpointing frees only saved tensors). For
        # the per-piece fp32 lse that was 128 MiB over 32 layers at 32K; the backend states' tensors
        # (cuDNN/flash: RNG seed and offset, sequence offsets) are small, but per piece and per layer.
        state_tensors, templates = split_backend_states(states)
        ctx.save_for_backward(q, k, v, out, *lses, *state_tensors)
        ctx.meta = (scale, backend, pieces, templates, len(lses), gqa, pad_q, overlap)
        return out

    @staticmethod
    def backward(ctx, dout):
        scale, backend, pieces, templates, n_lse, gqa, pad_q, overlap = ctx.meta
        q, k, v, out, *rest = ctx.saved_tensors
        lses, states = rest[:n_lse], join_backend_states(templates, rest[n_lse:])
        _, bwd = BACKENDS[backend]
        bsz = q.shape[0]
        out_h, do_h = out.transpose(1, 2), dout.contiguous().transpose(1, 2)  # (expanded grads have 0 strides)
        dq = torch.empty_like(q)
        # Each KV head's rows are written by one run of pieces whose groups tile [0, T), starting with the
        # group at token 0 (which holds the sink tokens; the other groups' sink gradients are added to it
        # later): the group rows can be copied, not added to zeros (one pass less over dK and dV). When a
        # KV head serves query heads of both kinds, two runs write its rows: then they are summed.
        kv_runs = [(p.k0, p.k1) for p in pieces if p.start == 0]
        shared = len({j for k0, k1 in kv_runs for j in range(k0, k1)}) < sum(k1 - k0 for k0, k1 in kv_runs)
        dk = torch.zeros_like(k) if shared else torch.empty_like(k)
        dv = torch.zeros_like(v) if shared else torch.empty_like(v)
        it = zip(lses, states)
        for b in range(bsz):
            for p in pieces:
                lse, st = next(it)
                rep = (p.h1 - p.h0) // (p.k1 - p.k0)
                qh, kh = (p.h0, p.h1), (p.k0, p.k1)
                qp, op = (_query_rows(x, b, p, qh, pad_q, overlap) for x in (q, out_h))
                dop = _query_rows(do_h, b, p, qh, pad_q, overlap, zero_lead=True)
                kp, vp = (_key_rows(x, b, p, kh) for x in (k, v))
                if not gqa:
                    kp, vp = repeat_kv_heads(kp, rep), repeat_kv_heads(vp, rep)
                # gradients straight into place where the backend writes there: dQ unless the queries
                # carry dummy rows, dK/dV unless the keys carry sinks or two runs share the KV head
                dq_rows = _view(dq, b, p, qh)
                kv_rows = [_view(x, b, p, kh) for x in (dk, dv)] if gqa and not (p.sink or shared) else [None, None]
                dqp, dkp, dvp = bwd(dop, qp, kp, vp, op, lse, scale, st, grads=(None if pad_q else dq_rows, *kv_rows))
                if not gqa:
                    dkp, dvp = sum_kv_groups(dkp, rep), sum_kv_groups(dvp, rep)
                if dqp is not dq_rows:
                    dq_rows.copy_(dqp[:, :, p.sink :] if pad_q else dqp)
                for full, part, rows in ((dk, dkp, kv_rows[0]), (dv, dvp, kv_rows[1])):
                    if part is rows:  # the backend wrote there
                        continue
                    rows = _view(full, b, p, kh) if rows is None else rows
                    (rows.add_ if shared else rows.copy_)(part[:, :, p.sink :])
                    if p.sink:  # the sink keys' gradient from every group of the piece
                        acc = torch.promote_types(full.dtype, torch.float32)  # fp32, fp64 for fp64
                        full[b, kh[0] : kh[1], : p.sink] += part[:, :, : p.sink].sum(0, dtype=acc).to(full.dtype)
                del qp, op, dop, kp, vp, dqp, dkp, dvp  # one piece's temporaries at a time (peak memory)
        return dq, dk, dv, None, None, None


def shifted_group_attention(q, k, v, spec: LayoutSpec, scale: Optional[float] = None,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Exact shifted-group attention: q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, T, Hq, D) contiguous.

    Any strides with a unit last stride (transformers' transposed (B, T, H, D) buffers are read in place).
    """
    check_attention_inputs(q, k, v)
    if spec.kind != "shifted_groups":
        raise ValueError(f"shifted_group_attention needs a shifted_groups spec, got {spec.kind}")
    b, hq, t, d = q.shape
    spec = spec.resolve(t)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    backend = backend or default_backend(q.device)
    head_major_ok = not q.is_cuda or reads_head_major_views(backend, q.device.index or 0)
    q, k, v = (x if x.stride(-1) == 1 and (head_major_ok or x.stride(1) <= x.stride(2))
               else x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    return ShiftedGroupAttentionFunction.apply(q, k, v, spec, scale, backend)
