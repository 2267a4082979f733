"""Exact shifted-group attention (SF-Attn, LongLoRA S2-Attn) through a dense kernel on regrouped tensors.

A shifted-group layout is block-diagonal: inside its group a query sees every earlier key, and the
groups of a head never interact. So instead of a block-sparse kernel we can

1. regroup: move every group of every head into its own batch row, ``(B * n, Hq, G, D)``. Unshifted
   heads take tokens ``[0, nG)``; shifted heads take ``[G/2, G/2 + nG)``, and their leading half-group
   ``[0, G/2)`` (its own short group: no wrap-around) goes to a second, ``(B, Hs, G/2, D)`` call. The
   tail is zero-padded; padding only ever follows real tokens, so causality hides it from them.
2. run the best dense causal kernel on both (SDPA's cuDNN backend on Hopper, the flash backend as a
   fallback, a plain torch implementation on CPU), keeping its log-sum-exp;
3. add the sink columns as a separate tiny attention (every query against the first ``sink`` keys,
   minus the keys already inside the query's own group, causal), merged through the log-sum-exp.

The backward reuses the dense kernel's own backward: for the merged softmax, the group part's
gradient is the dense backward run with ``grad_out = w * dO`` and ``out = O_final`` (the merged
output), where ``w = exp(lse_group - lse)``: the dense backward computes
``dS = P_g * (dP' - rowsum(dO' * O'))`` and with these arguments that is exactly
``w * P_g * (dO V^T - rowsum(dO * O_final))``, the merged softmax's gradient on the group keys. The
sink part's gradient is computed directly (it is ``T x sink`` scores). No lse gradient is accepted
(``sparse_attention`` routes ``return_lse=True`` to the block-sparse kernel).

GQA: K/V are expanded to the query heads before regrouping (shifted and unshifted query heads of one
KV head read different token windows) and the gradients are summed back per KV head.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .layouts import LayoutSpec

# ------------------------------------------------------------------------------ dense causal backends
# Each backend: fwd(q, k, v, scale) -> (out, lse (natural log, fp32, (B, H, T))), and
# bwd(do, q, k, v, out, lse, scale, state) -> (dq, dk, dv), for (B, H, T, D) contiguous inputs.


def _torch_fwd(q, k, v, scale):
    t = q.shape[2]
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = (torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(q.dtype)
    return out, lse, None


def _torch_bwd(do, q, k, v, out, lse, scale, state):
    t = q.shape[2]
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    delta = (dof * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    return (ds @ kf * scale).to(q.dtype), (ds.transpose(-1, -2) @ qf * scale).to(k.dtype), dv.to(v.dtype)


def _cudnn_fwd(q, k, v, scale):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    out, lse = r[0], r[1]
    return out, lse.reshape(q.shape[:3]).float(), r


def _cudnn_bwd(do, q, k, v, out, lse, scale, state):
    r = state
    lse_native = r[1]
    lse_in = lse.reshape(lse_native.shape).to(lse_native.dtype)
    # attn_bias is a non-optional Tensor in the backward's schema; None reaches C++ as an undefined
    # tensor (no bias). default_backend() probes this once and falls back to flash if it fails.
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse_in, r[6], r[7], None, r[2], r[3], r[4], r[5], 0.0, True, scale=scale
    )


def _flash_fwd(q, k, v, scale):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return r[0], r[1].reshape(q.shape[:3]).float(), r


def _flash_bwd(do, q, k, v, out, lse, scale, state):
    r = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse.reshape(r[1].shape).to(r[1].dtype), r[2], r[3], r[4], r[5], 0.0, True, r[6], r[7],
        scale=scale,
    )


BACKENDS = {"torch": (_torch_fwd, _torch_bwd), "cudnn": (_cudnn_fwd, _cudnn_bwd), "flash": (_flash_fwd, _flash_bwd)}


@functools.lru_cache(maxsize=None)
def _cudnn_works(device_index: int) -> bool:
    try:
        x = torch.randn(1, 2, 128, 64, device=f"cuda:{device_index}", dtype=torch.bfloat16)
        o, lse, st = _cudnn_fwd(x, x, x, 0.125)
        _cudnn_bwd(torch.ones_like(o), x, x, x, o, lse, 0.125, st)
        return True
    except Exception:  # cuDNN missing, or this torch's private op signature differs
        return False


def default_backend(device) -> str:
    """cuDNN on Hopper and newer (fastest dense causal there: DESIGN.md anchors) when its private
    ops work in this torch, flash elsewhere on CUDA, torch on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return "cudnn" if major >= 9 and _cudnn_works(index) else "flash"


