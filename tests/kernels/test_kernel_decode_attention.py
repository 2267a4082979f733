"""The fused decode-attention kernel against the torch path of grouped_attention and an fp32 einsum.

CPU: the kernels run in the Triton interpreter (small shapes, 16-key tiles, a pretend SM count of 4);
on a GPU the same tests run on CUDA, plus realistic shapes and a CUDA-graph replay (``-m gpu``).
Tolerances follow the other kernel tests (flash-attention's rule, ``kernel_tolerance.py``): the error
against an fp32 reference must be <= 2x the error of the torch path run in the same low precision.
"""

import pytest
import torch

from headwise.kernels.decode_attention import MAX_SPLITS, decode_attention, num_splits
from headwise.inference import attention as kv_attention

from kernel_tolerance import HAS_CUDA, max_err, tolerance_violation


def _inputs(b, h, g, length, d, dtype, device, seed, p_valid=0.7, buffer=None):
    """q (B, H, G, D); k, v slices [:length] of (B, H, buffer, D) slot buffers; a random valid mask."""
    gen = torch.Generator().manual_seed(seed)
    buffer = buffer or length
    q = 2 * torch.randn(b, h, g, d, generator=gen)  # peakier softmax than N(0, 1) logits
    k = torch.randn(b, h, buffer, d, generator=gen)[:, :, :length]
    v = torch.randn(b, h, buffer, d, generator=gen)[:, :, :length]
    valid = torch.rand(b, h, length, generator=gen) < p_valid
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(v), valid.to(device)


def _reference(q, k, v, valid, scaling):
    """Independent fp32 einsum: softmax over valid keys; rows without a valid key give 0."""
    qf, kf, vf = q.float(), k.float(), v.float()
    logits = torch.einsum("bhgd,bhld->bhgl", qf, kf) * scaling
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return torch.einsum("bhgl,bhld->bhgd", p, vf), p.sum(2)


def _torch_path(q, k, v, valid, scaling, need_colsums, monkeypatch):
    """grouped_attention's torch chain (the kernel's specification) for T == 1."""
    monkeypatch.setattr(kv_attention, "FUSED_DECODE", False)
    out, cols = kv_attention.grouped_attention(q.unsqueeze(3), k, v, scaling=scaling, key_valid=valid,
                                               causal_tail=False, need_colsums=need_colsums)
    monkeypatch.setattr(kv_attention, "FUSED_DECODE", True)
    return out.squeeze(3), cols


def _compare(name, q, k, v, valid, monkeypatch, need_colsums=True, **kw):
    """Run the kernel and compare it with both references and the column-sum invariants.

    Returns (out, colsums, problems): `problems` lists every violated rule (empty when all hold), so
    each test asserts on it.
    """
    scaling = q.shape[-1] ** -0.5
    out, cols = decode_attention(q, k, v, valid, scaling, need_colsums, **kw)
    ref32, cols32 = _reference(q, k, v, valid, scaling)
    ref_lp, cols_lp = _torch_path(q, k, v, valid, scaling, need_colsums, monkeypatch)
    problems = []
    if out.shape != q.shape or out.dtype != q.dtype:
        problems.append(f"{name}: out {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}")
    problems.append(tolerance_violation(f"{name} out", out, ref32, ref_lp, 2, 1e-5))
    if not need_colsums:
        if cols is not None:
            problems.append(f"{name}: column sums returned without need_colsums")
        return out, None, [x for x in problems if x]
    expected_shape = valid.shape if valid is not None else k.shape[:3]
    if cols.shape != expected_shape or cols.dtype != torch.float32:
        problems.append(f"{name}: colsums {tuple(cols.shape)} {cols.dtype}, expected {tuple(expected_shape)} float32")
        return out, cols, [x for x in problems if x]
    problems.append(tolerance_violation(f"{name} colsums", cols, cols32, cols_lp, 2, 1e-5))
    G = q.shape[2]
    if valid is None:
        valid = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)
    if not torch.all(cols[~valid] == 0):
        problems.append(f"{name}: column sums at invalid slots")
    has_key = valid.any(-1)
    sums = cols.sum(-1)
    if has_key.any() and (sums[has_key] - G).abs().max() > 1e-4 * G:
        problems.append(f"{name}: column sums of rows with a valid key do not add up to G={G}")
    if not torch.all(sums[~has_key] == 0):
        problems.append(f"{name}: column sums of rows without a valid key are not 0")
    return out, cols, [x for x in problems if x]


