"""The method contract, at the bottom of `headwise.patches`: `Method` (the hooks), the registry,
`Section` (the base of every recipe section) and `HeadwiseError`.

Data flows one way: recipe -> model -> `Method.prepare_model` (attention patch, extra trainables)
-> PEFT wrap (`modules_to_save` gets `Method.modules_to_save`) -> data (`Method.training_data`, else
the recipe's `data:` builder) -> trainer (`Method.compute_loss` replacing the LM loss, or
`Method.extra_loss` added to it; `Method.callbacks`) -> export (`Method.inference_attention`,
`Method.extra_modules`, `Method.export_weights`, `Method.export_artifacts`).

A method is one folder under `headwise/patches/` (its config, attention function and hooks) whose
`Method` subclass is decorated with `register_method`: the recipe schema builds its `method:` block
from this registry (`method_configs`), so nothing else needs editing. `full` (dense attention, LoRA)
is the baseline and uses every default.

What a method hands the core is plain data: its KV policy and inference attention are mappings
(`{"type": "duo", ...}`) that the core validates against `headwise_inference.json`'s schema, so this
floor never imports the core.
"""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class HeadwiseError(ValueError):
    """Bad input (recipe, file, model, option). The message names the field or file and the fix; the CLI
    prints it as one line (no traceback)."""


class Section(BaseModel):
    """The base of every recipe section. Unknown keys are errors; values are validated on assignment too.

    Types are strict: a number field refuses `true` and `"10"`, a boolean field refuses `"yes"` and
    `1` (pydantic's default would silently read them as 1, 10 and true). An int is still accepted
    where a float is expected. Recipe files are read with YAML 1.2 floats
    (`headwise.recipe.loader.RecipeYamlLoader`), so `2e-4` arrives as a float, not a string.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    # Read on a method's section only: the learning rate a recipe of this method trains at when it sets no
    # `training.learning_rate` (a method whose trainables are not LoRA matrices, such as Duo's O(1) gates, needs
    # another rate than the LoRA default); None keeps the training section's default.
    default_learning_rate: ClassVar[float | None] = None


def section_models(annotation: Any) -> list[type[BaseModel]]:
    """The section classes an annotation can hold, through Optional, Union and Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return section_models(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in section_models(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


class FullMethod(Section):
    """Dense attention: the baseline every other method is compared against."""

    name: Literal["full"] = Field("full", description="`full`: dense attention (the baseline).")


# The features of a model's attention beyond plain causal softmax attention (patches/model_attention.py).
ATTENTION_FEATURES = ("sliding_window", "softcap", "learned_sinks", "fused_projections")


class Method:
    """Default hooks: dense attention, nothing extra to train, save or log.

    Subclasses set `config_class`, their recipe section: a `Section` whose `name: Literal[...]` field is the
    recipe's `method.name`; `register_method` copies it to `name`.
    """

    name: ClassVar[str] = "full"
    config_class: ClassVar[type[Section]] = FullMethod
    # What of a model's own attention the method computes exactly (the keyword flags of
    # `AttentionFacts.unsupported`); a model using any other feature is refused. `full` is the model's own.
    attention_features: ClassVar[tuple[str, ...]] = ATTENTION_FEATURES

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

    def inference_attention(self, model_config: Any | None = None) -> dict[str, Any]:
        """The attention `headwise.load` runs, as the `attention` mapping of headwise_inference.json; with
        `model_config`, an entry may state what it implies for that model (MoH: its head split)."""
        return {"name": "full"}

    def extra_modules(self) -> dict[str, Any]:
        """What `headwise.load` must re-attach before loading an adapter (written to headwise_inference.json)."""
        return {}

    def export_weights(self) -> str | None:
        """`"base"` when the export holds no weights because the model is the unchanged base model
        (DuoAttention: only a head pattern is learned); None: the recipe's `export.format`."""
        return None

    def exported_kv_policy(self) -> str | None:
        """The type of the KV policy `export_artifacts` returns (checked against the model before training), or
        None when the export writes the recipe's `export.kv_policy`."""
        return None

    def export_artifacts(self, weights_dir: Any, out_dir: Any) -> dict[str, Any] | None:
        """Write method files into the export folder; return a KV policy mapping for headwise_inference.json
        (`{"type": ..., ...}`, validated by the core), or None (the recipe's `export.kv_policy`). The
        method's config is the run's, with the export's overrides."""
        return None


METHODS: dict[str, type[Method]] = {"full": Method}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` the implementation of its config's `method.name` in recipes. A method says
    which features of a model's own attention it computes (`attention_features`): inheriting `full`'s "all of
    them" by omission would make a new method silently wrong on the models it does not handle."""
    if "attention_features" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must declare attention_features (a subset of {ATTENTION_FEATURES})")
    unknown = set(cls.attention_features) - set(ATTENTION_FEATURES)
    if unknown:
        raise TypeError(f"{cls.__name__}.attention_features: unknown {sorted(unknown)}; known: {ATTENTION_FEATURES}")
    cls.name = cls.config_class.model_fields["name"].default
    METHODS[cls.name] = cls
    return cls


def method_configs() -> tuple[type[Section], ...]:
    """The config section of every registered method, in registration order (the recipe's `method:` union)."""
    return tuple(cls.config_class for cls in METHODS.values())


def method_for(config: Any) -> Method:
    """The hooks of the recipe's `method:` block."""
    try:
        return METHODS[config.name](config)
    except KeyError:
        raise HeadwiseError(f"method.name {config.name!r} has no implementation; known: {', '.join(METHODS)}") from None
