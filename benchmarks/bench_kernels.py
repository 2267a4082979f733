"""Side-by-side timing of headwise's attention kernels (GPU only).

For every layout: ours (``sparse_attention``; for shifted groups also both exact forms), FlexAttention
on the same token-level mask (``torch.compile``'d ``flex_attention`` + ``create_block_mask``),
SDPA-cuDNN dense causal and SDPA-flash (FlashAttention-2) dense causal, all in one process. B=1,
32 query heads, 32 or 8 KV heads, head_dim 128, bf16. Times are medians of
``triton.testing.do_bench`` (CUDA events, warm-up first). One JSON line per result is appended to
``--out`` (default ``benchmarks/results/kernels.jsonl``) as soon as it is measured.

    python benchmarks/bench_kernels.py                       # everything (needs ~25 min)
    python benchmarks/bench_kernels.py --T 32768 --passes fwd+bwd --hkv 32 --layouts s2,sf
    python benchmarks/bench_kernels.py --budget-s 500        # stop cleanly before a time limit

For sliding-window and streaming layouts, when cudnn-frontend is installed and its band works
(``kernels/band_attention.py``), both forms are timed too: the Triton kernel (``ms_block_sparse``)
and the cuDNN diagonal band (``ms_band``). ``impl`` names the form ``ms_headwise`` ran.

Columns: ``density`` = allowed (q, k) pairs over causal pairs (dense causal = 1);
``tile_density`` = pairs in the tiles our kernel computes over causal pairs (what its work scales
with); ``eff_vs_cudnn`` = ms_cudnn * tile_density / ms_headwise (throughput on computed tiles
relative to cuDNN's on the dense causal problem).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import append_rows  # noqa: E402



def _layouts():
    from headwise.kernels import LayoutSpec

    return {
        "dense": LayoutSpec("dense"),
        "sliding_window": LayoutSpec("sliding_window", window=4096),
        "streaming": LayoutSpec("streaming", sink=128, recent=256),
        "sf": LayoutSpec("shifted_groups", group_ratio=0.25, sink=4),
        "longlora": LayoutSpec("shifted_groups", group_ratio=0.25, sink=0),
        "s2": LayoutSpec("s2", block=64, local_blocks=16, vert_stride=8),
        # the model's own rules composed with SF-Attn: Mistral-7B-v0.1's 4096-token window, Gemma-2's softcap 50
        "sf+window": LayoutSpec("shifted_groups", group_ratio=0.25, sink=4, window=4096),
        "sf+softcap": LayoutSpec("shifted_groups", group_ratio=0.25, sink=4, softcap=50.0),
    }


def mask_mod_for(spec, n_heads, device):
    """FlexAttention mask_mod with the same token rule as the layout semantics table (docs/kernels.md), the
    model's window (``spec.extra_window``) included."""
    rule = _kind_mask_mod(spec, n_heads, device)
    w = spec.extra_window
    if not w:
        return rule
    return lambda b, h, q, k: rule(b, h, q, k) & (q - k < w)


def score_mod_for(spec):
    """FlexAttention score_mod of the layout's softcap (None without one)."""
    if not spec.softcap:
        return None
    c = spec.softcap
    return lambda score, b, h, q, k: c * torch.tanh(score / c)