# (L, n_splits) pairs: L not a multiple of the 16-key interpreter tile, shorter than one tile, one tile
# exactly, and splits 1, several, more than tiles (clipped), auto.
SPLIT_CASES = [(45, 1), (45, 2), (37, None), (5, 3), (16, 1), (83, 4), (70, 99)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("g", [1, 2, 4, 7])
def test_matches_torch_path(device, monkeypatch, g, d, dtype):
    """Every G x D x dtype; each runs a few (L, n_splits) cases, with and without column sums."""
    i = [1, 2, 4, 7].index(g) + [64, 80, 128].index(d) + DTYPES.index(dtype)
    for j in range(2):
        length, splits = SPLIT_CASES[(i + 3 * j) % len(SPLIT_CASES)]
        q, k, v, valid = _inputs(2, 2, g, length, d, dtype, device, seed=100 * i + j)
        *_, problems = _compare(f"G={g} D={d} {dtype} L={length} splits={splits}", q, k, v, valid, monkeypatch,
                                need_colsums=(i + j) % 2 == 0, n_splits=splits)
        assert not problems, problems


@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_single_key_and_no_mask(device, monkeypatch, splits, dtype):
    """Rows without a valid key give 0 and zero column sums; a single valid key (in any split) gets all
    the weight; key_valid None means every slot."""
    q, k, v, valid = _inputs(2, 3, 4, 77, 64, dtype, device, seed=splits)
    valid[0, 1] = False  # a whole (row, head) without keys
    valid[1, 0] = False
    valid[1, 0, 70] = True  # one key, in the last split
    valid[1, 2] = False
    valid[1, 2, 3] = True  # one key, in the first split
    out, cols, problems = _compare(f"edge splits={splits}", q, k, v, valid, monkeypatch, n_splits=splits)
    assert not problems, problems
    assert torch.all(out[0, 1] == 0)
    torch.testing.assert_close(out[1, 0].float(), v[1, 0, 70].float().expand(4, -1), atol=1e-6, rtol=0)
    assert cols[1, 0, 70].item() == pytest.approx(4.0) and cols[1, 2, 3].item() == pytest.approx(4.0)
    for name, mask in (("no mask", None), ("all invalid", torch.zeros_like(valid))):
        *_, problems = _compare(f"{name} splits={splits}", q, k, v, mask, monkeypatch, n_splits=splits)
        assert not problems, problems


def test_strided_views(device, monkeypatch):
    """k/v slices of longer slot buffers, in (B, L, H, D) memory order; q a view with a G stride of
    its own (as `query.view(B, H, G, T, D)[..., 0, :]`); key_valid a slice of a longer mask."""
    gen = torch.Generator().manual_seed(5)
    B, H, G, L, D = 2, 3, 2, 50, 80
    q = torch.randn(B, 1, H * G, D, generator=gen).to(device).transpose(1, 2).reshape(B, H, G, 1, D)[:, :, :, 0]
    kbuf = torch.randn(B, L + 13, H, D, generator=gen).to(device)
    vbuf = torch.randn(B, L + 13, H, D, generator=gen).to(device)
    k, v = kbuf.transpose(1, 2)[:, :, 3 : 3 + L], vbuf.transpose(1, 2)[:, :, 3 : 3 + L]
    valid = (torch.rand(B, H, L + 7, generator=gen) < 0.6).to(device)[:, :, 7:]
    assert not k.is_contiguous() and not valid.is_contiguous()
    for splits in (1, 3):
        *_, problems = _compare(f"strided splits={splits}", q, k, v, valid, monkeypatch, n_splits=splits)
        assert not problems, problems
    out_c, _ = decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), valid.contiguous(), D ** -0.5, n_splits=3)
    out_s, _ = decode_attention(q, k, v, valid, D ** -0.5, n_splits=3)
    assert torch.equal(out_s, out_c)


