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

`--breakdown` needs no Nsight: it runs the same forward + backward under torch.profiler, for the
dispatched form (`sparse_attention`) and for FlexAttention on the same mask, and prints each GPU
kernel's time per pass, the GPU-busy total and the wall time per pass (a wall time well above the
busy time means the host, not the GPU, sets the pace):

    python benchmarks/profile_kernels.py --layout streaming --T 8192 --hkv 32 --breakdown
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
    p.add_argument("--dq-path", default=None, help="KernelConfig.dq_path (default: the layout's config)")
    p.add_argument("--breakdown", action="store_true", help="per-kernel GPU times (torch.profiler), ours and Flex's")
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
    if args.dq_path is not None:
        cfg = dataclasses.replace(cfg, dq_path=args.dq_path)
    g = torch.Generator(device="cuda").manual_seed(0)

    def buffer(n):  # transformers' layout: (B, T, H, D) memory, seen as (B, H, T, D)
        return torch.randn(1, args.T, n, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()

    q, k, v = buffer(h), buffer(args.hkv), buffer(args.hkv)
    do = torch.randn(1, args.T, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    if args.breakdown:
        return _breakdown(args, spec, cfg, q, k, v, do)
    for _ in range(args.warmup + args.passes):
        out, _ = sparse_attention_triton(q, k, v, spec, config=cfg)
        out.backward(do)
        q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    print(f"{args.layout} T={args.T} Hkv={args.hkv} config={cfg}", flush=True)
    return 0


def _breakdown(args, spec, cfg, q, k, v, do) -> int:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from bench_kernels import mask_mod_for
    from headwise.kernels import attention_impl, sparse_attention, sparse_attention_triton

    impl = attention_impl(spec, q, n_kv_heads=k.shape[1])
    flex = torch.compile(flex_attention, dynamic=False)
    # compiled, as in bench_kernels.py: eager create_block_mask materialises the (T, T) mask (256 GiB at 32K)
    h, t = q.shape[1], args.T
    bm = torch.compile(create_block_mask)(mask_mod_for(spec, h, "cuda"), 1, h, t, t, device="cuda")

    def ours():
        if impl == "block_sparse":  # with --col-split / --dq-path applied
            out = sparse_attention_triton(q, k, v, spec, config=cfg)[0]
        else:
            out = sparse_attention(q, k, v, spec)
        out.backward(do)

    def theirs():
        flex(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1]).backward(do.transpose(1, 2))

    passes = max(args.passes, 10)
    print(f"{args.layout} T={args.T} Hkv={args.hkv} fwd+bwd, {passes} passes; ours = {impl}"
          + (f" {cfg}" if impl == "block_sparse" else ""), flush=True)
    for name, fn in (("ours", ours), ("flex", theirs)):
        table, busy, wall = kernel_times(fn, passes, warmup=max(args.warmup, 3), grads=(q, k, v))
        print(f"  {name}: GPU busy {busy:.3f} ms/pass, wall {wall:.3f} ms/pass")
        for kname, (ms, calls) in sorted(table.items(), key=lambda x: -x[1][0]):
            print(f"    {ms:8.3f} ms  x{calls:g}  {kname[:110]}")
    return 0


def kernel_times(fn, passes: int, warmup: int, grads=()) -> tuple[dict[str, tuple[float, float]], float, float]:
    """({kernel name: (ms per pass, launches per pass)}, GPU-busy ms per pass, wall ms per pass) of
    ``fn`` under torch.profiler, after ``warmup`` untimed calls; ``grads``' .grad is cleared each pass."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def step():
        fn()
        for x in grads:
            x.grad = None

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(passes):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / passes
    table = {e.key: (e.self_device_time_total / 1e3 / passes, e.count / passes)
             for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0}
    return table, sum(ms for ms, _ in table.values()), wall


if __name__ == "__main__":
    sys.exit(main())
