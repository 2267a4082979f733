"""The block-sparse Triton kernel against the torch reference, with flash-attention's tolerance rule.

CPU: the kernels run in the Triton interpreter (tiny shapes, 32x32 tiles). GPU (``-m gpu``): the same
checks at realistic shapes (T up to 4K, the GPU tile configs). Forward error against an fp32
reference must be <= 2x the error of the torch reference run in the same low precision, backward
<= 4x; fp32 inputs (error ~0 on both sides) get a small absolute floor.
"""


import pytest
import torch

from headwise.kernels import LayoutSpec, reference_attention, sparse_attention

from kernel_tolerance import HAS_CUDA, check_tolerance

CPU_SPECS = {
    "dense": LayoutSpec("dense"),
    "window": LayoutSpec("sliding_window", window=37),
    "streaming": LayoutSpec("streaming", sink=5, recent=29),
    "sf": LayoutSpec("shifted_groups", group_size=48, sink=3),
    "longlora": LayoutSpec("shifted_groups", group_ratio=0.25, sink=0),
    "s2": LayoutSpec("s2", block=16, local_blocks=2, vert_stride=3),
}
GPU_SPECS = {
    "dense": LayoutSpec("dense"),
    "window": LayoutSpec("sliding_window", window=700),
    "streaming": LayoutSpec("streaming", sink=128, recent=256),
    "sf": LayoutSpec("shifted_groups", group_ratio=0.25, sink=4),
    "longlora": LayoutSpec("shifted_groups", group_size=1024, sink=0),
    "s2": LayoutSpec("s2", block=64, local_blocks=4, vert_stride=4),
}
HEAD_DIMS = [64, 80, 96, 128, 256]
GQA = [1, 2, 4, 8]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cases(gpu: bool):
    """Generated shapes: every head dim, GQA ratio and dtype appears for every layout; odd lengths;
    every other case packs three sequences of different lengths."""
    lengths = [1999, 4096, 3001, 1023, 2500] if gpu else [77, 131, 45, 160, 99]
    out = []
    for li, name in enumerate(CPU_SPECS):
        for i in range(4 if not gpu else 5):
            d = HEAD_DIMS[(i + li) % len(HEAD_DIMS)]
            ratio = GQA[(i + 2 * li) % len(GQA)]
            dtype = (DTYPES if not gpu else [torch.bfloat16, torch.float16])[(i + li) % (3 if not gpu else 2)]
            t = lengths[(i + li) % len(lengths)]
            packed = (i + li) % 2 == 1
            hkv = 1 if (gpu and d == 256) else 2 if not gpu else 4
            if not gpu and d == 256:
                t = min(t, 64)  # the interpreter's 256-wide tiles are slow
            out.append((name, t, d, ratio * hkv, hkv, dtype, packed))
    return out


def _inputs(b, hq, hkv, t, d, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def _packing(t, device):
    a, b = t // 3 + 1, (2 * t) // 3 - 2  # three sequences of different lengths
    return torch.tensor([0, a, b, t], dtype=torch.int32, device=device)


def _check_kernel_case(name, t, d, hq, hkv, dtype, packed, device, specs, seed=0):
    spec = specs[name]
    q, k, v = _inputs(1, hq, hkv, t, d, dtype, device, seed)
    cu = _packing(t, device) if packed else None
    do = torch.randn(1, t, hq, d, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)

    def grads(fn, inputs):
        inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, do.to(out.dtype)))

    got = grads(lambda a, b_, c: sparse_attention(a, b_, c, spec, cu_seqlens=cu), (q, k, v))
    ref32 = grads(lambda a, b_, c: reference_attention(a, b_, c, spec, cu_seqlens=cu), [x.float() for x in (q, k, v)])
    ref_lp = grads(lambda a, b_, c: reference_attention(a, b_, c, spec, cu_seqlens=cu), (q, k, v))
    for j, part in enumerate(["out", "dq", "dk", "dv"]):
        factor, floor = (2, 1e-5) if j == 0 else (4, 1e-4)
        check_tolerance(f"{name} T={t} D={d} {hq}/{hkv} {dtype} packed={packed} {part}",
                        got[j], ref32[j], ref_lp[j], factor, floor)


@pytest.mark.parametrize("name,t,d,hq,hkv,dtype,packed", _cases(False),
                         ids=lambda x: str(x).replace("torch.", ""))