def test_invalid_slots_are_not_read(device):
    """NaN/inf in invalid slots of K and V (stale or never-written slot buffers) never reach the result."""
    q, k, v, valid = _inputs(1, 2, 4, 40, 64, torch.float32, device, seed=9)
    k2, v2 = k.clone(), v.clone()
    k2[~valid] = float("nan")
    v2[~valid] = float("inf")
    for splits in (1, 3):
        out, cols = decode_attention(q, k, v, valid, 0.125, True, n_splits=splits)
        out2, cols2 = decode_attention(q, k2, v2, valid, 0.125, True, n_splits=splits)
        assert torch.equal(out, out2) and torch.equal(cols, cols2)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inactive_heads_are_skipped(device, monkeypatch, splits, dtype):
    """head_active (MoH decode): the active KV heads match the references as if every head ran, the inactive ones
    give exactly 0, and their K and V are never read (NaN and inf there leave every output unchanged)."""
    q, k, v, valid = _inputs(2, 4, 3, 45, 64, dtype, device, seed=40 + splits)
    active = torch.tensor([[True, False, True, False], [False, False, False, True]], device=device)
    out, _ = decode_attention(q, k, v, valid, 0.125, head_active=active, n_splits=splits)
    ref32, _ = _reference(q, k, v, valid, 0.125)
    ref_lp, _ = _torch_path(q, k, v, valid, 0.125, False, monkeypatch)
    assert not tolerance_violation("active heads", out[active], ref32[active], ref_lp[active], 2, 1e-5)
    assert torch.all(out[~active] == 0)
    k2, v2 = k.clone(), v.clone()
    k2[~active] = float("nan")
    v2[~active] = float("inf")
    out2, _ = decode_attention(q, k2, v2, valid, 0.125, head_active=active, n_splits=splits)
    assert torch.equal(out2, out)
    with pytest.raises(ValueError, match="head_active"):
        decode_attention(q, k, v, valid, 0.125, True, head_active=active)
    with pytest.raises(ValueError, match="head_active"):
        decode_attention(q, k, v, valid, 0.125, head_active=active[:, :2])


@pytest.mark.parametrize("dtype,d", [(torch.float16, 96), (torch.bfloat16, 256), (torch.float32, 256)], ids=str)
def test_other_head_dims_and_fp16(device, monkeypatch, dtype, d):
    q, k, v, valid = _inputs(1, 2, 3, 40, d, dtype, device, seed=d)
    for splits in (1, 2):
        *_, problems = _compare(f"{dtype} D={d} splits={splits}", q, k, v, valid, monkeypatch, n_splits=splits)
        assert not problems, problems