def _kind_mask_mod(spec, n_heads, device):
    kind = spec.kind
    hp = torch.tensor(spec.head_params(n_heads), device=device, dtype=torch.int64)
    if kind == "dense":
        return lambda b, h, q, k: q >= k
    if kind == "sliding_window":
        w = spec.window
        return lambda b, h, q, k: (q >= k) & (q - k < w)
    if kind == "streaming":
        s, r = spec.sink, spec.recent
        return lambda b, h, q, k: (q >= k) & ((k < s) | (q - k < r))
    if kind == "shifted_groups":
        s, g = spec.sink, spec.group_size
        if s:
            return lambda b, h, q, k: (q >= k) & ((k < s) | ((q + hp[h]) // g == (k + hp[h]) // g))
        return lambda b, h, q, k: (q >= k) & ((q + hp[h]) // g == (k + hp[h]) // g)
    if kind == "s2":
        bl, loc, v = spec.block, spec.local_blocks, spec.vert_stride
        return lambda b, h, q, k: (q >= k) & ((q // bl - k // bl < loc) | ((k // bl + hp[h] + 1) % v == 0))
    raise ValueError(kind)


def tile_density(spec, t, h, device):
    from headwise.kernels.block_sparse_attention import _layout_for, pick_config

    cfg = pick_config(128, spec, device)
    lay = _layout_for(spec, t, h, cfg.fwd_m, cfg.fwd_n, device)
    return lay.nnz * cfg.fwd_m * cfg.fwd_n / (h * t * (t + 1) / 2)


def bench(fn, args, quick):
    import triton

    try:
        torch.cuda.synchronize()
        fn()  # compile / warm
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once = (time.perf_counter() - t0) * 1e3
        rep = max(3 * once, 30.0) if quick else max(10 * once, 100.0)
        return triton.testing.do_bench(fn, warmup=max(once, 10.0), rep=min(rep, 2000.0), return_mode="median")
    except Exception as e:  # a failed backend is recorded, not fatal
        print(f"  ! {args}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


def make_fn(kind, q, k, v, do, spec, passes, extra=None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from headwise.kernels import band_layout_attention, shifted_group_attention, sparse_attention, sparse_attention_triton

    hq, hkv = q.shape[1], k.shape[1]
    if kind == "headwise":
        f = lambda: sparse_attention(q, k, v, spec)  # noqa: E731
    elif kind == "block_sparse":
        f = lambda: sparse_attention_triton(q, k, v, spec)[0]  # noqa: E731
    elif kind == "regrouped":
        f = lambda: shifted_group_attention(q, k, v, spec)  # noqa: E731
    elif kind == "regrouped_fe":
        f = lambda: shifted_group_attention(q, k, v, spec, backend="cudnn_fe")  # noqa: E731
    elif kind == "band":
        f = lambda: band_layout_attention(q, k, v, spec)  # noqa: E731
    elif kind == "flex":
        flex, bm = extra
        score_mod = score_mod_for(spec)
        f = lambda: flex(q, k, v, block_mask=bm, score_mod=score_mod, enable_gqa=hq != hkv)  # noqa: E731
    elif kind in ("cudnn", "fa2"):
        backend = SDPBackend.CUDNN_ATTENTION if kind == "cudnn" else SDPBackend.FLASH_ATTENTION
        kk, vv = (k, v) if hq == hkv else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
        if hq != hkv:
            kk, vv = kk.detach().requires_grad_(k.requires_grad), vv.detach().requires_grad_(v.requires_grad)

        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

        if passes == "fwd+bwd":
            def g():
                f().backward(do.transpose(1, 2))

            return g, [q, kk, vv]
        return f, []
    else:
        raise ValueError(kind)
    if passes == "fwd+bwd":
        def g():
            out = f()
            out.backward(do if out.shape == do.shape else do.transpose(1, 2))

        return g, [q, k, v]
    return f, []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="s2,sf,longlora,streaming,sliding_window,dense")
    ap.add_argument("--plan", default="32768:fwd+bwd:32,131072:fwd:32,32768:fwd+bwd:8,8192:fwd+bwd:32,"
                    "8192:fwd:32,8192:fwd+bwd:8,8192:fwd:8,131072:fwd:8",
                    help="comma list of T:pass:Hkv, run in this order")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this")
    ap.add_argument("--out", default="benchmarks/results/kernels.jsonl")
    ap.add_argument("--quick", action="store_true", help="shorter repetitions")
    ap.add_argument("--qkv-memory", choices=["bthd", "bhtd"], default="bthd",
                    help="memory layout of q/k/v: bthd = transposed (B, T, H, D) buffers, as transformers' "
                         "attention functions receive them (default); bhtd = contiguous (B, H, T, D)")
    args = ap.parse_args(argv)
    t_start = time.time()
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 512
    if hasattr(dynamo.config, "accumulated_cache_size_limit"):
        dynamo.config.accumulated_cache_size_limit = 4096
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    create_block_mask = torch.compile(create_block_mask)  # the _compile flag is deprecated

    flex = torch.compile(flex_attention, dynamic=False)
    layouts = _layouts()
    from headwise.kernels import attention_impl
    from headwise.kernels.band_attention import band_ready
    from headwise.kernels.cudnn_graphs import cudnn_frontend_available
    gpu = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    h, d = 32, 128
    dense_cache = {}
    rows = []
    for item in args.plan.split(","):
        t_s, passes, hkv_s = item.split(":")
        t, hkv = int(t_s), int(hkv_s)
        g = torch.Generator(device=device).manual_seed(0)
        need_grad = passes == "fwd+bwd"

        def leaf(heads):
            x = torch.randn(1, t, heads, d, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
            x = x.contiguous() if args.qkv_memory == "bhtd" else x.detach()  # detach: a leaf with the same strides
            return x.requires_grad_(need_grad)

        q, k, v = leaf(h), leaf(hkv), leaf(hkv)
        do = torch.randn(1, t, h, d, device=device, dtype=torch.bfloat16, generator=g)
        key = (t, passes, hkv)
        if key not in dense_cache:
            res = {}
            for kind in ("cudnn", "fa2"):
                fn, grads = make_fn(kind, q, k, v, do, None, passes)
                res[kind] = bench(lambda: (fn(), [setattr(x, "grad", None) for x in grads]), (kind, key), args.quick)
            dense_cache[key] = res
        for name in args.layouts.split(","):
            if time.time() - t_start > args.budget_s:
                print(f"budget reached: stopping before {name} {key}", flush=True)
                return rows
            spec = layouts[name].resolve(t)
            row = dict(layout=name, T=t, H=h, Hkv=hkv, D=d, dtype="bf16", B=1, qkv_memory=args.qkv_memory, **{"pass": passes})
            row["density"] = round(spec.density(t, h), 4)
            row["tile_density"] = round(tile_density(spec, t, h, device), 4)
            times = {}
            impl = attention_impl(spec, q, n_kv_heads=k.shape[1])
            # the dense exact forms cannot take the model's own rules (LayoutSpec.composed): only ours runs those
            forms = ["block_sparse", "regrouped"] if spec.kind == "shifted_groups" and not spec.composed else []
            if forms and cudnn_frontend_available():  # the regrouped form on cudnn-frontend graphs
                forms.append("regrouped_fe")
            if not spec.composed and band_ready(q.device, spec):  # cuDNN's diagonal band (kernels/band_attention.py), when installed
                forms += ["block_sparse", "band"]
            # the dispatched form is what "headwise" times: each other candidate form is timed once more
            kinds = ["headwise"] + [f for f in forms if f != impl]
            for kind in kinds:
                fn, grads = make_fn(kind, q, k, v, do, spec, passes)
                times[kind] = bench(lambda: (fn(), [setattr(x, "grad", None) for x in grads]), (kind, name, key),
                                    args.quick)
            if not args.no_flex:
                try:
                    bm = create_block_mask(mask_mod_for(spec, h, device), 1, h, t, t, device=device)
                    fn, grads = make_fn("flex", q, k, v, do, spec, passes, (flex, bm))
                    times["flex"] = bench(lambda: (fn(), [setattr(x, "grad", None) for x in grads]),
                                          ("flex", name, key), args.quick)
                except Exception as e:
                    print(f"  ! flex {name} {key}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    times["flex"] = None
            row.update(
                ms_headwise=times.get("headwise"), ms_flex=times.get("flex"),
                ms_cudnn=dense_cache[key]["cudnn"], ms_fa2=dense_cache[key]["fa2"],
            )
            if forms:
                times[impl] = times["headwise"]
            for kind in forms:
                row[f"ms_{kind}"] = times[kind]
            row["impl"] = impl
            if row["ms_headwise"] and row["ms_cudnn"]:
                row["eff_vs_cudnn"] = round(row["ms_cudnn"] * row["tile_density"] / row["ms_headwise"], 3)
            row.update(gpu=gpu, date=date, command=command, torch=torch.__version__,
                       triton=__import__("triton").__version__)
            for kk in list(row):
                if isinstance(row[kk], float) and kk.startswith("ms_"):
                    row[kk] = round(row[kk], 3)
            append_rows(args.out, [row])
            rows.append(row)
            _print_row(row)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def _ratio(a, b):
    return f"{a / b:5.2f}x" if a and b else "   - "


def _print_row(r):
    hw = r["ms_headwise"]
    extra = ""
    if "ms_block_sparse" in r:
        extra = f" impl={r['impl']} bs={r['ms_block_sparse']}"
    if "ms_regrouped" in r:
        extra += f" rg={r['ms_regrouped']}"
    if "ms_regrouped_fe" in r:
        extra += f" rg_fe={r['ms_regrouped_fe']}"
    if r.get("ms_band"):
        extra += f" band={r['ms_band']} flex/band={_ratio(r['ms_flex'], r['ms_band'])}"
    print(f"{r['layout']:>14} T={r['T']:>6} Hkv={r['Hkv']:>2} {r['pass']:>7} dens={r['density']:.3f} "
          f"ours={hw} flex={r['ms_flex']} cudnn={r['ms_cudnn']} fa2={r['ms_fa2']} | "
          f"flex/ours={_ratio(r['ms_flex'], hw)} cudnn/ours={_ratio(r['ms_cudnn'], hw)} "
          f"eff={r.get('eff_vs_cudnn')}{extra}", flush=True)


if __name__ == "__main__":
    main()
