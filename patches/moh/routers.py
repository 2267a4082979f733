"""The three MoH routers: which heads each token uses, and with what weight.

Every router returns per-token gates `(B, T, Hq)` that multiply the head outputs before `o_proj`, the router's
softmax over the routed units `probs (B, T, R)` and the top-k choice `chosen (B, T, R)`, where a unit is a query
head (`query_norm`, `learned`) or a KV group (`kv_group`). Shared units (the first `n_shared`) always gate 1.

Which reading of paper and code each follows (research dossier, moh_s2.md §1.2, §1.3, §1.5):

- `query_norm` follows the released MoH-LLaMA3 code, not the paper: a routed head's logit is the L2 norm of its
  query divided by the standard deviation of those norms across the routed heads (a per-token temperature),
  softmax, top-k, and a binary gate whose gradient goes to the softmax (straight-through) through the chosen
  units only: the released code has no training loop, and an unchosen head's gradient would need that head's
  output, the very compute the skipping path (attention.py) does not do; as in top-k expert routing, the softmax
  still passes it on to every routed unit's logit, and the balance loss reaches all of them. The code reads the
  query before RoPE; RoPE rotates each pair of dims, so the norm of the post-RoPE query the attention function
  receives is the same. No new weights: the converted model starts from the dense one with the unselected heads
  dropped. We follow the code because it is what the authors continue-tuned LLaMA3-8B with (their issue #6: a
  randomly initialised router moved the layer's outputs too far for a 3% token budget).
- `learned` follows the paper's two-stage routing with the released ViT/DiT code's scaling (the code wins where
  they differ): routed weights are the softmax renormalised over the k chosen heads and multiplied by k, shared
  weights the shared softmax times the shared count, and the balance pair times 2, so that zero router logits
  (our initialisation) give every active head the weight 1: the dense sum over the active heads.
- `kv_group` is our own: the `query_norm` rule on whole GQA groups (a group's logit is the norm of its query
  heads' concatenated queries), so a token that skips a group needs neither its query rows nor, at decode, its
  K/V reads.
"""

from __future__ import annotations

import torch

from headwise.patches.moh.config import HeadSplit, MoHMethod, head_split


def moh_gates(cfg: MoHMethod, query: torch.Tensor, router_logits: tuple[torch.Tensor, ...] | None = None, *,
              n_kv_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gates `(B, T, Hq)` (fp32, or the inputs' wider dtype), probs `(B, T, R)` and chosen `(B, T, R)` bool for `query (B, Hq, T, D)`.

    `router_logits` (`learned` only): `(W_s x (B, T, n_shared), W_r x (B, T, R), W_h x (B, T, 2))` of the hidden
    state. `n_kv_heads` is needed by `kv_group` (default: as many as query heads)."""
    b, hq, t, _ = query.shape
    split = head_split(cfg, hq, n_kv_heads or hq)
    if cfg.router == "learned":
        if router_logits is None:
            raise ValueError("the learned router needs router_logits (W_s x, W_r x, W_h x)")
        unit_gates, probs, chosen = _learned(split, *router_logits)
    else:
        unit_gates, probs, chosen = _by_query_norm(split, query)
    return unit_gates.repeat_interleave(split.group, dim=-1), probs, chosen


def _top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    if k > 0:
        chosen.scatter_(-1, probs.topk(k, dim=-1).indices, True)
    return chosen


def _by_query_norm(split: HeadSplit, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, t, d = query.shape
    # (B, T, routed units): the norm of each routed unit's query (a KV group's: of its heads' queries concatenated),
    # accumulated in fp32 or the model's wider dtype without a widened copy of the queries; shared units need none
    routed_query = query[:, split.n_shared * split.group:].view(b, split.n_routed, split.group, t, d)
    acc = torch.promote_types(query.dtype, torch.float32)
    routed = torch.linalg.vector_norm(routed_query, dim=(2, 4), dtype=acc).transpose(1, 2)
    # Dividing by the spread makes the logits scale-free; with exactly two routed units they become +-1/sqrt(2)
    # whatever the norms, so the softmax (and the straight-through gradient) is then constant. The mean is taken
    # off first: the softmax does not change (it ignores a shift), but the logits stay bounded by sqrt(R - 1), and
    # tied norms (bf16 queries make exact ties common with few units) give 0 / 0 -> uniform, not inf / inf -> NaN.
    if split.n_routed > 1:
        spread = routed.std(dim=-1, keepdim=True).clamp_min(torch.finfo(routed.dtype).tiny)
        routed = (routed - routed.mean(dim=-1, keepdim=True)) / spread
    probs = torch.softmax(routed, dim=-1)
    chosen = _top_k(probs, split.k)
    # Exactly 0/1 forward; backward, the chosen units' gates pass their gradient to the softmax (see the docstring)
    routed_gates = chosen.to(probs.dtype) * (1 + (probs - probs.detach()))
    shared = routed.new_ones(b, t, split.n_shared)
    return torch.cat([shared, routed_gates], dim=-1), probs, chosen


def _learned(split: HeadSplit, shared_logits: torch.Tensor, routed_logits: torch.Tensor,
             balance_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = torch.promote_types(routed_logits.dtype, torch.float32)
    probs = torch.softmax(routed_logits.to(acc), dim=-1)
    chosen = _top_k(probs, split.k)
    kept = probs * chosen
    routed = split.k * kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    shared = split.n_shared * torch.softmax(shared_logits.to(acc), dim=-1)
    if split.n_shared and split.k:
        pair = 2 * torch.softmax(balance_logits.to(acc), dim=-1)
        shared, routed = shared * pair[..., :1], routed * pair[..., 1:]
    return torch.cat([shared, routed], dim=-1), probs, chosen


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch-style load balance over the routed units, the released MoH code's form: `R * sum_i P_i f_i` with
    `P_i` the mean router probability of unit `i` over the tokens and `f_i` the share of tokens that chose it
    (`sum_i f_i = k`). Uniform routing gives `k`; its gradient pushes probability off over-used units."""
    r = probs.shape[-1]
    if r == 0:
        return probs.new_zeros(())
    p = probs.reshape(-1, r).mean(dim=0)
    f = chosen.reshape(-1, r).to(probs.dtype).mean(dim=0)
    return r * (p * f).sum()


class MoHRouter(torch.nn.Module):
    """The `learned` router of one layer: `W_s`, `W_r`, `W_h` (no bias) on the hidden state, zero-initialised so
    a converted model starts as the dense sum over its active heads."""

    def __init__(self, hidden_size: int, split: HeadSplit, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.shared = torch.nn.Linear(hidden_size, split.n_shared, **kw)
        self.routed = torch.nn.Linear(hidden_size, split.n_routed, **kw)
        self.balance = torch.nn.Linear(hidden_size, 2, **kw)
        for linear in (self.shared, self.routed, self.balance):
            torch.nn.init.zeros_(linear.weight)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (B, T, d) -> the three logits `moh_gates` takes."""
        return self.shared(hidden), self.routed(hidden), self.balance(hidden)
