"""The hook points through which a method plugs into the pipeline.

Data flows one way: recipe -> model -> `Method.prepare_model` (attention patch, extra trainables)
-> PEFT wrap (`modules_to_save` gets `Method.modules_to_save`) -> data (`Method.training_data`, else
the recipe's `data:` builder) -> trainer (`Method.compute_loss` replacing the LM loss, or
`Method.extra_loss` added to it; `Method.callbacks`) -> export (`Method.inference_attention`,
`Method.extra_modules`, `Method.export_weights`, `Method.export_artifacts`). A method is a
subclass registered under its recipe name; `full` (dense attention, LoRA) is the baseline and uses
every default.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from headwise.errors import HeadwiseError
from headwise.inference_config import AttentionSpec, FullAttention


class Method:
    """Default hooks: dense attention, nothing extra to train, save or log."""

    name: ClassVar[str] = "full"

    def __init__(self, config: Any) -> None:
        self.config = config

    def check_model_config(self, model_config: Any) -> None:
        """Raise a HeadwiseError naming the field when the patch cannot handle this model (before loading weights)."""

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Patch attention and attach extra trainable modules (before `get_peft_model`)."""

    def modules_to_save(self) -> list[str]:
        """Module-name suffixes PEFT must train and save besides the adapters."""
        return []

    def training_data(self, recipe: Any, tokenizer: Any) -> tuple[Any, Any] | None:
        """`(dataset, collator)` when the method brings its own training data (Duo's passkey haystacks), else None."""
        return None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any] | None:
        """`(loss, outputs)` replacing the language-model loss (e.g. Duo's distillation), or None (LM loss).

        The loss is a mean over this micro-batch; the trainer scales it for gradient accumulation.
        """
        return None

    def extra_loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        """A loss term added to the language-model loss (e.g. a load-balance loss), or None."""
        return None

    def callbacks(self, run_dir: str) -> list[Any]:
        """`transformers.TrainerCallback`s (logging of gates, plots)."""
        return []

    def inference_attention(self) -> AttentionSpec:
        return FullAttention()

    def extra_modules(self) -> dict[str, Any]:
        """What `headwise.load` must re-attach before loading an adapter (written to headwise_inference.json)."""
        return {}

    def export_weights(self) -> str | None:
        """`"base"` when the export holds no weights because the model is the unchanged base model
        (DuoAttention: only a head pattern is learned); None: the recipe's `export.format`."""
        return None

    def export_artifacts(self, weights_dir: Any, out_dir: Any) -> Any:
        """Write method files into the export folder; return a KV policy for headwise_inference.json, or None
        (the recipe's `export.kv_policy`). The method's config is the run's, with the export's overrides."""
        return None


METHODS: dict[str, type[Method]] = {"full": Method}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_for(config: Any) -> Method:
    """The hooks of the recipe's `method:` block."""
    try:
        return METHODS[config.name](config)
    except KeyError:
        raise HeadwiseError(f"method.name {config.name!r} has no implementation; known: {', '.join(METHODS)}") from None
