"""Tile-shape sweep of the Triton block-sparse kernel on the GPU: which KernelConfig is fastest per layout.

    python benchmarks/tune_kernels.py --layouts s2,streaming,dense,sliding_window --T 32768 --hkv 32 --budget-s 480

The kernel's configs (`kernels/block_sparse_attention.py`, GPU_CONFIGS) are fixed guesses; this
sweeps them in stages per layout, so the grid stays small: (1) forward tiles / warps / stages,
timed on the forward alone; (2) with the best forward config, the dK/dV tiles and the dQ / dK-dV warps
and stages, timed on forward + backward; (3) with the best of those, the dK/dV column split
(`KernelConfig.col_split`: long key columns shared by several programs), timed on forward + backward.
Stage `dq_path` (run only when listed in `--stages`, after `fwd+bwd`) tries dQ added up by the dK/dV
pass instead of its own kernel (`KernelConfig.dq_path`: relaxed element atomics, or TMA reduce-adds
over a few dK/dV tiles, warp counts and stage counts), timed on forward + backward. Stage `unmasked`
(also only when listed) times the current config with `KernelConfig.unmasked_even` flipped: what the
mask-free tiles of divisible lengths save; `unmasked_fwd` does the same on the forward alone.
`--stages` picks a subset (e.g. `--stages col_split`: the split alone on the current config). Every
config is checked against the current config's output (and gradients, from stage 2 on) before it is
timed: a wrong config is reported, never picked. The stages ran on the H200 on 2026-11-30
(TUNED_D128 comes from them). A forward through tensor descriptors (TMA), with and without Triton's
warp-specialized loop, was tried the same way and removed: it was no faster (rows with
`"stage": "tma"`; docs/notes.md, "Kernels"). One JSON line per timing goes to
benchmarks/results/kernel_tuning.jsonl (`--out`), and the best config per layout is printed as a
GPU_CONFIGS-style line, with its speed-up over the current config measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import _layouts  # noqa: E402
from results_io import append_rows, utc_now  # noqa: E402

FWD_TILES = [(128, 64), (128, 128), (64, 64), (64, 128)]
BWD_TILES = [(64, 128), (128, 64), (64, 64), (128, 128)]
WARPS = [4, 8]
FWD_STAGES = [2, 3, 4]
BWD_STAGES = [1, 2, 3]
COL_SPLITS = [16, 32, 64, 128]  # KernelConfig.col_split (0, off, is the stage's baseline)
STAGES = ("fwd", "fwd+bwd", "dq_path", "col_split", "unmasked", "unmasked_fwd")  # the order stages run in, each from the previous best
DQ_TILES = [(64, 128), (128, 128)]  # dK/dV tiles tried with dQ from the dK/dV pass (besides the current ones)


def timed(fn, budget_ms: float = 200.0) -> float | None:
    import triton

    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=budget_ms, return_mode="median")
    except Exception as e:  # out of shared memory, unsupported shape: recorded, not fatal
        print(f"    ! {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="s2,streaming,dense")
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--hkv", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--stages", default="fwd,fwd+bwd,col_split",
                   help="comma-separated subset of fwd,fwd+bwd,dq_path,col_split,unmasked,unmasked_fwd (dq_path, "
                        "unmasked and unmasked_fwd only when listed)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernel_tuning.jsonl"))
    args = p.parse_args(argv)

    from headwise.kernels import sparse_attention_triton
    from headwise.kernels.block_sparse_attention import pick_config

    start, dev, h, d = time.time(), "cuda", 32, 128
    g = torch.Generator(device=dev).manual_seed(0)
    leaf = lambda n: torch.randn(1, args.T, n, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2).detach().requires_grad_()  # noqa: E731
    q, k, v = leaf(h), leaf(args.hkv), leaf(args.hkv)
    do = torch.randn(1, args.T, h, d, device=dev, dtype=torch.bfloat16, generator=g)
    for name in args.layouts.split(","):
        spec = _layouts()[name].resolve(args.T)
        base = pick_config(d, spec, dev)

        def run(cfg, backward):
            def f():
                out, _ = sparse_attention_triton(q, k, v, spec, config=cfg)
                if backward:
                    out.backward(do)
                    q.grad = k.grad = v.grad = None
                return out
            return f

        ref = run(base, False)().detach()

        def grads(cfg):
            out, _ = sparse_attention_triton(q, k, v, spec, config=cfg)
            return torch.autograd.grad(out, (q, k, v), do)

        ref_grads = grads(base)

        def correct(cfg, backward):
            if not torch.allclose(run(cfg, False)().float(), ref.float(), atol=2e-2, rtol=2e-2):
                return False
            return not backward or all(torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)
                                       for a, b in zip(grads(cfg), ref_grads))
        rows, best = [], {}
        prev = base
        for stage in [x for x in STAGES if x in args.stages.split(",")]:
            # each stage starts from the best config of the stage before it (or the current one)
            backward = stage not in ("fwd", "unmasked_fwd")
            if stage == "fwd":
                grid = [dataclasses.replace(prev, fwd_m=m, fwd_n=n, fwd_warps=w, fwd_stages=s)
                        for (m, n), w, s in itertools.product(FWD_TILES, WARPS, FWD_STAGES)]
            elif stage == "fwd+bwd":
                grid = [dataclasses.replace(prev, bwd_m=m, bwd_n=n, dq_warps=w, dkdv_warps=w, dq_stages=s, dkdv_stages=s)
                        for (m, n), w, s in itertools.product(BWD_TILES, WARPS, BWD_STAGES)]
            elif stage == "dq_path":  # dQ added up by the dK/dV pass: element atomics once, TMA over tiles/warps
                tiles = dict.fromkeys([(prev.bwd_m, prev.bwd_n), *DQ_TILES])
                grid = [dataclasses.replace(prev, dq_path="atomic")] + [
                    dataclasses.replace(prev, dq_path="tma", bwd_m=m, bwd_n=n, dkdv_warps=w, dkdv_stages=st)
                    for (m, n), w, st in itertools.product(tiles, WARPS, BWD_STAGES)]
            elif stage == "col_split":  # the dK/dV column split on top of the best tiles
                grid = [dataclasses.replace(prev, col_split=c) for c in COL_SPLITS]
            else:  # row masks kept on lengths the tiles divide: what the unmasked tiles save (fwd+bwd / fwd)
                grid = [dataclasses.replace(prev, unmasked_even=not prev.unmasked_even)]
            base_ms = timed(run(prev, backward))
            for cfg in grid:
                if time.time() - start > args.budget_s:
                    print(f"budget reached in {name} {stage}", flush=True)
                    break
                try:
                    ok = correct(cfg, backward)
                except Exception as e:
                    print(f"    ! {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                ms = timed(run(cfg, backward)) if ok else None
                row = dict(layout=name, T=args.T, H=h, Hkv=args.hkv, D=d, stage=stage, config=dataclasses.asdict(cfg),
                           ms=None if ms is None else round(ms, 3), correct=ok,
                           ms_stage_baseline=None if base_ms is None else round(base_ms, 3),
                           gpu=torch.cuda.get_device_name(), date=utc_now(),
                           command="python benchmarks/tune_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]))
                rows.append(row)
                if ok and ms is not None and (stage not in best or ms < best[stage][1]):
                    best[stage] = (cfg, ms)
            if base_ms and (stage not in best or best[stage][1] > base_ms):
                best[stage] = (prev, base_ms)  # no candidate beat the starting config: the next stage keeps it
            prev = best.get(stage, (prev,))[0]
            if stage in best and base_ms:
                print(f"{name} {stage}: best {best[stage][1]:.2f} ms vs current {base_ms:.2f} ms "
                      f"({base_ms / best[stage][1]:.2f}x): {best[stage][0]}", flush=True)
        append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
