"""Sliding-window and streaming attention as a band (+ sink part) decomposition (kernels/band_attention.py).

On CPU the torch backend runs the same decomposition, merge and merged-softmax backward as the
cuDNN one, in fp64: exact agreement with the reference checks the split of the streaming keys into
a band and a top-left causal sink part, and the backward that hands each part the merged output and
log-sum-exp. On a GPU with cudnn-frontend the cuDNN backend is checked with the kernels' tolerance rule."""

import pytest
import torch

from headwise.kernels import LayoutSpec, reference_attention
from headwise.kernels.band_attention import band_layout_attention, band_left_offset

from kernel_tolerance import HAS_CUDA, check_tolerance

BAND_WORKS = HAS_CUDA and band_left_offset(0) is not None  # cudnn-frontend installed and its band runs here
NEEDS_BAND = "needs CUDA and cudnn-frontend with the band SDPA (pip install 'headwise[cudnn]')"

CASES = [  # (spec, T, Hq, Hkv, D)
    (LayoutSpec("sliding_window", window=16), 61, 4, 2, 32),
    (LayoutSpec("sliding_window", window=64), 40, 2, 2, 16),  # T inside one window: plain causal
    (LayoutSpec("streaming", sink=4, recent=16), 61, 4, 1, 32),  # GQA 4
    (LayoutSpec("streaming", sink=4, recent=16), 18, 4, 2, 16),  # T - recent < sink: a partial sink part
    (LayoutSpec("streaming", sink=16, recent=8), 57, 4, 4, 16),  # more sinks than recent tokens
    (LayoutSpec("streaming", sink=4, recent=32), 20, 2, 1, 16),  # T < recent: the band alone
    (LayoutSpec("streaming", sink=0, recent=8), 33, 2, 2, 16),  # no sinks: a sliding window
]


def _grads(fn, inputs, do):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    return (out, *torch.autograd.grad(out, xs, do.to(out.dtype)))


def _inputs(t, hq, hkv, d, dtype, device, bthd, seed=0):
    gen = torch.Generator().manual_seed(seed + t)

    def make(h):
        x = torch.randn(1, t, h, d, generator=gen).to(device=device, dtype=dtype)
        return x.transpose(1, 2) if bthd else x.transpose(1, 2).contiguous()

    q, k, v = make(hq), make(hkv), make(hkv)
    return q, k, v, torch.randn(1, t, hq, d, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("bthd", [True, False], ids=["bthd", "bhtd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].kind}-w{c[0].window or c[0].recent}-s{c[0].sink}-T{c[1]}-gqa{c[2] // c[3]}")
def test_band_decomposition_is_exact_cpu(case, bthd):
    spec, t, hq, hkv, d = case
    q, k, v, do = _inputs(t, hq, hkv, d, torch.float64, "cpu", bthd)
    got = _grads(lambda a, b, c: band_layout_attention(a, b, c, spec, backend="torch"), (q, k, v), do)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, spec), (q, k, v), do)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=f"{spec} {name}")


