"""Probe: cuDNN's own sliding-window SDPA (a diagonal band, through cudnn-frontend) against our
sliding-window layout and FlexAttention on the same mask (GPU only).

Why this exists. Two issue-5 targets are out of reach for the Triton kernel family: the sliding
window is 0.90x FlexAttention at 32K and the dense causal layout 1.65x cuDNN. Nsight Compute puts
the kernels at 8 warps per SM, latency-bound (BENCHMARKS.md, "Targets (issue 5)"). cuDNN's SDPA
takes a diagonal band (`sliding_window_length`, cudnn-frontend >= 1.9), which torch's
`scaled_dot_product_attention` does not expose. If the band runs near cuDNN's dense-causal
throughput, the sliding-window layout (and the recent band of the streaming layout, with its sink
columns merged through the log-sum-exp as shifted groups do) can use it as its exact faster form.
Shifted groups already use cuDNN on regrouped tensors in the same way.

This script decides that question, and nothing in headwise depends on it yet.

1. It checks the band against a masked fp32 torch reference at a small shape, including which
   `sliding_window_length` gives our rule `q - window < k <= q`.
2. It times forward and forward + backward at each `--T`: the cuDNN band, ours
   (`sparse_attention`), FlexAttention, and SDPA-cuDNN dense causal.

    pip install nvidia-cudnn-frontend
    python benchmarks/probe_cudnn_band.py --T 8192,32768 --hkv 32,8 --window 4096

Any failure of the cudnn-frontend path (import, graph support, execution) is printed with its
message and the probe goes on, so one call always says what works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class CudnnBand:
    """Forward and backward cuDNN SDPA graphs for causal attention restricted to a band.

    `left` is cudnn-frontend's `sliding_window_length`. q/k/v and the output gradient are
    `(B, H, T, D)` views with unit stride on D (K/V may have fewer heads: GQA without a repeat); the
    graphs are built once for their shapes and strides. Outputs and gradients are contiguous
    `(B, H, T, D)`, the log-sum-exp `(B, H, T, 1)` fp32."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, left: int, scale: float):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        dt = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[q.dtype]
        heur = [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]

        g = cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        tq, tk, tv = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
        o, stats = g.sdpa(name="band", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale,
                          use_causal_mask=True, sliding_window_length=left)
        o.set_output(True).set_dim(list(q.shape)).set_stride(_packed(q.shape))
        stats.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        g.build(heur)
        self.fwd, self.fwd_t = g, (tq, tk, tv, o, stats)

        b = cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        out = q.new_empty(q.shape)
        lse = torch.empty(q.shape[0], q.shape[1], q.shape[2], 1, device=q.device, dtype=torch.float32)
        bq, bk, bv, bo, bdo = (b.tensor_like(t) for t in (q, k, v, out, dout))
        bstats = b.tensor_like(lse)
        dq, dk, dv = b.sdpa_backward(name="band_bwd", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bstats,
                                     attn_scale=scale, use_causal_mask=True, sliding_window_length=left)
        for t, like in ((dq, q), (dk, k), (dv, v)):
            t.set_output(True).set_dim(list(like.shape)).set_stride(_packed(like.shape))
        b.build(heur)
        self.bwd, self.bwd_t = b, (bq, bk, bv, bo, bdo, bstats, dq, dk, dv)
        size = max(g.get_workspace_size(), b.get_workspace_size())
        self.workspace = torch.empty(max(size, 1), device=q.device, dtype=torch.uint8)
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)

    def forward(self, q, k, v):
        tq, tk, tv, o, stats = self.fwd_t
        out = q.new_empty(q.shape)
        lse = torch.empty(q.shape[0], q.shape[1], q.shape[2], 1, device=q.device, dtype=torch.float32)
        self.fwd.execute({tq: q, tk: k, tv: v, o: out, stats: lse}, self.workspace, handle=self.handle)
        return out, lse

    def backward(self, q, k, v, out, lse, dout):
        bq, bk, bv, bo, bdo, bstats, dq, dk, dv = self.bwd_t
        grads = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
        self.bwd.execute({bq: q, bk: k, bv: v, bo: out, bdo: dout, bstats: lse,
                          dq: grads[0], dk: grads[1], dv: grads[2]}, self.workspace, handle=self.handle)
        return grads