def test_kernel_matches_reference_cpu(device, name, t, d, hq, hkv, dtype, packed):
    if device == "cuda":
        pytest.skip("the GPU variant below runs realistic shapes")
    _check_kernel_case(name, t, d, hq, hkv, dtype, packed, device, CPU_SPECS)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name,t,d,hq,hkv,dtype,packed", _cases(True), ids=lambda x: str(x).replace("torch.", ""))
def test_kernel_matches_reference_gpu(name, t, d, hq, hkv, dtype, packed):
    _check_kernel_case(name, t, d, hq, hkv, dtype, packed, "cuda", GPU_SPECS)


@pytest.mark.parametrize("name", list(CPU_SPECS))
def test_lengths_the_tiles_divide(device, name):
    """One sequence whose length every tile size divides runs the kernels without row masks
    (``_even``): forward and gradients match the reference under the tolerance rule, every layout."""
    from headwise.kernels.block_sparse_attention import _even, pick_config

    specs = GPU_SPECS if device == "cuda" else CPU_SPECS
    t, dtype = (2048, torch.bfloat16) if device == "cuda" else (128, torch.float32)
    cfg = pick_config(64, specs[name].resolve(t), device)
    assert _even(1, t, t, cfg.fwd_m, cfg.fwd_n, cfg) and _even(1, t, t, cfg.bwd_m, cfg.bwd_n, cfg)
    _check_kernel_case(name, t, 64, 4, 2, dtype, False, device, specs, seed=9)


@pytest.mark.parametrize("name", ["streaming", "s2", "sf"])
def test_lse_and_its_gradient(device, name):
    """return_lse gives the reference log-sum-exp, and a loss on it backpropagates correctly."""
    specs = GPU_SPECS if device == "cuda" else CPU_SPECS
    t = 1500 if device == "cuda" else 70
    q, k, v = _inputs(2, 4, 2, t, 64, torch.float32, device, 3)
    qs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = sparse_attention(*qs, specs[name], return_lse=True)
    assert lse.shape == (2, 4, t) and lse.dtype == torch.float32
    g = torch.autograd.grad((out.square().sum() + lse.sum()), qs)
    rs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    rout, rlse = reference_attention(*rs, specs[name], return_lse=True)
    rg = torch.autograd.grad((rout.square().sum() + rlse.sum()), rs)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, rout, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("name", list(CPU_SPECS))
def test_no_query_sees_a_later_token(device, name):
    """Gradient of the first t0 outputs wrt keys and values at positions >= t0 is exactly zero, for
    every layout (plain and packed), and the first outputs do not change when later keys change."""
    specs = GPU_SPECS if device == "cuda" else CPU_SPECS
    t, t0 = (2000, 1234) if device == "cuda" else (100, 57)
    q, k, v = _inputs(1, 4, 2, t, 32, torch.float32, device, 5)
    for cu in (None, torch.tensor([0, t0, t], dtype=torch.int32, device=device)):
        ks, vs = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = sparse_attention(q, ks, vs, specs[name], cu_seqlens=cu)
        dk, dv = torch.autograd.grad(out[:, :t0].sum(), (ks, vs))
        assert dk[:, :, t0:].abs().max() == 0 and dv[:, :, t0:].abs().max() == 0
        assert dk[:, :, :t0].abs().max() > 0
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t0:] += 3.0
        v2[:, :, t0:] -= 2.0
        out2 = sparse_attention(q, k2, v2, specs[name], cu_seqlens=cu)
        assert torch.equal(out[:, :t0], out2[:, :t0])


def test_batch_and_strided_inputs(device):
    """B > 1 and the (B, T, H, D)-transposed views transformers hands over (non-contiguous)."""
    t = 600 if device == "cuda" else 50
    spec = (GPU_SPECS if device == "cuda" else CPU_SPECS)["s2"]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, t, 4, 64, generator=g).to(device).transpose(1, 2)
    k = torch.randn(3, t, 2, 64, generator=g).to(device).transpose(1, 2)
    v = torch.randn(3, t, 2, 64, generator=g).to(device).transpose(1, 2)
    out = sparse_attention(q, k, v, spec)
    assert out.shape == (3, t, 4, 64) and out.is_contiguous()
    torch.testing.assert_close(out, reference_attention(q, k, v, spec), atol=1e-4, rtol=1e-4)


