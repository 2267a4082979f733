"""A fixed workload for Nsight Compute: one forward + backward of the block-sparse kernel on one layout.

The kernel benchmark (`bench_kernels.py`) says how fast each layout runs; this script is what `ncu`
wraps to say why (issue 5: "profile it"). It compiles the kernels in `--warmup` passes, then runs
`--passes` forward + backward passes, so `ncu --launch-skip` can skip the warm-up launches. On the
H200 machines (Firecracker runtime) `ncu` reads the hardware counters with `--clock-control none`:

    ncu --clock-control none --target-processes all -k regex:"_fwd_kernel|_bwd_dq_kernel|_bwd_dkdv" \\
        --launch-skip 3 --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --csv python3 benchmarks/profile_kernels.py --layout streaming --hkv 8 \\
        > ncu_streaming_gqa4.csv

(3 launches per warm-up pass without a column split: forward, dQ, dK/dV; with `--col-split`, the
items and reduction kernels add two.) The layouts are bench_kernels.py's, at its shapes: B=1, 32
query heads, head_dim 128, bf16, `(B, T, H, D)` buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import _layouts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="streaming", choices=sorted(_layouts()))
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--hkv", type=int, default=32)
    p.add_argument("--col-split", type=int, default=None, help="KernelConfig.col_split (default: the layout's config)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--passes", type=int, default=1)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (this is the workload Nsight Compute profiles)")

    from headwise.kernels import sparse_attention_triton
    from headwise.kernels.block_sparse_attention import pick_config

    h, d = 32, 128
    spec = _layouts()[args.layout].resolve(args.T)
    cfg = pick_config(d, spec, "cuda")
    if args.col_split is not None:
        cfg = dataclasses.replace(cfg, col_split=args.col_split)
    g = torch.Generator(device="cuda").manual_seed(0)

    def buffer(n):  # transformers' layout: (B, T, H, D) memory, seen as (B, H, T, D)
        return torch.randn(1, args.T, n, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()

    q, k, v = buffer(h), buffer(args.hkv), buffer(args.hkv)
    do = torch.randn(1, args.T, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    for _ in range(args.warmup + args.passes):
        out, _ = sparse_attention_triton(q, k, v, spec, config=cfg)
        out.backward(do)
        q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    print(f"{args.layout} T={args.T} Hkv={args.hkv} config={cfg}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
