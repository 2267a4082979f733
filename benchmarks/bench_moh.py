"""MoH attention time on a GPU: the gathered form (compute really skipped) against the masking form and dense.

One layer's attention function, forward + backward (or forward alone), on a Llama-3-8B shape (32 query heads,
8 KV heads, head_dim 128, bf16, B = 1), q/k/v as transformers hands them ((B, T, H, D) buffers seen as (B, H, T, D)):

- ``dense``: SDPA causal over every head (what a dense model's layer runs; cuDNN or flash, torch's pick);
- ``masking``: MoH as every released MoH model computes it: the router's gates, SDPA over every head, the unchosen
  heads multiplied by zero (``MoHMethod.compute = "masking"``);
- ``gathered``: headwise's skipping form (``compute = "gathered"``): the router's gates, the shared heads by SDPA,
  each routed head's chosen query rows only by ``headwise.kernels.gathered_query_attention``.

Both MoH forms include the router (query norms, softmax, top-k) and the gate multiply: the whole attention
function. Queries are random, so the query-norm router spreads tokens evenly over the routed heads, as the balance
loss aims for. ``ratio`` = ms of the form / ms of dense; the issue's target for the gathered form is at most
(active share + 0.10) of dense (0.85 at 75% active).

    python benchmarks/bench_moh.py                                  # 8K and 32K, 75% and 50%, fwd+bwd
    python benchmarks/bench_moh.py --contexts 8192 --passes fwd --activations 0.75

Rows go to ``--out`` (default ``benchmarks/results/kernels.jsonl``), one per (context, pass, activation, router).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import emit_row  # noqa: E402

H, HKV, D = 32, 8, 128
# activation -> shared share: MoH-LLaMA3's split at 75% (16 shared + 8 of 16 routed); at 50%, 8 shared + 8 of 24
SHARED = {0.75: 0.5, 0.5: 0.25}


def attention_fns(cfg, q, k, v):
    """{form: a function running one layer's attention, returning (B, T, Hq, D)}."""
    import torch.nn.functional as F

    from headwise.patches.moh.attention import gathered_attention
    from headwise.patches.moh.config import head_split
    from headwise.patches.moh.routers import moh_gates

    split = head_split(cfg, H, HKV)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)

    def masking():
        gates, _, _ = moh_gates(cfg, q, n_kv_heads=HKV)
        return dense() * gates.to(q.dtype).unsqueeze(-1)

    def gathered():
        gates, _, chosen = moh_gates(cfg, q, n_kv_heads=HKV)
        chosen_heads = torch.cat([chosen.new_ones(*chosen.shape[:2], split.n_shared * split.group),
                                  chosen.repeat_interleave(split.group, dim=-1)], dim=-1)
        out = gathered_attention(q, k, v, chosen_heads, split.n_shared * split.group, None)
        return out * gates.to(q.dtype).unsqueeze(-1)

    return {"dense": dense, "masking": masking, "gathered": gathered}, split


def random_attention_inputs(t: int, hq: int, hkv: int, d: int, generator: torch.Generator):
    """bf16 q `(1, hq, t, d)`, k/v `(1, hkv, t, d)` leaves as transformers hands them ((B, T, H, D) buffers seen as
    (B, H, T, D)), and an output gradient `(1, t, hq, d)`, on the GPU."""

    def leaf(heads):
        x = torch.randn(1, t, heads, d, device="cuda", dtype=torch.bfloat16, generator=generator)
        return x.transpose(1, 2).detach().requires_grad_()

    q, k, v = leaf(hq), leaf(hkv), leaf(hkv)
    return q, k, v, torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16, generator=generator)


def time_ms(fn, do, leaves, passes: str) -> float:
    import triton

    def step():
        out = fn()
        if passes == "fwd+bwd":
            out.backward(do)
            for x in leaves:
                x.grad = None

    torch.cuda.synchronize()
    step()  # compile and warm
    torch.cuda.synchronize()
    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--passes", default="fwd+bwd", help="comma list of fwd, fwd+bwd")
    ap.add_argument("--activations", default="0.75,0.5")
    ap.add_argument("--routers", default="query_norm,kv_group")
    ap.add_argument("--out", default="benchmarks/results/kernels.jsonl")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this")
    args = ap.parse_args(argv)
    from headwise.patches.moh.config import MoHMethod

    start = time.time()
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    common = dict(H=H, Hkv=HKV, D=D, dtype="bf16", B=1, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, command=command,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    for t in (int(x) for x in args.contexts.split(",")):
        q, k, v, do = random_attention_inputs(t, H, HKV, D, torch.Generator(device="cuda").manual_seed(0))
        for passes in args.passes.split(","):
            dense_ms = None
            for activation in (float(x) for x in args.activations.split(",")):
                for router in args.routers.split(","):
                    if time.time() - start > args.budget_s:
                        print("budget reached", flush=True)
                        return 0
                    cfg = MoHMethod(router=router, activation=activation, shared=SHARED[activation])
                    fns, split = attention_fns(cfg, q, k, v)
                    if dense_ms is None:
                        dense_ms = time_ms(fns["dense"], do, (q, k, v), passes)
                    times = {form: time_ms(fns[form], do, (q, k, v), passes) for form in ("masking", "gathered")}
                    active = (split.n_shared + split.k) * split.group / H
                    emit_row({"layout": f"moh:{router}", "T": t, "pass": passes, "activation": activation,
                              "active_heads": round(active * H), "shared_heads": split.n_shared * split.group,
                              "ms_dense": round(dense_ms, 3), "ms_masking": round(times["masking"], 3),
                              "ms_gathered": round(times["gathered"], 3),
                              "ratio_gathered": round(times["gathered"] / dense_ms, 3),
                              "ratio_masking": round(times["masking"] / dense_ms, 3),
                              "target_ratio": round(active + 0.10, 3), **common}, args.out)
        del q, k, v, do
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