def test_backward_is_deterministic(device):
    """No atomics: two backward passes give bit-identical gradients (GQA 4 sums 4 heads per KV)."""
    t = 1000 if device == "cuda" else 64
    spec = (GPU_SPECS if device == "cuda" else CPU_SPECS)["sf"]
    q, k, v = _inputs(1, 8, 2, t, 64, torch.bfloat16, device, 11)
    res = []
    for _ in range(2):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = sparse_attention(*xs, spec, cu_seqlens=None, return_lse=True)[0]
        res.append(torch.autograd.grad(out.float().sum(), xs))
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["streaming", "s2", "sf", "dense"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_column_split_matches_reference(device, name, packed):
    """KernelConfig.col_split: long dK/dV columns shared by several programs plus a reduction give the
    reference gradients (GQA 4, fp32) and stay deterministic."""
    import dataclasses

    from headwise.kernels import sparse_attention_triton
    from headwise.kernels.block_sparse_attention import pick_config

    specs = GPU_SPECS if device == "cuda" else CPU_SPECS
    t = 1500 if device == "cuda" else 97
    spec = specs[name]
    q, k, v = _inputs(1, 8, 2, t, 64, torch.float32, device, 21)
    cu = _packing(t, device) if packed else None
    # packed sequences here are ~32 tokens (one or two tiles per column): split 1 still leaves items
    split = (8 if device == "cuda" else 3) if not packed else (4 if device == "cuda" else 1)
    cfg = dataclasses.replace(pick_config(64, spec.resolve(t), device), col_split=split)
    do = torch.randn(1, t, 8, 64, generator=torch.Generator().manual_seed(2)).to(device)
    grads = []
    for _ in range(2):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out, _ = sparse_attention_triton(*xs, spec, cu_seqlens=cu, config=cfg)
        grads.append(torch.autograd.grad(out, xs, do))
    rs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = torch.autograd.grad(reference_attention(*rs, spec, cu_seqlens=cu), rs, do)
    for a, b, r in zip(*grads, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dq_path", ["atomic", "tma"])
@pytest.mark.parametrize("name", ["streaming", "s2", "sf", "dense"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("split", [0, 1], ids=["one-program-per-column", "column-split"])
def test_dq_from_the_dkdv_pass_matches_reference(device, dq_path, name, packed, split):
    """KernelConfig.dq_path "atomic" / "tma": dQ added up by the dK/dV pass (no dQ kernel), alone and
    with the column split (whose extra programs then add to dQ too), gives the reference gradients
    under the tolerance rule (GQA 4, head dim 80: a padded head dim, T not a tile multiple, so TMA
    boxes spill past the sequence ends), and the same dK/dV as the dQ-kernel path. fp32 under the
    interpreter, where "tma" runs the element atomics (no TMA there); bf16 on the GPU, where fp32's
    IEEE dots would spend minutes compiling, and "tma" runs the TMA reduce-adds."""
    import dataclasses

    from headwise.kernels import sparse_attention_triton
    from headwise.kernels.block_sparse_attention import pick_config

    if device == "cpu" and dq_path == "tma" and name != "streaming":
        pytest.skip("under the interpreter 'tma' runs the element atomics, which the 'atomic' cases cover")
    specs = GPU_SPECS if device == "cuda" else CPU_SPECS
    t, dtype = (1500, torch.bfloat16) if device == "cuda" else (97, torch.float32)
    spec = specs[name]
    q, k, v = _inputs(1, 8, 2, t, 80, dtype, device, 23)
    cu = _packing(t, device) if packed else None
    base = pick_config(80, spec.resolve(t), device)
    col_split = (8 if device == "cuda" else 3) if not packed else (4 if device == "cuda" else 1)
    cfg = dataclasses.replace(base, dq_path=dq_path, col_split=col_split if split else 0)
    do = torch.randn(1, t, 8, 80, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)

    def grads(fn, inputs):
        xs = [x.clone().requires_grad_(True) for x in inputs]
        return torch.autograd.grad(fn(*xs), xs, do.to(xs[0].dtype))

    got = grads(lambda *xs: sparse_attention_triton(*xs, spec, cu_seqlens=cu, config=cfg)[0], (q, k, v))
    kernel_path = dataclasses.replace(cfg, dq_path="kernel")
    other = grads(lambda *xs: sparse_attention_triton(*xs, spec, cu_seqlens=cu, config=kernel_path)[0], (q, k, v))
    ref32 = grads(lambda *xs: reference_attention(*xs, spec, cu_seqlens=cu), [x.float() for x in (q, k, v)])
    ref_lp = grads(lambda *xs: reference_attention(*xs, spec, cu_seqlens=cu), (q, k, v))
    for part, a, r32, rlp in zip(("dq", "dk", "dv"), got, ref32, ref_lp):
        check_tolerance(f"{name} {dq_path} packed={packed} split={split} {part}", a, r32, rlp, 4, 1e-4)
    for a, b in zip(got[1:], other[1:]):  # same programs, same order: identical dK/dV
        assert torch.equal(a, b)


def test_gradients_keep_the_inputs_memory_layout(device):
    """q/k/v as transformers passes them ((B, H, T, D) views of (B, T, H, D) buffers) get gradients with
    the same strides, for both dQ paths: a contiguous (B, H, T, D) gradient would cost a copy per input."""
    import dataclasses

    from headwise.kernels import sparse_attention_triton
    from headwise.kernels.block_sparse_attention import pick_config

    t = 300 if device == "cuda" else 40
    spec = (GPU_SPECS if device == "cuda" else CPU_SPECS)["streaming"].resolve(t)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, t, h, 64, generator=g).to(device).transpose(1, 2).requires_grad_(True)
               for h in (4, 2, 2))
    for path in ("kernel", "tma"):
        cfg = dataclasses.replace(pick_config(64, spec, device), dq_path=path)
        out, _ = sparse_attention_triton(q, k, v, spec, config=cfg)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert (dq.stride(), dk.stride(), dv.stride()) == (q.stride(), k.stride(), v.stride()), path


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", ["streaming", "s2", "dense", "window", "sf"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_no_host_sync_per_call(name, packed):
    """After a first (layout-building, compiling) call, forward + backward issue no synchronising CUDA
    call, for one sequence and for packed sequences whose boundaries tensor was read before (as every
    layer after the first reads it): torch's sync debug mode turns any into an error. A per-call sync
    stalls the host once per layer and leaves the GPU idle while the next kernels are launched. The
    window and SF cases take their dispatched forms (cuDNN's band, the regrouped cuDNN form) when
    unpacked."""
    t = 2048
    spec = GPU_SPECS[name]
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 8, 2, t, 128, torch.bfloat16, "cuda", 7))
    cu = _packing(t, "cuda") if packed else None

    def step():
        out = sparse_attention(q, k, v, spec, cu_seqlens=cu)
        out.backward(torch.ones_like(out))

    step()
    first = q.grad.clone()
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the mode does catch a sync here
            torch.ones(1, device="cuda").item()
        step()  # raises RuntimeError on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(q.grad, first)  # the step really ran (dense's TMA dQ: equal up to rounding)
    assert k.grad is not None and v.grad is not None


