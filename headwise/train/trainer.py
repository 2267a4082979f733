"""Train a recipe: the one function behind `headwise train` (and `accelerate launch -m headwise train`).

Order matters and is chosen so that every cheap check runs before anything expensive:
recipe validated (a DeepSpeed JSON file read) -> model config read and checked by the method -> data
sources checked -> bf16, report_to trackers and the DeepSpeed launcher checked -> run directory
checked and locked (resume point found; a second run on it is refused here) -> tokenizer -> RNG
seeded -> model weights -> method patch -> PEFT wrap -> resume checkpoint checked against the
adapter's tensor names and shapes -> RNG seeded again -> data built ->
Trainer (HF `Trainer`, or TRL `SFTTrainer` for chat data) -> final adapter saved and verified
non-empty (the ZeRO-3 empty-adapter trap) -> run summary -> run lock released. A run that fails
before writing anything besides its recipe.yaml leaves the run folder as it found it
(`headwise.train.run_dir.claim_run_dir`).

`training.seed` is set before the model is built (the Trainer seeds only after the PEFT wrap, too
late for the adapters' initial weights) and again before the data is built (so the data does not
depend on how many random numbers the method's modules drew).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headwise.errors import HeadwiseError
from headwise.models import (
    check_attention_implementation,
    check_training_length,
    load_config,
    load_model,
    load_tokenizer,
)
from headwise.inference.cache import check_config_supported
from headwise.patches.base import Method, method_for
from headwise.patches.model_attention import attention_facts
from headwise.publish.export_target import match_umask_permissions
from headwise.recipe.loader import LoadedRecipe
from headwise.recipe.schema import DEEPSPEED_PRESETS, Recipe
from headwise.train.data import build_training_data, check_data_sources
from headwise.train.fused_lora import fuse_lora_forward
from headwise.train.fused_ops import apply_liger_kernels, check_liger_kernels
from headwise.train.losses import resolve_fused_loss
from headwise.train.run_dir import (
    FINAL_DIR,
    SUMMARY_FILE,
    claim_run_dir,
    confirm_resume_checkpoint,
    is_main_process,
)

logger = logging.getLogger(__name__)


def deepspeed_config_path(value: str | None) -> str | None:
    """A recipe's `deepspeed` (preset name or JSON path) as a JSON path."""
    if value is None:
        return None
    if value in DEEPSPEED_PRESETS:
        from importlib import resources

        return str(resources.files("headwise.ds_configs") / f"{value}.json")
    return value


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class MethodLossMixin:
    """Adds a method's extra loss (or its replacement loss) and the optional fused (logit-free) LM loss to a Trainer,
    and the method callbacks' entries to its training logs."""

    method: Method
    fused_loss: Any = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_loss is not None:
            # Ask the model for the final hidden states and a (B, 0, V) logits tensor; the loss
            # function projects chunk by chunk (see headwise.train.losses).
            inputs = {**inputs, "output_hidden_states": True, "logits_to_keep": torch.empty(0, dtype=torch.long)}
        replaced = self.method.compute_loss(model, inputs)
        if replaced is not None:
            # A per-micro-batch mean: scale for accumulation unless the Trainer believes the loss is
            # already normalised by num_items_in_batch (then it does not divide; see Trainer.training_step).
            loss, outputs = replaced
            if self._loss_scaled_for_accumulation(num_items_in_batch) and model.training:
                loss = loss / self.current_gradient_accumulation_steps
            return (loss, outputs) if return_outputs else loss
        if type(self.method).extra_loss is Method.extra_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        extras: list[torch.Tensor] = []
        handle = self.accelerator.unwrap_model(model).register_forward_hook(
            self._extra_loss_hook(inputs, extras), with_kwargs=True)
        try:
            # Outputs only when the caller wants them: TRL's SFTTrainer recomputes the logits with an
            # extra forward pass when asked for them.
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        if extras:
            extra = torch.stack([e.to(loss.dtype) for e in extras]).sum()
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                # The LM loss is a share of the accumulated batch's mean and the Trainer will not divide: the
                # extra loss, a per-micro-batch mean, takes its share of the mean over the micro-batches.
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _extra_loss_hook(self, inputs: dict[str, Any], extras: list[torch.Tensor]):
        """A forward hook for the model: the method's extra loss of each forward that builds the training loss.

        The extra loss is taken right after such a forward, while the method's per-forward records (MoH's
        per-layer balance losses) are this forward's: TRL's SFTTrainer runs a second, no-grad forward for
        its metrics (and one more for the logits), which replaces the records with graph-less copies. So
        only training forwards with gradients enabled count; eval and metric forwards add nothing."""

        def hook(module, args, kwargs, outputs):
            if module.training and torch.is_grad_enabled():
                extra = self.method.extra_loss(module, inputs, outputs)
                if extra is not None:
                    extras.append(extra)

        return hook

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the method callbacks' entries (`training_log_values(args, state)`, e.g. MoH's per-layer balance
        loss) to a training log step's logs, before the Trainer records them: a callback's `on_log` comes after
        the log history is written and after the trackers' callbacks have sent the logs."""
        if "loss" in logs:  # a training log step; eval logs carry eval_loss, the closing log train_loss
            for callback in self.callback_handler.callbacks:
                values = getattr(callback, "training_log_values", None)
                if values is not None:
                    logs.update(values(self.args, self.state))
        super().log(logs, *args, **kwargs)

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer takes compute_loss's loss as already scaled for gradient accumulation (it
        then does not divide it by the accumulation steps): `Trainer.training_step`'s rule."""
        declared = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.19
        if declared is not None:
            return declared
        return (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(self, "compute_loss_func", None) is not None
        )


