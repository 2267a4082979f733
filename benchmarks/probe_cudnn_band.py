"""Diagnose cuDNN's diagonal-band SDPA (cudnn-frontend) for the band layouts on this GPU.

`kernels/band_attention.py` runs the sliding-window layout (by default) and streaming (with
`HEADWISE_BAND_IMPL=cudnn`) on cuDNN's own band, when `band_left_offset` finds it works. That probe
swallows errors, because it decides a dispatch.
This script runs the same steps and prints every failure in full:

1. the import and the versions;
2. the band forward and backward on strided GQA inputs, for each candidate `sliding_window_length`
   (window - 1, window, window + 1), against the torch backend in fp32. This shows which one
   reproduces our rule `q - window < k <= q`;
3. the streaming decomposition (band + top-left causal sink part) against the reference.

It needs a GPU and `pip install 'headwise[cudnn]'`. The timings live in `bench_kernels.py`: its
sliding-window and streaming rows gain `ms_band` where the band works.

    python benchmarks/probe_cudnn_band.py
    python benchmarks/bench_kernels.py --layouts sliding_window,streaming --plan 8192:fwd+bwd:32,32768:fwd+bwd:32,32768:fwd+bwd:8
"""

from __future__ import annotations

import sys
import traceback

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_cudnn_band: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import cudnn
    except ImportError as e:
        print(f"probe_cudnn_band: cudnn-frontend is not importable ({e}); pip install 'headwise[cudnn]'", file=sys.stderr)
        return 2
    from headwise.kernels import LayoutSpec, reference_attention
    from headwise.kernels.band_attention import (
        band_layout_attention,
        band_left_offset,
        band_offset_matches,
        band_ready,
        compare_band_offsets,
    )

    backend = getattr(cudnn, "backend_version", lambda: "?")()
    print(f"cudnn-frontend {getattr(cudnn, '__version__', '?')}, cuDNN backend {backend}, torch {torch.__version__} "
          f"(its cuDNN {torch.backends.cudnn.version()}), {torch.cuda.get_device_name()}", flush=True)
    ok = False
    for hkv in (32, 8):
        for offset, errors in compare_band_offsets(torch.cuda.current_device(), t=1024, hq=32, hkv=hkv, d=128, window=256):
            label = f"hkv={hkv} sliding_window_length=window{offset:+d}"
            if isinstance(errors, Exception):
                print(f"{label}: {type(errors).__name__}: {str(errors)[:600]}", flush=True)
                traceback.print_exception(errors, limit=4)
                continue
            print(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items())
                  + (" (matches)" if band_offset_matches(errors) else ""), flush=True)
            ok = ok or band_offset_matches(errors)
    print(f"band_left_offset: {band_left_offset(torch.cuda.current_device())}", flush=True)
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(t, h, d=128):  # transformers' transposed (B, T, H, D) buffers
        return torch.randn(1, t, h, d, device=device, dtype=torch.bfloat16, generator=gen).transpose(1, 2)

    for spec in (LayoutSpec("sliding_window", window=256), LayoutSpec("streaming", sink=128, recent=256)):
        if not band_ready(device, spec):
            print(f"{spec.kind}: band_ready False", flush=True)
            continue
        q, k, v = leaf(2048, 32).requires_grad_(), leaf(2048, 8).requires_grad_(), leaf(2048, 8).requires_grad_()
        out = band_layout_attention(q, k, v, spec)
        ref = reference_attention(q.detach().float(), k.detach().float(), v.detach().float(), spec)
        print(f"{spec.kind}: max |out - ref| {(out.float() - ref).abs().max().item():.4f} (bf16 rounding ~1e-2)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
