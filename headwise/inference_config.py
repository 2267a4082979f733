"""`headwise_inference.json`: what an export needs at inference, versioned.

Every export folder holds one. It says which weights the folder holds (a PEFT adapter on a named
base model, or merged weights), which attention the model runs at inference (`full` today; MoH
routing and S2 layouts join when those methods land) and which KV-cache policy generation uses.
`headwise.load` reads it; `format_version` lets later releases read old exports.

The KV policy is a discriminated union on `type`; each policy is its own model so a new policy is a
new class plus an entry in `KVPolicy`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headwise.errors import HeadwiseError

INFERENCE_CONFIG_NAME = "headwise_inference.json"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FullPolicy(_Strict):
    """Keep every token of every head (plain transformers `DynamicCache`)."""

    type: Literal["full"] = "full"


KVPolicy = Annotated[Union[FullPolicy], Field(discriminator="type")]


class FullAttention(_Strict):
    """Dense attention at inference (SDPA)."""

    name: Literal["full"] = "full"


AttentionSpec = Annotated[Union[FullAttention], Field(discriminator="name")]


class BaseModelRef(_Strict):
    name: str = Field(description="Hub id, local path or headwise alias of the base model.")
    gguf_file: str | None = None
    revision: str | None = None


class InferenceConfig(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    headwise_version: str
    method: str = Field(description="The training method that produced the export (`full`, `sinklora`, ...).")
    weights: Literal["adapter", "merged"]
    base_model: BaseModelRef
    rope_parameters: dict[str, Any] | None = Field(
        None, description="RoPE parameters the model was trained with (context extension); applied on load."
    )
    max_position_embeddings: int | None = None
    attention: AttentionSpec = Field(default_factory=FullAttention)
    kv_policy: KVPolicy = Field(default_factory=FullPolicy)
    extra_modules: dict[str, Any] = Field(
        default_factory=dict, description="Method modules to re-attach before loading an adapter (routers, gates)."
    )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / INFERENCE_CONFIG_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> "InferenceConfig":
        """Read and validate `directory/headwise_inference.json`; errors name the file and the field."""
        path = Path(directory) / INFERENCE_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: {directory} is not a headwise export (run `headwise export RUN_DIR` first)"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HeadwiseError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); re-run `headwise export`") from e
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise HeadwiseError(
                f"{path}: format_version {version!r} is not supported by this headwise (reads {FORMAT_VERSION}); "
                "upgrade headwise or re-export"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise HeadwiseError(f"{path}: {problems}") from e
