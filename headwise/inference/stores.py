"""Per-head-group KV stores: what one group of KV heads of one layer keeps, and what it evicts.

A store holds keys, values and, per kept slot, whether the slot is a real token (`valid`: left
padding is not), the token's absolute position (`pos`, -1 for padding) and its accumulated
attention (`score`, H2O only). Shapes are `(B, H, L, D)` for keys/values and `(B, H, L)` for the
rest, `H` the KV heads of the group: every row and every head has its own kept set.

One step is `append` (before attention: returns the keys/values attention runs over) then
`finish` (after attention: commits the new tokens' positions, adds the column sums to the scores,
evicts). Eviction is one rule for every budgeted policy: give each slot a priority, keep the
`budget` slots of highest priority; padding has priority -inf, protected tokens (the recent window,
sinks) +inf, the rest their H2O score or, for streaming, their position (oldest goes first).

On a layer with a sliding window `w` (the model's own, `EvictionRule.window`), a slot the next query cannot
see (`q - k >= w`) is no longer valid: it is masked at once and evicted first, so every policy keeps the
intersection of its rule and the window; `full` becomes a window cache of `w - 1` tokens. A streaming slot
outside sink + recent is likewise invalid (it matters once a sink leaves the window: the budget would
otherwise keep an older token in its place).

Two implementations share the rule:
- `DynamicStore` concatenates and compacts with `topk` + `gather` (the readable reference; used by
  `generate` and at prefill).
- `SlotStore` (`headwise.inference.static_decode`) has fixed-size buffers after prefill: the new token goes into
  the free slot, the lowest-priority slot becomes the next free slot. Same kept sets, static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
POS_INF = float("inf")


@dataclass
class EvictionRule:
    """`kind`: `full` (no budget), `streaming` (sink + recent) or `h2o` (heavy + recent).

    Budgets are token counts, or ratios resolved from the prompt length at the first `finish`.
    """

    kind: str
    sink: int = 0
    heavy: int | None = None
    recent: int | None = None
    heavy_ratio: float | None = None
    recent_ratio: float | None = None
    window: int | None = None  # the model's sliding window on this layer (None: full attention)

    @property
    def needs_scores(self) -> bool:
        return self.kind == "h2o"

    @property
    def resolved(self) -> bool:
        return self.kind == "full" or self.recent is not None

    def resolve(self, prompt_length: int) -> None:
        if self.resolved:
            return
        self.recent = max(1, int(self.recent_ratio * prompt_length))
        if self.kind == "h2o":
            self.heavy = max(1, int(self.heavy_ratio * prompt_length))

    @property
    def budget(self) -> int | None:
        """Slots kept between steps (None: unbounded)."""
        if self.kind == "full":
            return None if self.window is None else max(1, self.window - 1)
        return self.recent + (self.heavy if self.kind == "h2o" else self.sink)

    def attendable(self, pos: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Which slots the next query (at `current + 1`) may attend to under the rule and the model's window;
        the others stop being valid. `current` (B, 1, 1) or broadcastable: the newest position per row."""
        ok = torch.ones_like(pos, dtype=torch.bool)
        if self.window is not None:
            ok = pos > current + 1 - self.window  # q - k < w for q = current + 1
        if self.kind == "streaming" and self.recent is not None:
            ok = ok & ((pos < self.sink) | (pos > current - self.recent))
        return ok

    def priority(self, score: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Priority of every slot; the lowest go first. `current` (B, 1, 1): the newest position per row."""
        if self.kind == "full":  # budgeted only by the window: the valid slots are the window, oldest first
            base = pos.to(torch.float32)
            return torch.where(valid, base, torch.full_like(base, NEG_INF))
        recent = pos > current - self.recent
        if self.kind == "streaming":
            protected = recent | (pos < self.sink)
            base = pos.to(torch.float32)
        else:
            protected = recent
            base = score
        pri = torch.where(protected, torch.full_like(base, POS_INF), base)
        return torch.where(valid, pri, torch.full_like(base, NEG_INF))


class DynamicStore:
    """Growing store: concatenates the new tokens, then keeps the `budget` slots of highest priority."""

    causal_tail = True  # the new tokens are the last slots (attention applies a causal mask to them)

    def __init__(self, rule: EvictionRule):
        self.rule = rule
        self.release()

    def release(self) -> None:
        """Drop every tensor the store holds (the state of a new, empty store)."""
        self.keys = self.values = None
        self.valid = self.pos = self.score = None
        self.n_new = 0

    @property
    def needs_scores(self) -> bool:
        return self.rule.needs_scores

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.n_new = k.shape[-2]
        if self.keys is None:
            self.keys, self.values = k, v
            B, H, _, _ = k.shape
            self.valid = torch.zeros(B, H, 0, dtype=torch.bool, device=k.device)
            self.pos = torch.zeros(B, H, 0, dtype=torch.long, device=k.device)
            self.score = torch.zeros(B, H, 0, dtype=torch.float32, device=k.device)
        else:
            self.keys = torch.cat([self.keys, k], dim=-2)
            self.values = torch.cat([self.values, v], dim=-2)
        return self.keys, self.values

    def key_valid(self, valid_new: torch.Tensor) -> torch.Tensor:
        """(B, H, L) validity of every slot attention sees; `valid_new` (B, q) for the new tokens."""
        B, H = self.valid.shape[:2]
        return torch.cat([self.valid, valid_new[:, None, :].expand(B, H, -1)], dim=-1)

    def key_pos(self, pos_new: torch.Tensor) -> torch.Tensor:
        """(B, H, L) absolute position of every slot attention sees; `pos_new` (B, q) for the new tokens."""
        B, H = self.pos.shape[:2]
        return torch.cat([self.pos, pos_new[:, None, :].expand(B, H, -1)], dim=-1)

    def finish(self, colsums: torch.Tensor | None, valid_new: torch.Tensor, pos_new: torch.Tensor) -> None:
        B, H = self.valid.shape[:2]
        q = self.n_new
        first = self.valid.shape[-1] == 0
        self.valid = self.key_valid(valid_new)
        pos_new = torch.where(valid_new, pos_new, torch.full_like(pos_new, -1))
        self.pos = torch.cat([self.pos, pos_new[:, None, :].expand(B, H, q)], dim=-1)
        self.score = torch.cat([self.score, self.score.new_zeros(B, H, q)], dim=-1)
        if colsums is not None:
            self.score = self.score + colsums.to(torch.float32)
        if first:
            self.rule.resolve(q)
        current = self.pos.amax(dim=-1, keepdim=True)
        self.valid = self.valid & self.rule.attendable(self.pos, current)
        budget = self.rule.budget
        if budget is not None and len(self) > budget:
            pri = self.rule.priority(self.score, self.pos, self.valid, current)
            keep = pri.topk(budget, dim=-1).indices.sort(dim=-1).values  # chronological order
            self.keys = self.keys.gather(2, keep[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, keep[..., None].expand(-1, -1, -1, self.values.shape[-1]))
            self.valid = self.valid.gather(2, keep)
            self.pos = self.pos.gather(2, keep)
            self.score = self.score.gather(2, keep)
        self.n_new = 0

    def kept_positions(self) -> list[list[list[int]]]:
        """Per row and head, the absolute positions of the kept real tokens (for tests and inspection)."""
        out = []
        for b in range(self.pos.shape[0]):
            out.append([sorted(self.pos[b, h][self.valid[b, h]].tolist()) for h in range(self.pos.shape[1])])
        return out