def test_band_rejects_other_layouts():
    q = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="sliding_window or streaming"):
        band_layout_attention(q, q, q, LayoutSpec("dense"), backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_band_probe_answers_without_raising_on_gpu():
    offset = band_left_offset(0)
    assert offset is None or offset in (0, -1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not BAND_WORKS, reason=NEEDS_BAND)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].kind}-w{c[0].window or c[0].recent}-s{c[0].sink}-T{c[1]}-gqa{c[2] // c[3]}")
def test_cudnn_band_matches_reference_on_gpu(case):
    spec, t, hq, hkv, d = case
    d = max(d, 64)
    q, k, v, do = _inputs(t * 7, hq, hkv, d, torch.bfloat16, "cuda", True)
    got = _grads(lambda a, b, c: band_layout_attention(a, b, c, spec, backend="cudnn"), (q, k, v), do)
    ref32 = _grads(lambda a, b, c: reference_attention(a, b, c, spec), [x.float() for x in (q, k, v)], do)
    ref_lp = _grads(lambda a, b, c: reference_attention(a, b, c, spec), (q, k, v), do)
    for j, name in enumerate(("out", "dq", "dk", "dv")):
        factor, floor = (2, 1e-5) if j == 0 else (4, 1e-4)
        check_tolerance(f"cudnn band {spec} {name}", got[j], ref32[j], ref_lp[j], factor, floor)


@pytest.mark.gpu
@pytest.mark.skipif(not BAND_WORKS, reason=NEEDS_BAND)
def test_sparse_attention_routes_band_layouts_to_cudnn_when_asked(monkeypatch):
    import headwise.kernels.dispatch as kernels
    from headwise.kernels import band_attention

    calls = []
    monkeypatch.setattr(kernels, "BAND_IMPL", "cudnn")
    real = band_attention.band_layout_attention
    monkeypatch.setattr(kernels, "band_layout_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, _ = _inputs(512, 4, 2, 64, torch.bfloat16, "cuda", True)
    out = kernels.sparse_attention(q, k, v, LayoutSpec("streaming", sink=16, recent=64))
    ref = reference_attention(q.float(), k.float(), v.float(), LayoutSpec("streaming", sink=16, recent=64))
    assert calls and (out.float() - ref).abs().max().item() < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not BAND_WORKS, reason=NEEDS_BAND)
def test_sparse_attention_default_routes_sliding_window_to_cudnn_and_streaming_to_triton(monkeypatch):
    """The default (`BAND_IMPL="auto"`) takes the band for the sliding window only, where it was
    measured faster than both FlexAttention and the Triton kernel; streaming keeps the Triton kernel."""
    import headwise.kernels.dispatch as kernels
    from headwise.kernels import band_attention

    calls = []
    monkeypatch.setattr(kernels, "BAND_IMPL", "auto")
    real = band_attention.band_layout_attention
    monkeypatch.setattr(kernels, "band_layout_attention", lambda q, k, v, spec, **kw: calls.append(spec.kind) or real(q, k, v, spec, **kw))
    q, k, v, _ = _inputs(512, 4, 2, 64, torch.bfloat16, "cuda", True)
    for spec in (LayoutSpec("sliding_window", window=96), LayoutSpec("streaming", sink=16, recent=64)):
        out = kernels.sparse_attention(q, k, v, spec)
        ref = reference_attention(q.float(), k.float(), v.float(), spec)
        assert (out.float() - ref).abs().max().item() < 3e-2
    assert calls == ["sliding_window"]


def test_sink_part_state_reaches_its_backward_cpu(monkeypatch):
    """cuDNN's SDPA op returns a state (RNG seed/offset tensors, sequence bounds) that its backward
    needs back; its tensors go through save_for_backward (gradient checkpointing frees only those).
    A torch sink part that carries such a state checks the round trip on CPU."""
    from headwise.kernels import band_attention

    band_fwd, band_bwd, corner_fwd, corner_bwd = band_attention.BACKENDS["torch"]
    seen = []

    def fwd_with_state(q, k, v, scale):
        out, lse, _ = corner_fwd(q, k, v, scale)
        # the layout of cuDNN's state: sequence offsets (None without packing), max lengths, RNG seed, offset
        return out, lse, (None, None, q.shape[2], k.shape[2], torch.tensor([7]), torch.tensor([11]))

    def bwd_with_state(do, q, k, v, out, lse, scale, state):
        seen.append(state)
        return corner_bwd(do, q, k, v, out, lse, scale, None)

    monkeypatch.setitem(band_attention.BACKENDS, "stateful", (band_fwd, band_bwd, fwd_with_state, bwd_with_state))
    spec = LayoutSpec("streaming", sink=4, recent=16)
    q, k, v, do = _inputs(45, 4, 2, 16, torch.float64, "cpu", True)
    got = _grads(lambda a, b, c: band_layout_attention(a, b, c, spec, backend="stateful"), (q, k, v), do)
    ref = _grads(lambda a, b, c: reference_attention(a, b, c, spec), (q, k, v), do)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    (state,) = seen
    assert state[:4] == (None, None, 45 - 16, 4) and int(state[4]) == 7 and int(state[5]) == 11


@pytest.mark.parametrize("variable", ["HEADWISE_BAND_IMPL", "HEADWISE_SHIFTED_GROUPS_IMPL"])
def test_a_misspelt_implementation_switch_is_an_error_naming_it(variable):
    """A typo in a kernel switch must not silently run another kernel than the one asked for."""
    import os
    import subprocess
    import sys

    env = {**os.environ, variable: "cudn"}
    res = subprocess.run([sys.executable, "-c", "import headwise.kernels"], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert f"{variable}='cudn' is not one of" in res.stderr
