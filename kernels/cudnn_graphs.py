"""cuDNN's SDPA through cudnn-frontend graphs: any strides, outputs written where the caller says.

torch's private cuDNN SDPA ops allocate their own outputs and only know a top-left causal mask, so a
caller that runs attention on pieces of a larger tensor (shifted groups, `shifted_groups.py`) copies
every output and gradient piece into place, and pads queries for the mask's alignment. A
cudnn-frontend graph takes any (B, H, T, D) strides for every tensor, its outputs included, and a
causal mask aligned bottom-right or a left bound (the band, `band_attention.py`). One graph pair
(forward, backward) is built per geometry and cached; building costs tens of milliseconds, executing
only a launch.

The stats (log-sum-exp, natural log, fp32) are ``(B, H, T, 1)`` contiguous. Requires cudnn-frontend
(``pip install 'headwise[cudnn]'``); every function here imports it lazily.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

_HANDLES: dict[int, object] = {}


def cudnn_frontend_available() -> bool:
    try:
        import cudnn  # noqa: F401  (only whether it imports)
    except Exception:  # missing, or built for another CUDA
        return False
    return True


def _handle(device_index: int):
    import cudnn

    if device_index not in _HANDLES:
        with torch.cuda.device(device_index):
            _HANDLES[device_index] = cudnn.create_handle()
    handle = _HANDLES[device_index]
    cudnn.set_stream(handle, torch.cuda.current_stream(device_index).cuda_stream)
    return handle


def _geometry(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(x.shape), tuple(x.stride())


@functools.lru_cache(maxsize=256)
def _sdpa_graphs(device_index: int, dtype: torch.dtype, q_geo, k_geo, v_geo, o_geo, left: Optional[int],
                 bottom_right: bool, scale: float):
    """Forward and backward graphs for one geometry: ((graph, tensors), (graph, tensors), workspace
    bytes). The backward's dO, dQ, dK and dV take the geometries of O, Q, K and V. ``left``: the band's
    ``sliding_window_length`` (None: plain causal); ``bottom_right``: causal mask aligned bottom-right
    (query i of Tq sees keys <= i + Tk - Tq), else top-left."""
    import cudnn

    handle = _handle(device_index)
    io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
    f32 = cudnn.data_type.FLOAT
    b, h, t, _ = q_geo[0]
    stats_geo = ((b, h, t, 1), (h * t, t, 1, 1))
    mask = dict(use_causal_mask_bottom_right=True) if bottom_right else dict(use_causal_mask=True)
    if left is not None:
        mask["sliding_window_length"] = left

    def tensor(graph, geo, name, data_type=io):
        return graph.tensor(dim=list(geo[0]), stride=list(geo[1]), data_type=data_type, name=name)

    heur = [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]
    fwd = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    fq, fk, fv = tensor(fwd, q_geo, "q"), tensor(fwd, k_geo, "k"), tensor(fwd, v_geo, "v")
    fo, fstats = fwd.sdpa(name="sdpa", q=fq, k=fk, v=fv, generate_stats=True, attn_scale=scale, **mask)
    fo.set_output(True).set_dim(list(o_geo[0])).set_stride(list(o_geo[1]))
    fstats.set_output(True).set_data_type(f32).set_dim(list(stats_geo[0])).set_stride(list(stats_geo[1]))
    fwd.build(heur)

    bwd = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    bq, bk, bv = tensor(bwd, q_geo, "q"), tensor(bwd, k_geo, "k"), tensor(bwd, v_geo, "v")
    bo, bdo, bstats = tensor(bwd, o_geo, "o"), tensor(bwd, o_geo, "do"), tensor(bwd, stats_geo, "stats", f32)
    dq, dk, dv = bwd.sdpa_backward(name="sdpa_bwd", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bstats, attn_scale=scale,
                                   **mask)
    for grad, geo in ((dq, q_geo), (dk, k_geo), (dv, v_geo)):
        grad.set_output(True).set_dim(list(geo[0])).set_stride(list(geo[1]))
    bwd.build(heur)
    workspace = max(fwd.get_workspace_size(), bwd.get_workspace_size(), 1)
    return (fwd, (fq, fk, fv, fo, fstats)), (bwd, (bq, bk, bv, bo, bdo, bstats, dq, dk, dv)), workspace


def sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_h: torch.Tensor, scale: float, *,
                 left: Optional[int] = None, bottom_right: bool = False) -> torch.Tensor:
    """Writes attention of q (B, Hq, T, D) over k/v (B, Hkv, S, D) into ``out_h`` (B, Hq, T, D, any
    strides, not overlapping itself) and returns the log-sum-exp (B, Hq, T, 1) fp32. GQA when Hkv
    divides Hq."""
    index = q.device.index or 0
    lse = torch.empty(q.shape[0], q.shape[1], q.shape[2], 1, device=q.device, dtype=torch.float32)
    (graph, (fq, fk, fv, fo, fstats)), _, ws = _sdpa_graphs(
        index, q.dtype, _geometry(q), _geometry(k), _geometry(v), _geometry(out_h), left, bottom_right, scale)
    workspace = torch.empty(ws, device=q.device, dtype=torch.uint8)
    graph.execute({fq: q, fk: k, fv: v, fo: out_h, fstats: lse}, workspace, handle=_handle(index))
    return lse


def sdpa_backward(do_h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_h: torch.Tensor,
                  lse: torch.Tensor, scale: float, grads: tuple[Optional[torch.Tensor], ...] = (None, None, None), *,
                  left: Optional[int] = None, bottom_right: bool = False) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of `sdpa_forward`'s attention, written into ``grads`` where given (views of any
    strides), else into new tensors like q, k, v."""
    index = q.device.index or 0
    _, (graph, (bq, bk, bv, bo, bdo, bstats, dq, dk, dv)), ws = _sdpa_graphs(
        index, q.dtype, _geometry(q), _geometry(k), _geometry(v), _geometry(out_h), left, bottom_right, scale)
    if _geometry(do_h) != _geometry(out_h):  # the graph reads dO with O's strides
        do_h = torch.empty_like(out_h).copy_(do_h)
    # a target whose strides differ from its input's gets a scratch tensor, copied into it afterwards
    scratch = [g if g is not None and _geometry(g) == _geometry(x) else torch.empty_like(x)
               for g, x in zip(grads, (q, k, v))]
    workspace = torch.empty(ws, device=q.device, dtype=torch.uint8)
    graph.execute({bq: q, bk: k, bv: v, bo: out_h, bdo: do_h, bstats: lse, dq: scratch[0], dk: scratch[1],
                   dv: scratch[2]}, workspace, handle=_handle(index))
    return tuple(t if g is None or g is t else g.copy_(t) for g, t in zip(grads, scratch))
