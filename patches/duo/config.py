"""The recipe block `method: {name: duo, ...}` and its `haystack:` training data."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from headwise.data_builders.passkey import Filler, KeyFormat, LabelSpan
from headwise.patches.base import Section
from pydantic import Field, model_validator


class DuoHaystack(Section):
    """Multi-passkey haystacks the gates are trained on (`headwise.data_builders.build_duo_training_set`)."""

    num_samples: int = Field(200, gt=0, description="Training haystacks built (one per step at batch 1).")
    min_tokens: int = Field(1024, gt=0, description="Shortest haystack in tokens (lengths are drawn uniformly).")
    max_tokens: int = Field(2048, gt=0, description="Longest haystack in tokens.")
    n_keys: int = Field(10, ge=1, le=16, description="Passkeys per haystack (DuoAttention: 10).")
    key_format: KeyFormat = Field(
        "words", description="`words`: NATO-alphabet words (DuoAttention's format); `digits5`: 5-digit numbers."
    )
    words_per_key: int = Field(6, ge=1, description="Words per key (DuoAttention uses 32; 6 suits small models).")
    filler: Filler = Field("corpus", description="Haystack text: the corpus train split, or repeated sentences.")
    label_span: LabelSpan = Field(
        "qa_tail",
        description="Positions the distillation loss covers: the whole question/answer tail (DuoAttention), the answer "
        "tokens, or the positions that predict them (each answer one token earlier: includes the last question token, "
        "whose state picks the answer's first token).",
    )

    @model_validator(mode="after")
    def _range(self) -> "DuoHaystack":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class DuoMethod(Section):
    """Recipe block `method: {name: duo, ...}`."""

    default_learning_rate: ClassVar[float | None] = 0.02  # DuoAttention's AdamW rate for its gates (O(1) scalars)

    name: Literal["duo"] = Field("duo", description="`duo`: DuoAttention retrieval/streaming head gates (only the gates train).")
    sink: int = Field(128, ge=0, description="Sink tokens of the streaming attention (DuoAttention: 128).")
    recent: int = Field(256, ge=1, description="Recent tokens of the streaming attention, the current one included (DuoAttention: 256).")
    gate_lambda: float = Field(0.05, ge=0, description="Weight of the L1 term `mean(|gate|)` that pushes gates toward streaming.")
    initial_gate: float = Field(1.0, ge=0, le=1, description="Initial value of every gate (1: start as full attention).")
    streaming_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of (layer, KV head) pairs exported as streaming heads (ties broken by layer, then head)."
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Binarise at a gate threshold instead (gate < threshold: streaming); overrides streaming_fraction."
    )
    average_last: float = Field(
        0.0, ge=0, le=1,
        description="Export the mean of the gates logged over this last fraction of training instead of their final "
        "values (0: final values, as DuoAttention). Near-zero gates end in an order set by the last steps' noise; the "
        "mean ranks them by the whole window (measured on SmolLM2 over three seeds: no gain).",
    )
    haystack: DuoHaystack = Field(default_factory=DuoHaystack, description="The synthetic passkey training data.")

    def check_recipe(self, recipe: Any) -> None:
        """Rules across sections (called by the recipe's validation): `average_last` needs at least two
        logged gate snapshots in its window."""
        steps, every = recipe.training.max_steps, recipe.training.logging_steps
        if self.average_last > 0 and steps > 0 and (self.average_last * steps) // every < 2:
            raise ValueError(
                f"method.average_last ({self.average_last}) averages the gates logged over the last "
                f"{self.average_last * steps:g} of {steps} steps, but training.logging_steps ({every}) logs fewer "
                "than 2 there; lower training.logging_steps or raise method.average_last"
            )