# ------------------------------------------------------------------------------------ regrouping


class _Plan:
    """Index bookkeeping of one (T, G, shifted heads) regrouping."""

    def __init__(self, t, hq, g, shifted):
        self.t, self.hq, self.g, self.half = t, hq, g, g // 2
        self.n = max(1, -(-t // g))
        sh = set(shifted)
        self.hs = len(sh)
        # contiguous runs of (first head, end head, shifted?): slices copy with plain strided kernels
        self.runs = []
        for h in range(hq):
            if self.runs and self.runs[-1][2] == (h in sh) and self.runs[-1][1] == h:
                self.runs[-1][1] = h + 1
            else:
                self.runs.append([h, h + 1, h in sh])

    def split(self, x):
        """x (B, Hq, T, D) -> main (B * n, Hq, G, D), half (B, Hs, G/2, D) or None; contiguous."""
        b, hq, t, d = x.shape
        n, g, half = self.n, self.g, self.half
        xp = F.pad(x, (0, 0, 0, n * g + half - t))
        main = x.new_empty(b, n, hq, g, d)
        halves = []
        for h0, h1, shifted in self.runs:
            s0 = half if shifted else 0
            main[:, :, h0:h1] = xp[:, h0:h1, s0 : s0 + n * g].reshape(b, h1 - h0, n, g, d).transpose(1, 2)
            if shifted:
                halves.append(xp[:, h0:h1, :half])
        halfx = torch.cat(halves, 1).contiguous() if halves else None
        return main.view(b * n, hq, g, d), halfx

    def merge(self, main, halfx, b):
        """Inverse of ``split`` for (.., L) or (.., L, D) tensors: returns (B, Hq, T[, D])."""
        n, g, half, t = self.n, self.g, self.half, self.t
        tail = main.shape[3:]
        main = main.view(b, n, self.hq, g, *tail)
        out = main.new_empty(b, self.hq, t, *tail)
        hi = 0  # position among the shifted heads (order of halfx)
        m = min(t, half)
        for h0, h1, shifted in self.runs:
            src = main[:, :, h0:h1].transpose(1, 2).reshape(b, h1 - h0, n * g, *tail)
            if shifted:
                out[:, h0:h1, :m] = halfx[:, hi : hi + h1 - h0, :m]
                hi += h1 - h0
                if t > half:
                    out[:, h0:h1, half:] = src[:, :, : t - half]
            else:
                out[:, h0:h1] = src[:, :, :t]
        return out


def _sink_mask(spec, t, hq, device):
    """(Hq, T, s) bool: key k < sink is an extra key for query q (causal, outside q's own group)."""
    s, g = spec.sink, spec.group_size
    sh = set(spec.shifted(hq))
    off = torch.tensor([g // 2 if h in sh else 0 for h in range(hq)], device=device).view(-1, 1, 1)
    qpos = torch.arange(t, device=device).view(1, -1, 1)
    kpos = torch.arange(s, device=device).view(1, 1, -1)
    same = torch.div(qpos + off, g, rounding_mode="floor") == torch.div(kpos + off, g, rounding_mode="floor")
    return (kpos <= qpos) & ~same


class ShiftedGroupAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec, scale, backend):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        rep = hq // hkv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        fwd, _ = BACKENDS[backend]
        plan = _Plan(t, hq, spec.group_size, spec.shifted(hq))
        qm, qh = plan.split(q)
        km, kh = plan.split(k)
        vm, vh = plan.split(v)
        om, lm, sm = fwd(qm, km, vm, scale)
        oh = lh = sh_state = None
        if qh is not None:
            oh, lh, sh_state = fwd(qh, kh, vh, scale)
        o = plan.merge(om, oh, b)  # (B, Hq, T, D)
        lse = plan.merge(lm, lh, b)  # (B, Hq, T) fp32
        s = min(spec.sink, t)
        smask = None
        if s > 0:
            smask = _sink_mask(spec, t, hq, q.device)
            sc = (q @ k[:, :, :s].transpose(-1, -2)).float() * scale  # (B, Hq, T, s), small
            sc = sc.masked_fill(~smask, float("-inf"))
            lse_s = torch.logsumexp(sc, -1)
            lse_all = torch.logaddexp(lse, lse_s)
            ps = torch.exp(sc - lse_all.unsqueeze(-1))  # merged-softmax weights of the sink keys
            # merge in the input precision: o is already rounded to it, and the sink term is tiny
            o = torch.addcmul((ps.to(q.dtype) @ v[:, :, :s]), o, torch.exp(lse - lse_all).unsqueeze(-1).to(q.dtype))
            lse_g, lse = lse, lse_all
        else:
            lse_g = lse
        ctx.save_for_backward(q, k, v, o, lse, lse_g, lm, lh)
        ctx.meta = (spec, scale, backend, plan, rep, s, smask, sm, sh_state)
        return o.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse, lse_g, lm, lh = ctx.saved_tensors
        spec, scale, backend, plan, rep, s, smask, sm, sh_state = ctx.meta
        b, hq, t, d = q.shape
        _, bwd = BACKENDS[backend]
        do = dout.transpose(1, 2)  # (B, Hq, T, D)
        w = torch.exp(lse_g - lse).unsqueeze(-1)
        dog = do * w.to(q.dtype) if s > 0 else do
        qm, qh = plan.split(q)
        km, kh = plan.split(k)
        vm, vh = plan.split(v)
        dom, doh = plan.split(dog)
        om, oh = plan.split(o)
        dqm, dkm, dvm = bwd(dom, qm, km, vm, om, lm, scale, sm)
        dqh = dkh = dvh = None
        if qh is not None:
            dqh, dkh, dvh = bwd(doh, qh, kh, vh, oh, lh, scale, sh_state)
        dq = plan.merge(dqm, dqh, b)
        dk = plan.merge(dkm, dkh, b)
        dv = plan.merge(dvm, dvh, b)
        if s > 0:
            ks, vs = k[:, :, :s], v[:, :, :s]
            sc = (q @ ks.transpose(-1, -2)).float() * scale
            ps = torch.exp(sc.masked_fill(~smask, float("-inf")) - lse.unsqueeze(-1))
            delta = (do.float() * o.float()).sum(-1, keepdim=True)
            ds = ps * ((do @ vs.transpose(-1, -2)).float() - delta)
            dq = dq + (ds.to(q.dtype) @ ks) * scale
            # (s x T) @ (T x D) products: accumulate in fp32 (T terms), they are small
            dk[:, :, :s] += (ds.transpose(-1, -2) @ q.float() * scale).to(dk.dtype)
            dv[:, :, :s] += (ps.transpose(-1, -2) @ do.float()).to(dv.dtype)
        if rep > 1:  # sum the expanded heads back per KV head, in fp32
            dk = dk.view(b, hq // rep, rep, t, d).sum(2, dtype=torch.float32)
            dv = dv.view(b, hq // rep, rep, t, d).sum(2, dtype=torch.float32)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def shifted_group_attention(q, k, v, spec: LayoutSpec, scale: Optional[float] = None,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Exact shifted-group attention: q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, T, Hq, D)."""
    if spec.kind != "shifted_groups":
        raise ValueError(f"shifted_group_attention needs a shifted_groups spec, got {spec.kind}")
    b, hq, t, d = q.shape
    spec = spec.resolve(t)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    backend = backend or default_backend(q.device)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return ShiftedGroupAttentionFunction.apply(q, k, v, spec, scale, backend)