def _packed(shape) -> list[int]:
    """Strides of a contiguous tensor of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def reference(q, k, v, window, scale):
    """fp32 masked attention with our sliding-window rule `q - window < k <= q`; GQA by repeat."""
    hq, hkv, t = q.shape[1], k.shape[1], q.shape[2]
    kk, vv = (x.float().repeat_interleave(hq // hkv, 1) for x in (k, v))
    i = torch.arange(t, device=q.device)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ vv


def check(hkv: int, window: int, t: int = 1024) -> int | None:
    """Which `sliding_window_length` reproduces our rule (forward and gradients), or None."""
    torch.manual_seed(0)
    q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = 128 ** -0.5
    ref = reference(q, k, v, window, scale)
    dout = torch.randn_like(ref).to(torch.bfloat16)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    low = reference(q.detach(), k.detach(), v.detach(), window, scale).to(torch.bfloat16)  # bf16 rounding only
    tol = 2 * (low.float() - ref).abs().max().item() + 1e-2
    for left in (window, window - 1, window + 1):
        try:
            band = CudnnBand(q.detach(), k.detach(), v.detach(), dout, left, scale)
            out, lse = band.forward(q.detach(), k.detach(), v.detach())
            grads = band.backward(q.detach(), k.detach(), v.detach(), out, lse, dout)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a probe reports, it does not stop
            print(f"  cudnn band left={left}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=3)
            return None
        err = (out.float() - ref).abs().max().item()
        gerr = max(((g.float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() for g, r in zip(grads, ref_grads))
        print(f"  hkv={hkv} window={window} left={left}: max |out - ref| {err:.4f} (tol {tol:.4f}), "
              f"max relative grad error {gerr:.4f}", flush=True)
        if err <= tol and gerr < 0.05:
            return left
    return None


def timings(t: int, hkv: int, window: int, left: int, quick: bool) -> dict:
    from bench_kernels import bench, make_fn
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from headwise.kernels import LayoutSpec

    torch.manual_seed(0)
    q = torch.randn(1, t, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, t, hkv, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(1, t, hkv, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    do = torch.randn(1, t, 32, 128, device="cuda", dtype=torch.bfloat16)
    spec = LayoutSpec("sliding_window", window=window)
    bm = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < window), None, None, t, t, device="cuda")
    flex = torch.compile(flex_attention)
    row = {"T": t, "Hkv": hkv, "window": window}
    qd, kd, vd, dod = q.detach(), k.detach(), v.detach(), do.transpose(1, 2)
    band = CudnnBand(qd, kd, vd, dod, left, 128 ** -0.5)
    for passes in ("fwd", "fwd+bwd"):
        def cudnn_band():
            out, lse = band.forward(qd, kd, vd)
            if passes == "fwd+bwd":
                band.backward(qd, kd, vd, out, lse, dod)

        row[f"ms_cudnn_band_{passes}"] = bench(cudnn_band, "cudnn band", quick)
        for kind, extra in (("headwise", None), ("flex", (flex, bm)), ("cudnn", None)):
            fn, _ = make_fn(kind, q, k, v, do, spec, passes, extra)
            row[f"ms_{kind}_{passes}"] = bench(fn, kind, quick)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="8192,32768")
    ap.add_argument("--hkv", default="32,8")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="append one JSON line per (T, Hkv) here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_cudnn_band: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import cudnn
    except ImportError as e:
        print(f"probe_cudnn_band: cudnn-frontend is not importable ({e}); pip install nvidia-cudnn-frontend", file=sys.stderr)
        return 2
    backend = getattr(cudnn, "backend_version", lambda: "?")()
    print(f"cudnn-frontend {getattr(cudnn, '__version__', '?')}, cuDNN backend {backend}, "
          f"torch {torch.__version__} (its cuDNN {torch.backends.cudnn.version()})", flush=True)
    hkvs = [int(h) for h in args.hkv.split(",")]
    lefts = {hkv: check(hkv, args.window) for hkv in hkvs}
    if any(left is None for left in lefts.values()):
        print(f"no sliding_window_length reproduced the rule for some KV-head counts ({lefts}); no timings", flush=True)
        return 1
    for t in (int(x) for x in args.T.split(",")):
        for hkv in hkvs:
            left = lefts[hkv]
            try:
                row = timings(t, hkv, args.window, left, args.quick)
            except Exception as e:  # noqa: BLE001
                print(f"T={t} hkv={hkv}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            row.update(sliding_window_length=left, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
