"""Tile-shape sweep of the gathered-query kernel (MoH's skipping path) on the GPU, beside what it competes with.

The problem is MoH's routed part on a Llama-3-8B shape: 16 routed query heads over 4 KV heads, head_dim 128, bf16,
B = 1, each head chosen by a random half of the tokens (75% activation: 8 of 16 routed heads per token). Per
context it times, forward and forward + backward:

- ``gathered`` with each candidate ``KernelConfig`` (checked against the first config's output and gradients
  before it is timed: a wrong config is reported, never picked);
- ``cudnn_full``: SDPA causal on the same 16 heads over every row (twice the rows: the work the gathered kernel
  must beat by skipping half of it), and ``triton_full``: headwise's dense Triton kernel on the same.

``eff_vs_cudnn`` = 0.5 * ms(cudnn_full) / ms(gathered): the gathered kernel's throughput per computed row relative
to cuDNN's on dense causal attention (1.0 = as fast per row). One JSON line per timing goes to ``--out``
(default benchmarks/results/kernel_tuning.jsonl).

    python benchmarks/tune_gathered.py --contexts 8192,32768 --budget-s 400
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moh import random_attention_inputs, time_ms  # noqa: E402
from results_io import emit_row, utc_now  # noqa: E402

H, HKV, D = 16, 4, 128


def candidates():
    from headwise.kernels.block_sparse_attention import GPU_CONFIGS, KernelConfig

    base = GPU_CONFIGS[128]
    yield "default", base
    for fm, fn, fw, fs in [(128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2)]:
        yield f"fwd {fm}x{fn} w{fw} s{fs}", dataclasses.replace(base, fwd_m=fm, fwd_n=fn, fwd_warps=fw, fwd_stages=fs,
                                                                 dq_warps=fw)
    for bm, bn, w, s in [(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 1), (128, 128, 8, 2)]:
        yield f"bwd {bm}x{bn} w{w} s{s}", dataclasses.replace(base, bwd_m=bm, bwd_n=bn, dkdv_warps=w, dkdv_stages=s)


def main(argv: list[str] | None = None) -> int:
    import torch.nn.functional as F

    from headwise.kernels import LayoutSpec, gathered_query_attention, gathered_rows, sparse_attention_triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--density", type=float, default=0.5, help="share of the tokens choosing each head")
    ap.add_argument("--out", default="benchmarks/results/kernel_tuning.jsonl")
    ap.add_argument("--budget-s", type=float, default=1e9)
    args = ap.parse_args(argv)
    start = time.time()
    command = "python " + " ".join(["benchmarks/tune_gathered.py"] + (argv if argv is not None else sys.argv[1:]))
    common = dict(layout="moh_gathered", H=H, Hkv=HKV, D=D, density=args.density, gpu=torch.cuda.get_device_name(),
                  command=command)
    for t in (int(x) for x in args.contexts.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = random_attention_inputs(t, H, HKV, D, g)
        chosen = torch.rand(1, t, H, device="cuda", generator=g) < args.density
        rows, counts = gathered_rows(chosen)
        dense = {
            "cudnn_full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2),
            "triton_full": lambda: sparse_attention_triton(q, k, v, LayoutSpec("dense"))[0],
        }
        baseline = {}
        for passes in ("fwd", "fwd+bwd"):
            for name, fn in dense.items():
                ms = time_ms(fn, do, (q, k, v), passes)
                baseline[(name, passes)] = ms
                emit_row({**common, "T": t, "stage": passes, "form": name, "ms": round(ms, 3), "date": utc_now()},
                         args.out)
        reference = None
        for label, cfg in candidates():
            if time.time() - start > args.budget_s:
                print("budget reached", flush=True)
                return 0

            def fn(cfg=cfg):
                return gathered_query_attention(q, k, v, rows, counts, config=cfg)

            out = fn()
            out.backward(do)
            got = [out.detach().float()] + [x.grad.float() for x in (q, k, v)]
            for x in (q, k, v):
                x.grad = None
            if reference is None:
                reference = got
            correct = all(torch.allclose(a, b, rtol=2e-2, atol=2e-2) for a, b in zip(got, reference))
            row = {**common, "T": t, "form": "gathered", "label": label, "config": dataclasses.asdict(cfg),
                   "correct": correct}
            for passes in ("fwd", "fwd+bwd"):
                ms = time_ms(fn, do, (q, k, v), passes) if correct else None
                emit_row({**row, "stage": passes, "ms": None if ms is None else round(ms, 3),
                          "eff_vs_cudnn": None if ms is None else
                          round(args.density * baseline[("cudnn_full", passes)] / ms, 3), "date": utc_now()}, args.out)
        del q, k, v, do
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
