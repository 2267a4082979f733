"""Peak memory of one attention forward + backward, per training attention function, at one layer's shape.

`bench_train.py` measures whole training steps, where SF-Attn peaked 0.12-0.15 GiB above dense SDPA at
32K (issue 3's "equal or lower memory" target). A whole step cannot say which tensors make the gap;
this isolates the attention call: the inputs are shaped and strided as transformers hands them to the
attention function (q/k after RoPE: contiguous `(B, H, T, D)`; v: the transposed `(B, T, Hkv, D)`
projection), and each function runs forward + backward with the same output gradient. It prints the
peak allocated above the inputs, the time, and the shifted-group path's backend probes.

    python benchmarks/attention_memory.py --T 32768          # Llama-3-8B layer: 32 heads, 8 KV heads, D 128
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch


def _functions(hq: int, hkv: int):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from headwise.patches.sinklora import SinkLoRAMethod, sinklora_attention

    dense = SimpleNamespace(num_key_value_groups=hq // hkv, is_causal=True, training=True)
    sf = SimpleNamespace(num_key_value_groups=hq // hkv, is_causal=True, training=True,
                         headwise_sinklora=SinkLoRAMethod())
    return {
        "sdpa (dense, transformers)": lambda q, k, v: sdpa_attention_forward(dense, q, k, v, None, scaling=None)[0],
        "sinklora (SF-Attn)": lambda q, k, v: sinklora_attention(sf, q, k, v, None, scaling=None)[0],
    }


def measure(fn, q, k, v, grad) -> dict:
    """Peak bytes allocated above the live inputs during `fn` forward + backward, and its time (ms)."""
    for x in (q, k, v):
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn(q, k, v)
    after_fwd = torch.cuda.memory_allocated()
    out.backward(grad)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"peak_extra_gib": round((peak - before) / 2**30, 4),
            "held_after_fwd_gib": round((after_fwd - before) / 2**30, 4), "ms": round(ms, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_memory.py measures CUDA memory: run it on a GPU")
    torch.manual_seed(0)
    t, hq, hkv, d, dev, dt = args.T, args.heads, args.kv_heads, args.head_dim, "cuda", torch.bfloat16
    q = torch.randn(1, hq, t, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, hkv, t, d, device=dev, dtype=dt, requires_grad=True)
    v_proj = torch.randn(1, t, hkv, d, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(1, t, hq, d, device=dev, dtype=dt)
    from headwise.kernels import shifted_groups as sg

    probes = {name: fn(sg.default_backend(dev)) for name, fn in
              (("backend", str), ("native_gqa", sg.native_gqa), ("bottom_right_causal", sg.bottom_right_causal),
               ("reads_head_major_views", sg.reads_head_major_views),
               ("reads_overlapping_views", sg.reads_overlapping_views))}
    print(json.dumps({"shape": f"T={t} Hq={hq} Hkv={hkv} D={d} bf16", "max_piece_heads": sg.MAX_PIECE_HEADS, **probes}))
    for name, fn in _functions(hq, hkv).items():
        rows = [measure(fn, q, k, v_proj.transpose(1, 2), grad) for _ in range(args.repeats)]
        print(json.dumps({"function": name, **rows[-1], "first_ms": rows[0]["ms"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
