"""Per-head block layouts: which (query tile, key tile) pairs each head computes.

Every training-time pattern of headwise is causal attention restricted, per query head, to a set of
key tiles, with at most a token-level rule inside some tiles (docs/kernels.md, "Layout semantics"). This
module holds the two objects the kernels and the reference share:

``LayoutSpec``
    The token-level definition of a pattern (kind + parameters). It is small, hashable and
    independent of the sequence length, so a patch builds one per layer and the kernels turn it into
    a ``BlockLayout`` per (length, heads, tile shape, device), cached. The reference
    (``kernels/reference.py``) reads only the spec, never the tile lists, so comparing the two checks
    the tile-list construction.

``BlockLayout``
    The tile lists, for one tile shape ``block_m x block_n``:

    * row lists (forward and dQ): for head ``h`` and query tile ``i`` the key tiles visited, stored
      CSR-style: ``row_ptr[h * n_qblocks + i] .. row_ptr[... + 1]`` indexes ``row_idx``. Each row lists
      the *full* tiles first (every token pair allowed: no mask needed) and then the *partial* tiles
      (a token-level rule applies: causal diagonal, sink columns, window or group edges inside the
      tile); ``row_nfull`` says where the partial ones start.
    * column lists (dK/dV): for head ``h`` and key tile ``j`` the query tiles that visit it, same CSR
      shape (``col_ptr``, ``col_idx``, ``col_nfull``).
    * ``head_param``: per-head int32 parameter of the token rule (the group offset 0 or G/2 for
      shifted groups, the stride offset ``o_h`` for S2, 0 otherwise).

    CSR rather than padded ``(H, n_qblocks, max_kblocks)`` tensors: the S2 stride columns are visited
    by every later query tile, so a padded column table at 128K would hold ~270 MB of padding.
    ``padded_rows()`` gives the padded view for inspection and tests.

Tiles are classified analytically from the tile's token ranges (interval arithmetic per rule), one
head at a time, so building a layout costs O(H * n_qblocks * n_kblocks) small integer ops and never
materialises a token-level mask. A tile is marked *full* only when every token pair in it is allowed
(exact); *partial* may be conservative (the kernel applies the token rule there anyway).

Rules are applied to positions inside one sequence; a layout built for length ``T`` serves every
sequence of length ``<= T`` (its rows only depend on the tile index), which is how packed sequences
(``cu_seqlens``) use it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

# Kind codes shared with the Triton kernel (a tl.constexpr selects the token rule).
DENSE, SLIDING_WINDOW, STREAMING, SHIFTED_GROUPS, S2 = 0, 1, 2, 3, 4
_KIND_CODES = {
    "dense": DENSE,
    "sliding_window": SLIDING_WINDOW,
    "streaming": STREAMING,
    "shifted_groups": SHIFTED_GROUPS,
    "s2": S2,
}

# Group sizes given as a ratio of the sequence length are rounded up to this multiple, so that group
# edges fall on kernel tile edges (the largest tile any kernel config uses is 128; 64 keeps the
# group a multiple of the 64-token tiles and of the G/2 shift for every ratio used in practice).
GROUP_ROUND = 64


@dataclass(frozen=True)
class LayoutSpec:
    """Token-level definition of a causal head-wise pattern (the semantics table of docs/kernels.md).

    A query at position ``q`` of head ``h`` may attend to key ``k`` (positions inside one sequence)
    when ``k <= q`` and:

    - ``dense``: always.
    - ``sliding_window``: ``q - k < window``.
    - ``streaming``: ``k < sink`` or ``q - k < recent`` (DuoAttention streaming heads).
    - ``shifted_groups``: ``k < sink`` or ``grp_h(q) == grp_h(k)`` with ``grp_h(x) = x // G`` for
      unshifted heads and ``(x + G//2) // G`` for shifted heads (no wrap-around). ``sink=0`` is
      LongLoRA's S2-Attn. ``G`` is ``group_size`` or ``ceil(T * group_ratio)`` rounded up to a
      multiple of ``GROUP_ROUND``. Shifted heads default to the upper half of the query heads.
    - ``s2``: with ``qb = q // block``, ``kb = k // block``: ``qb - kb < local_blocks`` or
      ``(kb + o_h + 1) % vert_stride == 0``, ``o_h = h % vert_stride`` (vLLM / Phi-3-small
      convention; ``head_offset_base`` shifts every head's offset, ``-1`` reproduces dkernel's
      default offset 0 for head 0). ``same_for_all_heads`` gives every head head 0's pattern.

    The model's own attention composes with every kind (DESIGN.md, "Layout semantics"):

    - ``window > 0`` on any kind adds ``q - k < window`` (a sliding-window layer of the model: the
      intersection of both rules; for ``sliding_window`` it is the layout itself);
    - ``softcap > 0`` replaces the score ``s = scale * q.k`` by ``softcap * tanh(s / softcap)`` before the
      softmax (Gemma-2's logit soft-capping).

    Learned sink logits are not a mask rule: ``kernels/learned_sinks.py`` folds them in from the
    log-sum-exp.
    """

    kind: str = "dense"
    window: int = 0
    sink: int = 0
    recent: int = 0
    group_size: int = 0
    group_ratio: float = 0.0
    shifted_heads: Optional[tuple] = None
    block: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    head_offset_base: int = 0
    same_for_all_heads: bool = False
    softcap: float = 0.0

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0: no window), got {self.window}")
        if not (self.softcap >= 0 and math.isfinite(self.softcap)):
            raise ValueError(f"softcap must be a finite number >= 0 (0: no cap), got {self.softcap}")
        if self.kind not in _KIND_CODES:
            raise ValueError(f"unknown layout kind {self.kind!r}; one of {sorted(_KIND_CODES)}")
        if self.kind == "sliding_window" and self.window < 1:
            raise ValueError("sliding_window needs window >= 1")
        if self.kind == "streaming" and (self.recent < 1 or self.sink < 0):
            raise ValueError("streaming needs recent >= 1 and sink >= 0")
        if self.kind == "shifted_groups":
            if (self.group_size > 0) == (self.group_ratio > 0):
                raise ValueError("shifted_groups needs exactly one of group_size, group_ratio")
            if self.group_size and self.group_size % 2:
                raise ValueError("group_size must be even (shifted heads move by G/2)")
            if self.group_ratio > 1:
                raise ValueError(f"group_ratio={self.group_ratio} must be in (0, 1]: a group is that share of the sequence")
            if self.sink < 0:
                raise ValueError(f"shifted_groups needs sink >= 0, got {self.sink}")
        if self.kind == "s2" and (self.block < 1 or self.local_blocks < 1 or self.vert_stride < 1):
            raise ValueError("s2 needs block, local_blocks, vert_stride >= 1")

    @property
    def code(self) -> int:
        return _KIND_CODES[self.kind]

    @property
    def extra_window(self) -> int:
        """The window the kernels apply on top of the kind's own rule (0: none). A ``sliding_window``
        layout's window is its own rule, not an extra one."""
        return 0 if self.kind == "sliding_window" else self.window

    @property
    def composed(self) -> bool:
        """Whether the model's own rules (a window on another kind, a softcap) apply: only the
        block-sparse Triton kernel and the reference implement them."""
        return self.extra_window > 0 or self.softcap > 0

    def resolve(self, seq_len: int) -> "LayoutSpec":
        """Fix length-dependent parameters (``group_ratio`` -> ``group_size``) for ``seq_len``."""
        if self.kind == "shifted_groups" and self.group_ratio > 0:
            g = math.ceil(seq_len * self.group_ratio)
            g = max(GROUP_ROUND, -(-g // GROUP_ROUND) * GROUP_ROUND)
            return replace(self, group_size=g, group_ratio=0.0)
        return self

    def shifted(self, n_heads: int) -> tuple:
        if self.shifted_heads is not None:
            return tuple(sorted(int(h) for h in self.shifted_heads))
        return tuple(range(n_heads // 2, n_heads))

    def head_params(self, n_heads: int) -> list:
        """Per-head int parameter of the token rule (see ``BlockLayout.head_param``)."""
        if self.kind == "shifted_groups":
            s = set(self.shifted(n_heads))
            return [self.group_size // 2 if h in s else 0 for h in range(n_heads)]
        if self.kind == "s2":
            if self.same_for_all_heads:
                return [(self.head_offset_base) % self.vert_stride] * n_heads
            return [(h + self.head_offset_base) % self.vert_stride for h in range(n_heads)]
        return [0] * n_heads

    def scalar_params(self) -> tuple:
        """Four ints handed to the kernel's token rule: three with a meaning per kind (unused ones 0), then
        the model's window on top of the kind's rule (``extra_window``, 0 for none)."""
        w = self.extra_window
        if self.kind == "sliding_window":
            return (self.window, 0, 0, w)
        if self.kind == "streaming":
            return (self.sink, self.recent, 0, w)
        if self.kind == "shifted_groups":
            if self.group_size <= 0:
                raise ValueError("resolve() the spec for a sequence length first")
            return (self.sink, self.group_size, 0, w)
        if self.kind == "s2":
            return (self.block, self.local_blocks, self.vert_stride, w)
        return (0, 0, 0, w)

    def density(self, seq_len: int, n_heads: int) -> float:
        """Allowed (query, key) pairs over the causal pairs ``T (T + 1) / 2``, exact, averaged over
        heads (dense causal is 1.0)."""
        spec = self.resolve(seq_len)
        total = sum(int(allowed_per_query(spec, seq_len, h, n_heads).sum()) for h in range(n_heads))
        return total / (n_heads * seq_len * (seq_len + 1) / 2)


@dataclass
class BlockLayout:
    """Tile lists of one ``LayoutSpec`` for sequences of up to ``seq_len`` tokens (module doc)."""

    spec: LayoutSpec  # resolved: no group_ratio left
    seq_len: int
    n_heads: int
    block_m: int
    block_n: int
    n_qblocks: int
    n_kblocks: int
    head_param: torch.Tensor  # (H,) int32
    row_ptr: torch.Tensor  # (H * n_qblocks + 1,) int32
    row_idx: torch.Tensor  # (nnz,) int32 key-tile indices, full tiles first in each row
    row_nfull: torch.Tensor  # (H * n_qblocks,) int32
    col_ptr: torch.Tensor  # (H * n_kblocks + 1,) int32
    col_idx: torch.Tensor  # (nnz,) int32 query-tile indices, full tiles first in each column
    col_nfull: torch.Tensor  # (H * n_kblocks,) int32
    n_partial: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return int(self.row_idx.numel())

    @property
    def tile_density(self) -> float:
        """Computed tiles over all T^2 tiles (what the kernel's work scales with)."""
        return self.nnz / (self.n_heads * self.n_qblocks * self.n_kblocks)

    @staticmethod
    def _split(ptr: torch.Tensor, nfull: torch.Tensor, idx: torch.Tensor, r: int) -> tuple:
        s, e = int(ptr[r]), int(ptr[r + 1])
        tiles = idx[s:e].tolist()
        return tiles[: int(nfull[r])], tiles[int(nfull[r]) :]

    def row(self, h: int, i: int) -> tuple:
        """(full key tiles, partial key tiles) of head ``h``, query tile ``i`` as Python lists."""
        return self._split(self.row_ptr, self.row_nfull, self.row_idx, h * self.n_qblocks + i)

    def col(self, h: int, j: int) -> tuple:
        """(full query tiles, partial query tiles) visiting key tile ``j`` of head ``h``."""
        return self._split(self.col_ptr, self.col_nfull, self.col_idx, h * self.n_kblocks + j)

    def padded_rows(self) -> tuple:
        """Padded view: ``(idx (H, nQ, max_k) int32 with -1 padding, counts, partial flags)``."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).view(self.n_heads, self.n_qblocks)
        max_k = int(counts.max()) if counts.numel() else 0
        idx = torch.full((self.n_heads, self.n_qblocks, max_k), -1, dtype=torch.int32)
        flags = torch.zeros((self.n_heads, self.n_qblocks, max_k), dtype=torch.bool)
        ptr = self.row_ptr.cpu()
        ri = self.row_idx.cpu()
        nf = self.row_nfull.cpu().view(self.n_heads, self.n_qblocks)
        for h in range(self.n_heads):
            for i in range(self.n_qblocks):
                r = h * self.n_qblocks + i
                s, e = int(ptr[r]), int(ptr[r + 1])
                idx[h, i, : e - s] = ri[s:e]
                flags[h, i, int(nf[h, i]) : e - s] = True
        return idx, counts.cpu(), flags

    def to(self, device) -> "BlockLayout":
        names = ("head_param", "row_ptr", "row_idx", "row_nfull", "col_ptr", "col_idx", "col_nfull")
        return replace(self, **{n: getattr(self, n).to(device) for n in names})


# --------------------------------------------------------------------------------------------------
# Tile classification: for tiles with query range [q0, q1] and key range [k0, k1] (inclusive),
# return (any_allowed, all_allowed) boolean tensors. q* are (nQ, 1), k* are (1, nK) int64 tensors.
# --------------------------------------------------------------------------------------------------


def _classify(spec: LayoutSpec, hp: int, q0, q1, k0, k1):
    any_, full = _classify_kind(spec, hp, q0, q1, k0, k1)
    w = spec.extra_window
    if w:  # the model's window: some / every q - k of the tile in [0, w - 1]
        any_, full = any_ & (q0 - k1 <= w - 1), full & (q1 - k0 <= w - 1)
    return any_, full


def _classify_kind(spec: LayoutSpec, hp: int, q0, q1, k0, k1):
    any_causal = k0 <= q1
    all_causal = k1 <= q0
    kind = spec.kind
    if kind == "dense":
        return any_causal, all_causal
    if kind == "sliding_window":
        w = spec.window
        # q - k ranges over [q0 - k1, q1 - k0]; need some value in [0, w - 1] / all values in it.
        return any_causal & (q0 - k1 <= w - 1), all_causal & (q1 - k0 <= w - 1)
    if kind == "streaming":
        s, r = spec.sink, spec.recent
        any_win = any_causal & (q0 - k1 <= r - 1)
        any_ = any_win | (any_causal & (k0 < s))
        # full: keys below the sink edge are fine; the rest must all be within `recent` of q1.
        k_rest = torch.maximum(k0, torch.full_like(k0, s))
        full = all_causal & ((k1 < s) | (q1 - k_rest <= r - 1))
        return any_, full
    if kind == "shifted_groups":
        s, g = spec.sink, spec.group_size

        def grp(x):
            return torch.div(x + hp, g, rounding_mode="floor")

        overlap = torch.maximum(grp(q0), grp(k0)) <= torch.minimum(grp(q1), grp(k1))
        any_ = any_causal & (overlap | (k0 < s))
        k_rest = torch.maximum(k0, torch.full_like(k0, s))
        same = (grp(q0) == grp(q1)) & (grp(k_rest) == grp(k1)) & (grp(q0) == grp(k1))
        full = all_causal & ((k1 < s) | same)
        return any_, full
    if kind == "s2":
        b, loc, v = spec.block, spec.local_blocks, spec.vert_stride

        def blk(x):
            return torch.div(x, b, rounding_mode="floor")

        kb0, kb1 = blk(k0), blk(k1)
        # number of key blocks kb in [kb0, kb1] with (kb + hp + 1) % v == 0
        n_stride = torch.div(kb1 + hp + 1, v, rounding_mode="floor") - torch.div(
            kb0 + hp, v, rounding_mode="floor"
        )
        any_local = blk(q0) - blk(torch.minimum(k1, q1)) < loc
        any_ = any_causal & (any_local | (n_stride > 0))
        full_local = blk(q1) - kb0 < loc
        full_stride = (kb0 == kb1) & (n_stride > 0)
        full = all_causal & (full_local | full_stride)
        return any_, full
    raise AssertionError(kind)


def _to_csr(state_rows: list, n_minor: int, device):
    """Rows of tile states (int8: 0 empty, 1 full, 2 partial), each (n_major, n_minor), one per
    head, to CSR (ptr, idx, nfull) with full tiles first in each row."""
    ptrs, idxs, nfulls = [], [], []
    offset = 0
    big = 2 * n_minor + 1
    ar = torch.arange(n_minor, device=device, dtype=torch.int32)
    for st in state_rows:
        key = torch.where(st == 1, ar, torch.where(st == 2, ar + n_minor, torch.full_like(ar, big)))
        key, _ = torch.sort(key, dim=-1)
        cnt = (st != 0).sum(-1).to(torch.int32)
        nfull = (st == 1).sum(-1).to(torch.int32)
        flat = key[key < big]
        flat = torch.where(flat >= n_minor, flat - n_minor, flat).to(torch.int32)
        ptr = torch.cumsum(cnt, 0, dtype=torch.int64) + offset
        offset += int(flat.numel())
        ptrs.append(ptr)
        idxs.append(flat)
        nfulls.append(nfull)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=device)] + ptrs)
    if offset >= 2**31:
        raise ValueError("layout too large for int32 tile indices")
    return ptr.to(torch.int32), torch.cat(idxs), torch.cat(nfulls)


def _build(spec: LayoutSpec, seq_len: int, n_heads: int, block_m: int, block_n: int, device):
    spec = spec.resolve(seq_len)
    n_q = -(-seq_len // block_m)
    n_k = -(-seq_len // block_n)
    qs = torch.arange(n_q, device=device, dtype=torch.int64).view(-1, 1) * block_m
    ks = torch.arange(n_k, device=device, dtype=torch.int64).view(1, -1) * block_n
    q0, q1 = qs, torch.clamp(qs + block_m - 1, max=seq_len - 1)
    k0, k1 = ks, torch.clamp(ks + block_n - 1, max=seq_len - 1)
    hps = spec.head_params(n_heads)
    rows, cols = [], []
    cache = {}
    n_partial = 0
    for h in range(n_heads):
        hp = hps[h]
        if hp not in cache:  # heads with the same parameter share the tile states
            any_, full = _classify(spec, hp, q0, q1, k0, k1)
            st = torch.where(full, 1, torch.where(any_, 2, 0)).to(torch.int8)
            cache[hp] = st
        st = cache[hp]
        n_partial += int((st == 2).sum())
        rows.append(st)
        cols.append(st.t())
    row_ptr, row_idx, row_nfull = _to_csr(rows, n_k, device)
    col_ptr, col_idx, col_nfull = _to_csr(cols, n_q, device)
    return BlockLayout(
        spec=spec,
        seq_len=seq_len,
        n_heads=n_heads,
        block_m=block_m,
        block_n=block_n,
        n_qblocks=n_q,
        n_kblocks=n_k,
        head_param=torch.tensor(hps, dtype=torch.int32, device=device),
        row_ptr=row_ptr,
        row_idx=row_idx,
        row_nfull=row_nfull,
        col_ptr=col_ptr,
        col_idx=col_idx,
        col_nfull=col_nfull,
        n_partial=n_partial,
    )


@functools.lru_cache(maxsize=256)
def _build_cached(spec, seq_len, n_heads, block_m, block_n, device_str):
    return _build(spec, seq_len, n_heads, block_m, block_n, torch.device(device_str))


def build_layout(
    spec: LayoutSpec, seq_len: int, n_heads: int, block_m: int = 64, block_n: int = 64, device="cpu"
) -> BlockLayout:
    """Tile lists of ``spec`` for sequences of up to ``seq_len`` tokens, cached per
    (spec, seq_len, heads, tile shape, device). Resolve ratio-based specs against the real sequence
    length before padding ``seq_len`` up (``spec.resolve(T)``), or the group size follows the pad."""
    if block_m & (block_m - 1) or block_n & (block_n - 1) or block_m < 16 or block_n < 16:
        raise ValueError("tile sizes must be powers of two >= 16")
    return _build_cached(spec, int(seq_len), int(n_heads), int(block_m), int(block_n), str(torch.device(device)))


# ------------------------------------------------------------------------------------------ builders


def build_dense_causal_layout(seq_len, n_heads, block_m=64, block_n=64, device="cpu"):
    return build_layout(LayoutSpec("dense"), seq_len, n_heads, block_m, block_n, device)


def build_sliding_window_layout(seq_len, n_heads, window, block_m=64, block_n=64, device="cpu"):
    return build_layout(LayoutSpec("sliding_window", window=window), seq_len, n_heads, block_m, block_n, device)


def build_streaming_layout(seq_len, n_heads, sink=128, recent=256, block_m=64, block_n=64, device="cpu"):
    spec = LayoutSpec("streaming", sink=sink, recent=recent)
    return build_layout(spec, seq_len, n_heads, block_m, block_n, device)


def build_shifted_group_layout(
    seq_len,
    n_heads,
    group_size=0,
    group_ratio=0.0,
    shifted_heads=None,
    sink=0,
    block_m=64,
    block_n=64,
    device="cpu",
):
    spec = LayoutSpec(
        "shifted_groups",
        group_size=group_size,
        group_ratio=group_ratio,
        shifted_heads=None if shifted_heads is None else tuple(shifted_heads),
        sink=sink,
    )
    return build_layout(spec.resolve(seq_len), seq_len, n_heads, block_m, block_n, device)


def build_s2_layout(
    seq_len,
    n_heads,
    block=64,
    local_blocks=16,
    vert_stride=8,
    head_offset_base=0,
    same_for_all_heads=False,
    block_m=64,
    block_n=64,
    device="cpu",
):
    spec = LayoutSpec(
        "s2",
        block=block,
        local_blocks=local_blocks,
        vert_stride=vert_stride,
        head_offset_base=head_offset_base,
        same_for_all_heads=same_for_all_heads,
    )
    return build_layout(spec, seq_len, n_heads, block_m, block_n, device)


def allowed_per_query(spec, seq_len: int, head: int, n_heads: int) -> torch.Tensor:
    """Number of keys each query of one head may attend to, in closed form (int64 ``(T,)``).

    Used for densities at long T where a ``(T, T)`` mask would not fit; tests check it against
    ``token_mask``.
    """
    spec = (spec.spec if isinstance(spec, BlockLayout) else spec).resolve(seq_len)
    q = torch.arange(seq_len, dtype=torch.int64)
    if spec.extra_window:
        # No closed form per kind: count the allowed keys along each of the window's w diagonals (w passes
        # over T queries, never a (T, T) mask).
        counts = torch.zeros(seq_len, dtype=torch.int64)
        for d in range(min(spec.extra_window, seq_len)):
            counts += token_rule(spec, q, q - d, head, n_heads) & (q >= d)
        return counts
    kind = spec.kind
    if kind == "dense":
        return q + 1
    if kind == "sliding_window":
        return torch.clamp(q + 1, max=spec.window)
    if kind == "streaming":
        win = torch.clamp(q + 1, max=spec.recent)
        # sinks outside the window: keys k < sink with k <= q - recent
        return win + torch.clamp(torch.clamp(q - spec.recent + 1, min=0), max=spec.sink)
    if kind == "shifted_groups":
        g = spec.group_size
        off = g // 2 if head in set(spec.shifted(n_heads)) else 0
        start = torch.clamp(torch.div(q + off, g, rounding_mode="floor") * g - off, min=0)
        return (q - start + 1) + torch.clamp(start, max=spec.sink)
    if kind == "s2":
        b, loc, v = spec.block, spec.local_blocks, spec.vert_stride
        o = spec.head_offset_base % v if spec.same_for_all_heads else (head + spec.head_offset_base) % v
        qb = torch.div(q, b, rounding_mode="floor")
        first_local = torch.clamp(qb - loc + 1, min=0)  # first key block inside the local band
        local = q - first_local * b + 1
        # key blocks kb in [0, first_local - 1] with (kb + o + 1) % v == 0, each fully visible
        n = torch.div(first_local + o, v, rounding_mode="floor") - (o // v)
        return local + n * b
    raise AssertionError(kind)


def token_rule(spec: LayoutSpec, q: torch.Tensor, k: torch.Tensor, head, n_heads: int) -> torch.Tensor:
    """Boolean ``allowed(q, k)`` of ``spec`` (resolved) for broadcastable position tensors ``q``, ``k``,
    the window included.

    ``head`` is one head index, or an int64 tensor of head indices broadcastable against ``q`` and
    ``k`` (e.g. ``(H, 1, 1)``) to evaluate many heads at once.
    """
    allowed = k <= q
    if spec.window:
        allowed = allowed & (q - k < spec.window)
    kind = spec.kind
    if kind in ("dense", "sliding_window"):
        return allowed
    if kind == "streaming":
        return allowed & ((k < spec.sink) | (q - k < spec.recent))
    head_t = torch.as_tensor(head, device=q.device)
    if kind == "shifted_groups":
        g = spec.group_size
        if g <= 0:
            raise ValueError("resolve() the spec for a sequence length first")
        shifted = torch.tensor(sorted(spec.shifted(n_heads)), dtype=head_t.dtype, device=q.device)
        off = torch.isin(head_t, shifted).to(q.dtype) * (g // 2)
        same = torch.div(q + off, g, rounding_mode="floor") == torch.div(k + off, g, rounding_mode="floor")
        return allowed & ((k < spec.sink) | same)
    if kind == "s2":
        v = spec.vert_stride
        o = torch.full_like(head_t, spec.head_offset_base % v) if spec.same_for_all_heads else (head_t + spec.head_offset_base) % v
        qb = torch.div(q, spec.block, rounding_mode="floor")
        kb = torch.div(k, spec.block, rounding_mode="floor")
        return allowed & ((qb - kb < spec.local_blocks) | ((kb + o + 1) % v == 0))
    raise AssertionError(kind)
