"""Quick GPU diagnostic: max errors of the Triton kernel and the torch reference against an fp32
reference for a few layouts and shapes (prints one line each). Used before the test suite in a
device call, so a failing round still says where the error is."""

import torch

from headwise.kernels import LayoutSpec, reference_attention, sparse_attention, sparse_attention_triton

CASES = [("dense", LayoutSpec("dense"), 1999, 64, 4, 4), ("dense", LayoutSpec("dense"), 256, 128, 2, 2),
         ("s2", LayoutSpec("s2", block=64, local_blocks=4, vert_stride=4), 2048, 128, 8, 2),
         ("sf", LayoutSpec("shifted_groups", group_ratio=0.25, sink=4), 2048, 128, 8, 2)]
for name, spec, t, d, hq, hkv in CASES:
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=dtype, generator=g) for h in (hq, hkv, hkv))
        do = torch.randn(1, t, hq, d, device="cuda", dtype=dtype, generator=g)
        res = {}
        for tag, fn, cast in [("triton", lambda a, b, c: sparse_attention_triton(a, b, c, spec)[0], False),
                              ("dispatch", lambda a, b, c: sparse_attention(a, b, c, spec), False),
                              ("ref_lp", lambda a, b, c: reference_attention(a, b, c, spec), False),
                              ("ref32", lambda a, b, c: reference_attention(a, b, c, spec), True)]:
            xs = [(x.float() if cast else x).clone().requires_grad_(True) for x in (q, k, v)]
            try:
                out = fn(*xs)
                res[tag] = [out] + list(torch.autograd.grad(out, xs, do.to(out.dtype)))
            except Exception as e:
                print(f"{name} {dtype} {tag}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        if "ref32" not in res:
            continue
        line = []
        for tag in ("triton", "dispatch", "ref_lp"):
            if tag in res:
                errs = [(a.float() - b).abs().max().item() for a, b in zip(res[tag], res["ref32"])]
                line.append(f"{tag}=" + ",".join(f"{e:.1e}" for e in errs))
        print(f"{name:6} T={t} D={d} {hq}/{hkv} {str(dtype)[6:]:8} " + " ".join(line), flush=True)
