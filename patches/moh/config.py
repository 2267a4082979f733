"""The recipe block `method: {name: moh, ...}`: which heads are shared, how many are routed, which router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from headwise.patches.base import HeadwiseError, Section
from pydantic import Field, model_validator

Router = Literal["query_norm", "learned", "kv_group"]
Compute = Literal["gathered", "masking"]


class MoHMethod(Section):
    """Recipe block `method: {name: moh, ...}` (Mixture-of-Head attention, continue-tuned from a dense model)."""

    name: Literal["moh"] = Field("moh", description="`moh`: Mixture-of-Head attention (shared + routed heads).")
    router: Router = Field(
        "query_norm",
        description="`query_norm`: MoH-LLaMA3's parameter-free router (each routed head's query norm over the "
        "spread across routed heads, binary gates, straight-through gradient); `learned`: the paper's linear "
        "routers on the hidden state (shared, routed and balance weights, zero-initialised so the converted model "
        "starts as the dense sum); `kv_group`: query_norm over whole GQA groups, so a skipped group needs no K/V.",
    )
    activation: float = Field(0.75, gt=0, le=1, description="Share of the query heads active per token (shared + "
                              "routed); MoH-LLaMA3 uses 0.75.")
    shared: float = Field(0.5, ge=0, le=1, description="Share of the query heads always active (the first by "
                          "index); MoH-LLaMA3 uses 0.5.")
    balance_weight: float = Field(0.01, ge=0, description="Weight of the Switch-style load-balance loss on the "
                                  "routed heads, added to the language-model loss (MoH: 0.01).")
    compute: Compute = Field(
        "gathered", description="`gathered`: a routed head runs attention only for the query rows that chose it "
        "(headwise's gathered-query kernel) wherever that kernel applies: a GPU, or Triton's interpreter, and a "
        "causal mask without padding or packing (training, prefill); elsewhere the masking form runs. `masking`: "
        "always every head, the unchosen ones multiplied by zero (what the released MoH models compute). Both give "
        "the same outputs and gradients.")

    @model_validator(mode="after")
    def _shares(self) -> "MoHMethod":
        if self.shared > self.activation:
            raise ValueError(f"shared ({self.shared}) exceeds activation ({self.activation}): the shared heads are "
                             "part of the active ones")
        return self

    def check_recipe(self, recipe: Any) -> None:
        """Rules across sections (called by the recipe's validation): the export's KV policy must be `full`. The
        evicting caches (streaming, h2o, duo) are not built for MoH (they choose the tokens they keep over every
        head, also the ones the router leaves out): `headwise.load` would refuse the export, so the run is refused
        before it trains."""
        policy = recipe.export.kv_policy.type
        if policy != "full":
            raise ValueError(f"export.kv_policy {policy} with method moh: the evicting caches choose the tokens they "
                             "keep over every head, also the ones MoH's router leaves out, and are not built for moh; "
                             "set export.kv_policy: full")


@dataclass(frozen=True)
class HeadSplit:
    """How one model's heads split under a MoH config. Units are query heads, or KV groups for `kv_group`."""

    n_heads: int  # query heads
    group: int  # query heads per unit (1, or Hq // Hkv for kv_group)
    n_shared: int  # shared units (the first)
    k: int  # routed units chosen per token

    @property
    def n_units(self) -> int:
        return self.n_heads // self.group

    @property
    def n_routed(self) -> int:
        return self.n_units - self.n_shared


def head_split(cfg: MoHMethod, n_heads: int, n_kv_heads: int) -> HeadSplit:
    """The shared / routed split of `n_heads` query heads (or of the `n_kv_heads` groups for `kv_group`)."""
    group = n_heads // n_kv_heads if cfg.router == "kv_group" else 1
    units = n_heads // group
    n_shared = round(units * cfg.shared)
    active = round(units * cfg.activation)
    if active < 1:
        raise HeadwiseError(f"method moh: activation {cfg.activation} of {units} "
                            f"{'KV groups' if group > 1 else 'heads'} leaves none active")
    return HeadSplit(n_heads=n_heads, group=group, n_shared=n_shared, k=active - n_shared)
