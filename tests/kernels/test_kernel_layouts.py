"""Layouts and the torch reference: tile lists against the token-level definition, properties."""

import pytest
import torch

from headwise.kernels import LayoutSpec, build_layout, build_s2_layout, reference_attention, sparse_attention
from headwise.kernels.layouts import allowed_per_query
from headwise.kernels.reference import token_mask

SPECS = [
    LayoutSpec("dense"),
    LayoutSpec("sliding_window", window=37),
    LayoutSpec("streaming", sink=5, recent=29),
    LayoutSpec("shifted_groups", group_size=48, sink=3),
    LayoutSpec("shifted_groups", group_size=64, sink=0),
    LayoutSpec("shifted_groups", group_ratio=0.25, sink=4),
    LayoutSpec("shifted_groups", group_size=32, sink=2, shifted_heads=(0, 2)),
    LayoutSpec("s2", block=16, local_blocks=2, vert_stride=3),
    LayoutSpec("s2", block=16, local_blocks=1, vert_stride=4, head_offset_base=-1, same_for_all_heads=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("t", [1, 45, 131])
def test_tile_lists_match_token_rule(spec, tiles, t):
    """Every allowed token pair lies in a listed tile, full tiles are fully allowed, and the column
    lists are exactly the transpose of the row lists."""
    bm, bn = tiles
    n_heads = 4
    spec = spec.resolve(t)
    lay = build_layout(spec, t, n_heads, bm, bn)
    for h in range(n_heads):
        mask = token_mask(spec, t, h, n_heads)
        listed = torch.zeros(lay.n_qblocks, lay.n_kblocks, dtype=torch.int8)
        for i in range(lay.n_qblocks):
            full, part = lay.row(h, i)
            assert len(set(full) | set(part)) == len(full) + len(part)
            listed[i, full] = 1
            listed[i, part] = 2
        for i in range(lay.n_qblocks):
            for j in range(lay.n_kblocks):
                tile = mask[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
                if tile.any():
                    assert listed[i, j] > 0, (h, i, j)
                if listed[i, j] == 1:
                    assert tile.all(), (h, i, j)
                if listed[i, j] > 0:  # a listed tile is never entirely in the future
                    assert j * bn <= min(t - 1, (i + 1) * bm - 1)
        for j in range(lay.n_kblocks):
            full, part = lay.col(h, j)
            assert sorted(full) == [i for i in range(lay.n_qblocks) if listed[i, j] == 1]
            assert sorted(part) == [i for i in range(lay.n_qblocks) if listed[i, j] == 2]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_token_masks_are_causal_and_counted(spec):
    t, n_heads = 150, 4
    for h in range(n_heads):
        m = token_mask(spec, t, h, n_heads)
        assert not m.triu(1).any(), "a query sees a later token"
        assert m.diagonal().all(), "every query must see itself"
        assert torch.equal(m.sum(1), allowed_per_query(spec, t, h, n_heads))


def test_token_rules_follow_design_table():
    """Spot values of the layout semantics table (docs/kernels.md), independent of the implementation's own formulas."""
    t = 64
    m = token_mask(LayoutSpec("shifted_groups", group_size=16, sink=2), t, head=3, n_heads=4)  # shifted
    assert m[7, 6] and m[8, 0] and m[8, 1] and not m[8, 7]  # [0, 8) is the first half-group; sinks stay visible
    assert m[23, 8] and not m[24, 8] and m[24, 1] and not m[24, 2]  # groups [8, 24), [24, 40)
    m = token_mask(LayoutSpec("shifted_groups", group_size=16, sink=0), t, head=0, n_heads=4)  # unshifted
    assert m[15, 0] and not m[16, 15] and not m[16, 0]
    m = token_mask(LayoutSpec("s2", block=4, local_blocks=2, vert_stride=4), t, head=1, n_heads=4)
    # o_1 = 1: key blocks kb with (kb + 2) % 4 == 0 -> kb = 2, 6, 10 (tokens 8..11, 24..27, ...)
    assert m[63, 8] and m[63, 24] and not m[63, 12] and m[63, 56] and not m[63, 55]
    m = token_mask(LayoutSpec("streaming", sink=3, recent=4), t, head=0, n_heads=1)
    assert m[40, 2] and not m[40, 3] and m[40, 37] and not m[40, 36]


@pytest.mark.parametrize("t,n_heads,local,stride", [(1000, 8, 4, 8), (777, 16, 2, 8), (512, 4, 1, 4)])
def test_s2_heads_union_covers_every_causal_block(t, n_heads, local, stride):
    lay = build_s2_layout(t, n_heads, block=16, local_blocks=local, vert_stride=stride, block_m=16, block_n=16)
    covered = torch.zeros(lay.n_qblocks, lay.n_kblocks, dtype=torch.bool)
    for h in range(n_heads):
        for i in range(lay.n_qblocks):
            full, part = lay.row(h, i)
            covered[i, full + part] = True
    causal = torch.ones_like(covered).tril()
    assert torch.equal(covered, causal)
    union = torch.zeros(t, t, dtype=torch.bool)
    for h in range(n_heads):
        union |= token_mask(lay.spec, t, h, n_heads)
    assert torch.equal(union, torch.ones(t, t, dtype=torch.bool).tril())
    # the same pattern for all heads does not cover the context (a check that this test can fail)
    same = LayoutSpec("s2", block=16, local_blocks=local, vert_stride=stride, same_for_all_heads=True)
    assert not token_mask(same, t, 0, n_heads).equal(torch.ones(t, t, dtype=torch.bool).tril())


def test_layouts_are_cached_per_shape():
    spec = LayoutSpec("s2", block=16, local_blocks=2, vert_stride=4)
    a = build_layout(spec, 256, 4, 32, 16)
    assert build_layout(spec, 256, 4, 32, 16) is a
    assert build_layout(spec, 512, 4, 32, 16) is not a


def test_padded_rows_view():
    lay = build_layout(LayoutSpec("streaming", sink=5, recent=29), 100, 2, 16, 16)
    idx, counts, flags = lay.padded_rows()
    assert idx.shape[:2] == (2, lay.n_qblocks) and counts.sum() == lay.nnz
    full, part = lay.row(1, 5)
    assert idx[1, 5, : len(full) + len(part)].tolist() == full + part
    assert flags[1, 5].sum() == len(part)


def test_reference_chunking_and_packing(monkeypatch):
    """Chunked queries give the same result as one chunk; packed sequences equal separate calls."""
    import headwise.kernels.reference as ref

    torch.manual_seed(0)
    spec = LayoutSpec("streaming", sink=3, recent=20)
    q, k, v = torch.randn(1, 4, 90, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    cu = torch.tensor([0, 30, 61, 90], dtype=torch.int32)
    out, lse = reference_attention(q, k, v, spec, cu_seqlens=cu, return_lse=True)
    monkeypatch.setattr(ref, "Q_CHUNK", 7)
    out2, lse2 = reference_attention(q, k, v, spec, cu_seqlens=cu, return_lse=True)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(lse, lse2)
    for s, e in [(0, 30), (30, 61), (61, 90)]:
        o = reference_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], spec)
        torch.testing.assert_close(out[:, s:e], o)


def test_cpu_dispatch_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    spec = LayoutSpec("sliding_window", window=9)
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 1, 33, 16), torch.randn(2, 1, 33, 16)
    out = sparse_attention(q, k, v, spec)
    assert out.shape == (2, 33, 4, 16) and out.is_contiguous()
    assert torch.equal(out, reference_attention(q, k, v, spec))
    # against a naive dense softmax with the mask, GQA by repeating K/V
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    s = (q @ kk.transpose(-1, -2)) / 4.0
    s = s.masked_fill(~token_mask(spec, 33, 0, 4), float("-inf"))
    naive = (s.softmax(-1) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, naive)
