"""Where a static decode step spends its GPU time: torch.profiler over a few steps, per policy.

    python benchmarks/diag_decode.py --context 32768 --policies full,streaming --top 12

Uses bench_decode.py's Llama-3-8B shape and synthetic cache. For each policy it prints the CUDA-graph
ms/token of three decode paths (the torch attention chain; the fused Triton decode kernel
`headwise.kernels.decode_attention`; the fused kernel inside the inductor-compiled step,
`StaticDecoder(mode="compile")`), then profiles a few un-captured steps of the last one and prints the top
CUDA kernels and the split of GPU time between matrix products (the weight GEMVs) and everything
else, to check the decode path against its bandwidth bound. (A torch split-K form of the decode P @ V
product was compared here on 2026-11-30 and dropped: it was no faster.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import LLAMA3_8B, build_model, policies, synthetic_cache  # noqa: E402


MATMUL_NAMES = ("gemv", "gemm", "nvjet", "cutlass", "sm90_xmma", "splitk")


def graph_ms(model, policy, context, steps=32, fused=False, mode="cuda_graph"):
    from headwise.inference import attention as kv_attention
    from headwise.inference.static_decode import StaticDecoder

    kv_attention.FUSED_DECODE = fused
    dec = StaticDecoder(model, policy, max_new_tokens=steps + 8, mode=mode)
    dyn = synthetic_cache(model, policy, context, 1)
    dec.static_from(dyn, torch.zeros(1, dtype=torch.long, device="cuda"), torch.full((1,), context, device="cuda"))
    del dyn
    dec.decode(4)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.decode(steps + 1)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps, dec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--policies", default="full,streaming")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--no-fused", action="store_true", help="profile the torch path instead of the fused kernel")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile

    model = build_model(LLAMA3_8B, torch.bfloat16, "cuda")
    table = policies(LLAMA3_8B)
    paths = [("torch path", False, "cuda_graph"), ("fused kernel", True, "cuda_graph"),
             ("fused kernel, compiled step", True, "compile")]
    for name in args.policies.split(","):
        policy = table[name]
        for label, fused, mode in paths:
            if fused and args.no_fused:
                continue
            ms, dec = graph_ms(model, policy, args.context, fused=fused, mode=mode)
            print(f"{name} @ {args.context}: {label}: {ms:.2f} ms/token (CUDA graph)", flush=True)
        step = dec._compiled or dec._step
        dec._graph = None
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(events.table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70), flush=True)
        total = sum(e.self_device_time_total for e in events) / 3 / 1000
        mm = sum(e.self_device_time_total for e in events if any(w in e.key.lower() for w in MATMUL_NAMES)) / 3 / 1000
        kernels = sum(e.count for e in events) / 3
        print(f"{name}: per step {total:.2f} ms of kernels ({kernels:.0f} launches): matrix products {mm:.2f} ms, "
              f"the rest {total - mm:.2f} ms", flush=True)
        del dec
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
