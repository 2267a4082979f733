"""The recipe block `method: {name: sinklora, ...}`."""

from __future__ import annotations

from typing import Literal

from headwise.patches.base import Section
from pydantic import Field, model_validator


class SinkLoRAMethod(Section):
    """Recipe block `method: {name: sinklora, ...}`."""

    name: Literal["sinklora"] = Field("sinklora", description="`sinklora`: shifted-group sparse attention + sink tokens (SF-Attn).")
    group_ratio: float = Field(0.25, gt=0, le=1, description="Group length as a fraction of the training length (LongLoRA: 1/4).")
    group_size: int | None = Field(None, gt=1, description="Fixed group length in tokens (even); overrides group_ratio.")
    sinks: int = Field(4, ge=0, description="Leading tokens visible to every query; 0 is LongLoRA's S2-Attn.")
    shifted_heads: Literal["upper_half", "none"] = Field(
        "upper_half", description="Heads whose groups are shifted by half a group (no wrap-around)."
    )
    train_embeddings_and_norms: bool = Field(
        True, description="LongLoRA's LoRA+: also train the embeddings and all norms (saved with the adapter)."
    )

    @model_validator(mode="after")
    def _even_group(self) -> "SinkLoRAMethod":
        if self.group_size is not None and self.group_size % 2:
            raise ValueError(f"group_size must be even (shifted heads move by G/2), got {self.group_size}")
        return self
