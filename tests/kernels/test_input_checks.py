"""Inputs the attention functions cannot take get one error naming the argument, before any kernel runs."""

import pytest
import torch

from headwise.kernels import (LayoutSpec, band_layout_attention, shifted_group_attention, sparse_attention,
                              sparse_attention_triton)

SPEC = LayoutSpec("streaming", sink=4, recent=16)


def _qkv(t=40, d=16, hq=4, hkv=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, t, d, generator=g, dtype=dtype) for h in (hq, hkv, hkv))


BAD = {
    "k shorter than q": (lambda q, k, v: (q, k[:, :, :30], v[:, :, :30]), "k/v have B=1, T=30 but q has B=1, T=40"),
    "v with another head dim": (lambda q, k, v: (q, k, torch.randn(1, 2, 40, 32)), r"k \(1, 2, 40, 16\) and v \(1, 2, 40, 32\)"),
    "q and k/v head dims differ": (lambda q, k, v: (torch.randn(1, 4, 40, 32), k, v), "q's head dim 32 differs"),
    "3-D q": (lambda q, k, v: (q[0], k, v), r"q must be a 4-D tensor .* got \(4, 40, 16\)"),
    "heads not a multiple": (lambda q, k, v: (torch.randn(1, 3, 40, 16), k, v), "3 query heads are not a multiple of 2"),
    "mixed dtypes": (lambda q, k, v: (q.half(), k, v), "one floating dtype"),
    "integer tensors": (lambda q, k, v: (q.long(), k.long(), v.long()), "one floating dtype"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("fn", ["sparse_attention", "sparse_attention_triton"])
def test_bad_inputs_name_what_is_wrong(case, fn):
    make, message = BAD[case]
    q, k, v = make(*_qkv())
    call = sparse_attention if fn == "sparse_attention" else sparse_attention_triton
    with pytest.raises(ValueError, match=message):
        call(q, k, v, SPEC)


def test_the_dense_forms_check_their_inputs_too():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="T=30 but q has B=1, T=40"):
        shifted_group_attention(q, k[:, :, :30], v[:, :, :30], LayoutSpec("shifted_groups", group_size=16, sink=2))
    with pytest.raises(ValueError, match="T=30 but q has B=1, T=40"):
        band_layout_attention(q, k[:, :, :30], v[:, :, :30], LayoutSpec("sliding_window", window=8))


def test_kernel_only_limits():
    """The Triton kernels take fp16 / bf16 / fp32 up to head dim 256; the torch reference (the CPU
    path of sparse_attention) takes fp64 too."""
    with pytest.raises(ValueError, match="head dim 512 is above 256"):
        sparse_attention_triton(*_qkv(t=8, d=512), SPEC)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32; got torch.float64"):
        sparse_attention_triton(*_qkv(dtype=torch.float64), SPEC)
    out = sparse_attention(*_qkv(dtype=torch.float64), SPEC)  # CPU: the reference
    assert out.dtype == torch.float64 and out.shape == (1, 40, 4, 16)


def test_packed_boundaries_must_be_integer_and_single_batch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        sparse_attention(q, k, v, SPEC, cu_seqlens=torch.tensor([0.0, 20.0, 40.0]))
    q2, k2, v2 = (torch.cat([x, x]) for x in (q, k, v))
    with pytest.raises(ValueError, match="cu_seqlens needs B == 1"):
        sparse_attention(q2, k2, v2, SPEC, cu_seqlens=torch.tensor([0, 20, 40], dtype=torch.int32))


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="slidingwindow", window=8), "unknown layout kind 'slidingwindow'; one of"),
    (dict(kind="sliding_window"), "sliding_window needs window >= 1"),
    (dict(kind="streaming", sink=-1, recent=8), "streaming needs recent >= 1 and sink >= 0"),
    (dict(kind="shifted_groups"), "exactly one of group_size, group_ratio"),
    (dict(kind="shifted_groups", group_size=64, group_ratio=0.25), "exactly one of group_size, group_ratio"),
    (dict(kind="shifted_groups", group_size=15), "group_size must be even"),
    (dict(kind="shifted_groups", group_ratio=2.0), r"group_ratio=2.0 must be in \(0, 1\]"),
    (dict(kind="shifted_groups", group_size=16, sink=-2), "shifted_groups needs sink >= 0"),
    (dict(kind="s2", block=16, local_blocks=2, vert_stride=0), "s2 needs block, local_blocks, vert_stride >= 1"),
], ids=lambda x: str(x)[:40])
def test_bad_layouts_name_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayoutSpec(**kwargs)


def test_the_documented_kernel_example_runs():
    """docs/kernels.md's "Using the kernels" block, run as written (CPU: the torch reference)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "kernels.md").read_text()
    block = re.search(r"<!-- kernels-example -->\s*```python\n(.*?)```", page, re.S)
    assert block, "docs/kernels.md lost its kernels example"
    exec(compile(block.group(1), "docs/kernels.md", "exec"), {})