def test_packed_boundaries_are_read_again_after_an_in_place_change(device):
    """The boundaries of packed sequences are read to the host once per tensor, not once per call; a
    tensor changed in place is read (and checked) again."""
    t = 40
    spec = CPU_SPECS["streaming"]
    q, k, v = _inputs(1, 2, 2, t, 16, torch.float32, device, 8)
    cu = _packing(t, device)
    first = sparse_attention(q, k, v, spec, cu_seqlens=cu)
    torch.testing.assert_close(sparse_attention(q, k, v, spec, cu_seqlens=cu), first)
    cu[1] = cu[2] + 1  # boundaries out of order
    with pytest.raises(ValueError, match="bad cu_seqlens"):
        sparse_attention(q, k, v, spec, cu_seqlens=cu)


def test_max_seqlen_longer_than_the_sequence(device):
    """One packed sequence with a ``max_seqlen`` hint above its length (the grid and layout are then
    sized for the hint, a multiple of the tiles): the tiles past the sequence stay masked, and the
    result is the reference's. A hint below the longest sequence is an error."""
    t = 77
    spec = CPU_SPECS["streaming"]
    q, k, v = _inputs(1, 2, 2, t, 16, torch.float32, device, 10)
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    out = sparse_attention(q, k, v, spec, cu_seqlens=cu, max_seqlen=128)
    torch.testing.assert_close(out, reference_attention(q, k, v, spec), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_seqlen=40 is shorter than the longest packed sequence"):
        sparse_attention(q, k, v, spec, cu_seqlens=torch.tensor([0, 30, t], dtype=torch.int32, device=device),
                         max_seqlen=40)


def test_deterministic_algorithms_get_the_dq_kernel(device):
    """With torch.use_deterministic_algorithms(True), a config asking for atomic dQ runs the dQ kernel:
    two backward passes give bit-identical dQ, equal to the "kernel" path's."""
    import dataclasses

    from headwise.kernels import sparse_attention_triton
    from headwise.kernels.block_sparse_attention import pick_config

    t = 1000 if device == "cuda" else 64
    spec = (GPU_SPECS if device == "cuda" else CPU_SPECS)["s2"].resolve(t)
    q, k, v = _inputs(1, 8, 2, t, 64, torch.bfloat16, device, 12)
    base = pick_config(64, spec, device)
    was = torch.are_deterministic_algorithms_enabled()
    res = []
    try:
        for path, det in (("atomic", True), ("atomic", True), ("kernel", False)):
            torch.use_deterministic_algorithms(det, warn_only=True)
            xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
            out, _ = sparse_attention_triton(*xs, spec, config=dataclasses.replace(base, dq_path=path))
            res.append(torch.autograd.grad(out.float().sum(), xs)[0])
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(res[0], res[1]) and torch.equal(res[0], res[2])


def test_unknown_dq_path_is_an_error():
    from headwise.kernels.block_sparse_attention import KernelConfig

    with pytest.raises(ValueError, match="dq_path='atomics'.*'atomic', 'kernel', 'tma'"):
        KernelConfig(dq_path="atomics")


def test_column_split_plan_covers_every_entry_once():
    """The plan's main programs (each head's first `split` entries) and items partition every column of
    every split tile; unsplit tiles keep slot -1."""
    from headwise.kernels import build_layout
    from headwise.kernels.block_sparse_attention import _column_split_plan

    lay = build_layout(CPU_SPECS["s2"], 160, 8, 32, 32, "cpu")
    split, hkv = 2, 2
    plan = _column_split_plan(lay, hkv, split, "cpu")
    assert plan is not None and _column_split_plan(lay, hkv, split, "cpu") is plan  # cached on the layout
    nk, gqa = lay.n_kblocks, 8 // hkv
    ptr, items = lay.col_ptr.tolist(), plan.items.tolist()
    n_split = 0
    for kvh in range(hkv):
        for n in range(nk):
            heads = range(kvh * gqa, (kvh + 1) * gqa)
            total = sum(ptr[h * nk + n + 1] - ptr[h * nk + n] for h in heads)
            slot = int(plan.tile_slot[kvh * nk + n])
            if total <= split:
                assert slot == -1
                continue
            n_split += 1
            covered = []
            for h in heads:
                c0, c1 = ptr[h * nk + n], ptr[h * nk + n + 1]
                covered += list(range(c0, min(c1, c0 + split)))  # the main program's share
                covered += [e for it in items if it[0] == h and it[1] == n for e in range(it[2], it[3])]
                assert sorted(e for e in covered if c0 <= e < c1) == list(range(c0, c1))
            assert len(covered) == len(set(covered)) == total
    assert n_split == plan.red_tile.numel() > 0
    assert plan.red_ptr[-1] == plan.red_slot.numel() == plan.n_slots


def test_s2_tile_clamp_keeps_the_rest_of_the_tuned_config(monkeypatch):
    """pick_config narrows S2 key tiles to the S2 block, and keeps every other field (col_split included)
    of the GPU config it starts from. Config choice only: no kernel runs, so no GPU is needed."""
    import dataclasses

    from headwise.kernels.block_sparse_attention import TUNED_D128, pick_config

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tuned = dataclasses.replace(TUNED_D128["s2"], fwd_n=128, bwd_n=128, col_split=24)
    monkeypatch.setitem(TUNED_D128, "s2", tuned)
    cfg = pick_config(128, LayoutSpec("s2", block=64, local_blocks=4, vert_stride=4), "cuda")
    assert (cfg.fwd_n, cfg.bwd_n) == (64, 64)
    assert dataclasses.replace(cfg, fwd_n=128, bwd_n=128) == tuned
    assert pick_config(128, LayoutSpec("streaming", sink=128, recent=256), "cuda") == TUNED_D128["streaming"]