def test_split_count_fills_the_gpu(monkeypatch):
    """Host arithmetic only: B*H*splits ~ 4 programs per SM, at least 4 tiles per split, clipped."""
    import importlib

    da = importlib.import_module("headwise.kernels.decode_attention")
    monkeypatch.setattr(da, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    s = num_splits(8, 32768, 64, cuda)  # Llama-3-8B shape, batch 1, 32K slots
    assert 2 * 132 <= 8 * s <= 4 * 132 + 8
    assert num_splits(8, 100, 64, cuda) == 1  # two tiles: one split
    assert num_splits(8, 1024, 64, cuda) == 4  # 16 tiles, 4 per split
    assert num_splits(1024, 32768, 64, cuda) == 1  # the batch fills the GPU already
    assert num_splits(1, 1 << 22, 64, cuda) == MAX_SPLITS


def test_empty_cache_and_shapes(device):
    q = torch.randn(1, 2, 4, 64, device=device)
    k = v = torch.randn(1, 2, 0, 64, device=device)
    out, cols = decode_attention(q, k, v, None, 0.125, True)
    assert torch.all(out == 0) and cols.shape == (1, 2, 0)
    with pytest.raises(ValueError):
        decode_attention(q, torch.randn(1, 3, 5, 64, device=device), torch.randn(1, 3, 5, 64, device=device), None, 0.1)


# ----------------------------------------------------------------------------- grouped_attention dispatch


def test_grouped_attention_dispatch(device, monkeypatch):
    """T == 1 without a prompt mask takes the kernel (same result as the torch path, causal_tail or
    not, key_valid or None, column sums or not); prefill (T > 1) and prompt masks do not."""
    import importlib

    monkeypatch.setattr(kv_attention, "FUSED_DECODE", True)
    da = importlib.import_module("headwise.kernels.decode_attention")
    calls = []
    real = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    B, H, G, L, D = 2, 2, 3, 41, 64
    q = torch.randn(B, H, G, 1, D, generator=gen).to(device)
    k, v = (torch.randn(B, H, L, D, generator=gen).to(device) for _ in range(2))
    valid = (torch.rand(B, H, L, generator=gen) < 0.8).to(device)
    for key_valid in (valid, None):
        for causal_tail in (False, True):
            for need in (True, False):
                args = dict(scaling=D ** -0.5, key_valid=key_valid, causal_tail=causal_tail, need_colsums=need)
                n = len(calls)
                out, cols = kv_attention.grouped_attention(q, k, v, **args)
                assert len(calls) == n + 1
                monkeypatch.setattr(kv_attention, "FUSED_DECODE", False)
                ref, ref_cols = kv_attention.grouped_attention(q, k, v, **args)
                monkeypatch.setattr(kv_attention, "FUSED_DECODE", True)
                assert len(calls) == n + 1 and out.shape == ref.shape == (B, H, G, 1, D)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
                if need:
                    torch.testing.assert_close(cols, ref_cols, atol=1e-5, rtol=1e-5)
                else:
                    assert cols is None and ref_cols is None
    n = len(calls)
    q2 = torch.randn(B, H, G, 3, D, generator=gen).to(device)
    kv_attention.grouped_attention(q2, k, v, scaling=0.1, key_valid=valid, causal_tail=True, need_colsums=True)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
    kv_attention.grouped_attention(q, k, v, scaling=0.1, key_valid=None, causal_tail=True, prompt_mask=mask)
    assert len(calls) == n


def test_cpu_without_interpreter_keeps_the_torch_path(monkeypatch):
    if HAS_CUDA:
        pytest.skip("CPU dispatch")
    monkeypatch.setattr(kv_attention, "FUSED_DECODE", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kv_attention._fused_decode(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kv_attention._fused_decode(torch.zeros(1))
    monkeypatch.setattr(kv_attention, "FUSED_DECODE", False)
    assert not kv_attention._fused_decode(torch.zeros(1))


def test_compiled_static_decode_uses_the_kernel(device, monkeypatch):
    """The kernel as the `headwise::decode_attention` operator inside an inductor-compiled decode step
    (StaticDecoder mode="compile"; on the GPU also captured in a CUDA graph) generates the torch path's
    tokens and keeps its sets; the H2O heads' evictions follow the kernel's column sums."""
    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    from headwise.inference.static_decode import StaticDecoder

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, initializer_range=0.2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval().to(device)
    policy = {"type": "duo", "retrieval_heads": [[1, 0], [1, 1]], "sink": 2, "recent": 6,
              "retrieval_policy": {"type": "h2o", "heavy": 5, "recent": 4}}
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(5)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    monkeypatch.setattr(kv_attention, "FUSED_DECODE", False)
    reference = StaticDecoder(model, policy, max_new_tokens=6, mode="eager")
    expected = reference.generate(ids, mask)
    monkeypatch.setattr(kv_attention, "FUSED_DECODE", True)
    calls = []
    monkeypatch.setattr(kv_attention, "_fused_decode", lambda q: calls.append(1) or True)
    compiled = StaticDecoder(model, policy, max_new_tokens=6, mode="compile")
    torch._dynamo.reset()
    try:
        tokens = compiled.generate(ids, mask)
    finally:
        torch._dynamo.reset()
    assert calls, "the compiled step never reached the fused-kernel branch"
    assert torch.equal(tokens, expected)
    for layer in range(2):
        for group in range(len(reference.cache.layers[layer].groups)):
            assert compiled.cache.kept_positions(layer, group) == reference.cache.kept_positions(layer, group)


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("length", [4099, 32768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_torch_path_gpu(monkeypatch, length, dtype):
    """Llama-3-8B decode shape (8 KV heads x 4 query heads, D = 128), GPU launch shapes, auto splits."""
    q, k, v, valid = _inputs(1, 8, 4, length, 128, dtype, "cuda", seed=length, p_valid=0.9, buffer=length + 100)
    valid[0, 3] = False
    for splits in (None, 1):
        *_, problems = _compare(f"gpu L={length} {dtype} splits={splits}", q, k, v, valid, monkeypatch, n_splits=splits)
        assert not problems, problems


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_replay_gpu():
    """Capturable: a captured call replays the eager result, and reads new inputs written in place."""
    q, k, v, valid = _inputs(2, 8, 4, 5000, 128, torch.bfloat16, "cuda", seed=1)
    eager = decode_attention(q, k, v, valid, 0.088, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, k, v, valid, 0.088, True)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, cols = decode_attention(q, k, v, valid, 0.088, True)
    graph.replay()
    assert torch.equal(out, eager[0]) and torch.equal(cols, eager[1])
    q.mul_(-1.0)
    valid[:, :, :100] = False
    graph.replay()
    again = decode_attention(q, k, v, valid, 0.088, True)
    assert max_err(out, again[0]) == 0 and torch.equal(cols, again[1])