def _make_fused_loss_func(fn, model):
    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        head = model.get_output_embeddings()
        return fn(outputs.hidden_states[-1], head, labels, num_items_in_batch=num_items_in_batch)

    return compute_loss_func


def _matches(name: str, suffixes: list[str]) -> bool:
    # PEFT's rule for modules_to_save (suffix match); for target_modules it also matches on the full name.
    return any(name == w or name.endswith("." + w) for w in suffixes)


FUSED_QKV_TARGETS = ["qkv_proj", "o_proj"]


def lora_targets(model: torch.nn.Module, recipe: Recipe) -> list[str] | str:
    """`peft.target_modules`; left at its default on a family that fuses q/k/v into one `qkv_proj` (Phi-3), the
    default's counterpart there, `qkv_proj` and `o_proj` (the default names modules such a model does not have)."""
    if "target_modules" not in recipe.peft.model_fields_set and attention_facts(model.config, model).projections == "fused":
        return FUSED_QKV_TARGETS
    return recipe.peft.target_modules


def check_module_names(model: torch.nn.Module, recipe: Recipe, method: Method) -> None:
    """Every name in peft.target_modules / peft.trainable_modules must match a module of the model.

    Runs on a meta-device copy built from the config before the weights load, so a typo costs
    nothing.
    """
    names = [n for n, _ in model.named_modules() if n]
    wanted = {
        "peft.trainable_modules": recipe.peft.trainable_modules + method.modules_to_save(),
        "peft.target_modules": lora_targets(model, recipe) if recipe.peft.type == "lora" else [],
    }
    for field_name, suffixes in wanted.items():
        if suffixes == "all-linear":
            continue
        missing = [w for w in suffixes if not any(_matches(n, [w]) for n in names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise HeadwiseError(
                f"{field_name}: {missing} match no module of this model; its module names end in {leaves}"
            )


def check_exported_kv_policy(model_config: Any, recipe: Recipe, method: Method) -> None:
    """The KV policy the export will write must run on this model: a run whose export `headwise.load` would refuse
    is refused now, before training."""
    exported = method.exported_kv_policy()
    if exported is not None:
        check_config_supported(model_config, exported, f"method {method.name} exports a {exported} KV policy, whose "
                               "caches cannot serve this model: train it with another method")
    else:
        check_config_supported(model_config, recipe.export.kv_policy.type, "set export.kv_policy: full")


def meta_model(model_config) -> torch.nn.Module:
    """The model's module tree without weights (device `meta`): for name checks before loading."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def wrap_peft(model: torch.nn.Module, recipe: Recipe, method: Method) -> torch.nn.Module:
    """LoRA (or plain full training of the listed modules), with the method's extra trainables saved."""
    peft_cfg = recipe.peft
    save = list(dict.fromkeys(peft_cfg.trainable_modules + method.modules_to_save()))
    if peft_cfg.type == "none":
        for p in model.parameters():
            p.requires_grad_(False)
        for n, m in model.named_modules():
            if _matches(n, save):
                for p in m.parameters():
                    p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    extra = {}
    if save and getattr(model.config, "tie_word_embeddings", False):
        # A trained copy of embed_tokens must stay tied to lm_head (SmolLM2 ties them); without
        # this PEFT trains the input embedding while the output head keeps the frozen original.
        extra["ensure_weight_tying"] = True
    lora = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=lora_targets(model, recipe),
        modules_to_save=save or None,
        task_type="CAUSAL_LM",
        **extra,
    )
    model = get_peft_model(model, lora)
    if peft_cfg.fused_forward:
        fuse_lora_forward(model)
    return model


def build_training_model(recipe: Recipe, method: Method, model_config: Any | None = None) -> torch.nn.Module:
    """The model as training starts (step 0): weights loaded, the method's patch and modules added,
    PEFT-wrapped, exactly as `train` builds it.

    The RNG is seeded from `training.seed` first, so the initial weights of the adapters and of the
    method's new modules follow from the seed alone."""
    from transformers import set_seed

    set_seed(recipe.training.seed)
    if model_config is None:
        model_config = load_config(recipe.model)
    model = load_model(recipe.model, training=True, config=model_config)
    method.prepare_model(model)
    if recipe.training.liger_kernels:
        apply_liger_kernels(model)
    return wrap_peft(model, recipe, method)


def log_at_checkpoints_callback() -> Any:
    """A TrainerCallback that logs the loss at every checkpoint and at the last step, besides every
    `logging_steps`.

    Each logged loss is the mean since the previous log, and a resumed run restarts from the log
    history saved in its checkpoint: with a log at each checkpoint that history covers every step
    up to it, so the whole-run mean (`mean_logged_loss`) misses no step and counts none twice."""
    from transformers import TrainerCallback

    class LogAtCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or control.should_training_stop:
                control.should_log = True
            return control

    return LogAtCheckpoints()


def readable_checkpoints_callback() -> Any:
    """A TrainerCallback giving each checkpoint the permissions of a plain mkdir / file write under the
    umask: safetensors creates owner-only files, which other users of a shared machine cannot read."""
    from transformers import TrainerCallback

    class ReadableCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    match_umask_permissions(checkpoint)
            return control

    return ReadableCheckpoints()


def mean_logged_loss(log_history: list[dict[str, Any]], after_step: int = 0) -> float | None:
    """The mean training loss over the steps after `after_step`, from a Trainer's log history.

    A logged `loss` is the mean over the steps since the previous log, so each weighs as many steps
    as it covers; None when no loss was logged after `after_step`."""
    logged = sorted((e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e)
    total, steps, previous = 0.0, 0, 0
    for step, loss in logged:
        start, previous = max(previous, after_step), step
        if step > start:
            total += loss * (step - start)
            steps += step - start
    return total / steps if steps else None


def resolve_bf16(recipe: Recipe) -> bool:
    """`training.bf16`, defaulted from the GPU; HeadwiseError when it is true without a CUDA GPU."""
    cuda = torch.cuda.is_available()
    bf16 = recipe.training.bf16
    if bf16 is None:
        return cuda and torch.cuda.is_bf16_supported()
    if bf16 and not cuda:
        raise HeadwiseError("training.bf16 is true but no CUDA GPU is visible; set training.bf16=false (or leave it "
                            "unset) on CPU")
    return bf16


def check_report_to(names: list[str]) -> None:
    """Each `training.report_to` name must be a tracker transformers integrates, and installed.

    Checked against transformers' integration table and its availability probes (which look for the
    package without importing it), so a typo or a missing tracker is one message before the model
    loads, not a ValueError or RuntimeError from inside the Trainer."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    known = sorted(INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in known and n not in ("all", "none")]
    if unknown:
        raise HeadwiseError(
            f"training.report_to: {unknown} {'is' if len(unknown) == 1 else 'are'} not a tracker transformers knows; "
            f"use names from {known} (or [] for none)"
        )
    available = set(get_available_reporting_integrations())
    missing = [n for n in names if n in known and n not in available]
    if missing:
        raise HeadwiseError(
            f"training.report_to: {missing} {'is' if len(missing) == 1 else 'are'} not installed; install "
            f"{'it' if len(missing) == 1 else 'them'} (e.g. `pip install {' '.join(missing)}`) or remove "
            f"{'it' if len(missing) == 1 else 'them'} from training.report_to"
        )


def check_deepspeed_launch(recipe: Recipe) -> None:
    """A DeepSpeed run needs a launcher: started plainly, DeepSpeed falls back to MPI discovery and
    fails on a missing mpi4py deep inside the Trainer."""
    if recipe.deepspeed is None or "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return
    raise HeadwiseError(
        f"deepspeed: {recipe.deepspeed!r} needs a distributed launcher, and this process was started without one "
        "(no WORLD_SIZE or LOCAL_RANK set); run `accelerate launch --num_processes N -m headwise train RECIPE ...`, "
        "or remove `deepspeed` from the recipe to train in this process"
    )


def training_arguments(recipe: Recipe, *, sft: bool) -> Any:
    """TrainingArguments (or TRL's SFTConfig for chat data) from the recipe's `training` section."""
    t = recipe.training
    cuda = torch.cuda.is_available()
    bf16 = resolve_bf16(recipe)
    kwargs: dict[str, Any] = dict(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without enable_input_require_grads.
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to or "none",
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,  # position_ids must reach the model (packed samples)
        deepspeed=deepspeed_config_path(recipe.deepspeed),
    )
    from transformers import TrainingArguments

    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        # transformers >= 5.24 renamed these (the old names warn); 5.17 only knows the old ones.
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    if not cuda and _world_size() > 1:
        kwargs["ddp_backend"] = "gloo"  # DeepSpeed/DDP on CPU (accelerate picks no backend otherwise)
    if not sft:
        return TrainingArguments(**kwargs)
    from trl import SFTConfig

    kwargs.pop("remove_unused_columns")
    return SFTConfig(
        **kwargs,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        completion_only_loss=True,
    )


def build_trainer(recipe: Recipe, model, tokenizer, method: Method, train_dataset, collator, resume: Path | None):
    sft = recipe.data.builder == "sft"
    args = training_arguments(recipe, sft=sft)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    fused = resolve_fused_loss(recipe.training.fused_cross_entropy, device_type)
    callbacks = [
        *method.callbacks(str(recipe.run_dir())), log_at_checkpoints_callback(), readable_checkpoints_callback()
    ]
    common = dict(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks)
    if fused is not None:
        common["compute_loss_func"] = _make_fused_loss_func(fused, model)
    if sft:
        from trl import SFTTrainer

        cls = type("HeadwiseSFTTrainer", (MethodLossMixin, SFTTrainer), {})
    else:
        from transformers import Trainer

        cls = type("HeadwiseTrainer", (MethodLossMixin, Trainer), {})
        common["data_collator"] = collator
    trainer = cls(**common)
    trainer.method = method
    trainer.fused_loss = fused
    return trainer


def verify_saved_weights(directory: Path) -> int:
    """Count the tensors saved in `directory`; raise when any is empty (ZeRO-3 saves empty shards if not gathered)."""
    from safetensors import safe_open

    files = list(directory.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{directory} holds no *.safetensors weights after training")
    count = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                if 0 in shape:
                    raise RuntimeError(f"{f}: tensor {name} is empty {shape}; with ZeRO-3 set stage3_gather_16bit_weights_on_model_save")
                count += 1
    return count


@dataclass
class TrainResult:
    final_dir: Path  # the saved adapter (or weights) and tokenizer
    model: Any  # the trained model in memory (PEFT-wrapped)
    tokenizer: Any
    trainer: Any


def train(loaded: LoadedRecipe) -> TrainResult:
    """Run the recipe: returns where the final adapter/weights were saved, and the trained model."""
    recipe = loaded.recipe
    method = method_for(recipe.method)
    # Cheap checks first: a bad model name, an unsupported architecture, a module typo or a missing
    # data file fails here, before the run directory is touched or any weights are read.
    model_config = load_config(recipe.model)
    check_training_length(model_config, recipe.model, recipe.data.max_length)
    method.check_model_config(model_config)
    check_exported_kv_policy(model_config, recipe, method)
    check_attention_implementation(model_config, recipe.model)
    skeleton = meta_model(model_config)
    with torch.device("meta"):
        method.prepare_model(skeleton)  # the method's extra modules count as names too
    check_module_names(skeleton, recipe, method)
    check_data_sources(recipe.data)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    resolve_fused_loss(recipe.training.fused_cross_entropy, device_type)  # raises now, not after the weights load
    if recipe.training.liger_kernels:
        check_liger_kernels(model_config.model_type, device_type)
    resolve_bf16(recipe)
    check_report_to(recipe.training.report_to)
    check_deepspeed_launch(recipe)
    with claim_run_dir(recipe, recipe.model_dump(mode="json"), loaded.resolved_yaml()) as resume:
        return _train_claimed(recipe, method, model_config, resume)


def _train_claimed(recipe: Recipe, method: Method, model_config: Any, resume: Path | None) -> TrainResult:
    """The expensive part of `train`, run while the run directory is locked."""
    from transformers import set_seed

    t0 = time.time()
    tokenizer = load_tokenizer(recipe.model)
    model = build_training_model(recipe, method, model_config)
    if is_main_process() and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    resume = confirm_resume_checkpoint(recipe, resume, saved_adapter_tensors(recipe, model))
    set_seed(recipe.training.seed)  # again: the data must not depend on what the model build drew
    own_data = method.training_data(recipe, tokenizer)
    train_dataset, collator = own_data if own_data is not None else build_training_data(recipe, tokenizer)

    trainer = build_trainer(recipe, model, tokenizer, method, train_dataset, collator, resume)
    if resume is not None and is_main_process():
        logger.warning("resuming from %s", resume)
    # Read now: checkpoint rotation may delete the resumed checkpoint during training.
    resumed_at = _checkpoint_step(resume) if resume else None
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    final = recipe.run_dir() / FINAL_DIR
    trainer.save_model(str(final))
    if is_main_process():
        tokenizer.save_pretrained(str(final))
        match_umask_permissions(final)
        n_tensors = verify_saved_weights(final)
        history = trainer.state.log_history
        after_resume = mean_logged_loss(history, after_step=resumed_at) if resumed_at is not None else None
        summary = {
            "global_step": trainer.state.global_step,
            "train_loss": mean_logged_loss(history),  # over the whole run, the steps before a resume too
            "train_loss_after_resume": after_resume,  # over the steps this process trained; None without a resume
            "log_history": history,
            "train_runtime_s": round(time.time() - t0, 1),
            "resumed_from": str(resume) if resume else None,
            "saved_tensors": n_tensors,
            "world_size": _world_size(),
            "versions": _versions(),
        }
        (recipe.run_dir() / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()  # no rank leaves while rank 0 still writes the run's files
    return TrainResult(final, trainer.model, tokenizer, trainer)


def saved_adapter_tensors(recipe: Recipe, model: torch.nn.Module) -> dict[str, tuple[int, ...]] | None:
    """The tensor names and shapes a checkpoint of this model's adapter holds in `adapter_model.safetensors`
    (PEFT's saved state dict, the adapter name stripped), to refuse a checkpoint of another adapter
    before the Trainer loads it (PEFT's loader ignores foreign tensors silently). None where the check
    does not apply: full training (no adapter) and DeepSpeed (it resumes from its own engine state)."""
    if recipe.peft.type != "lora" or recipe.deepspeed is not None:
        return None
    from peft.utils import get_peft_model_state_dict

    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}


def _checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def release_process_group() -> None:
    """End a distributed run cleanly: destroy the process group (call after `train`, whose last step
    already has every rank wait for rank 0's writes).

    Why: a rank that exits with the group alive tears its communication threads down at interpreter
    exit, while the other ranks may still use them. Twice, under heavy CPU load, the ZeRO-3 CPU launch
    test saw rank 1 abort at exit after a successful run ("terminate called without an active
    exception", exit -6), which fails the whole launch. That was never reproduced on demand, so this is
    the standard clean shutdown, not a proven cure. No-op outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("headwise", "torch", "transformers", "peft", "trl", "accelerate", "deepspeed"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
