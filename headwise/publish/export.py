"""`headwise export RUN_DIR`: a Hub-ready folder from a finished (or checkpointed) run.

The folder holds either the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`),
merged full weights, or no weights at all (`weights: "base"`: methods such as DuoAttention that
leave the base model unchanged; the base model's config only), plus any method files (Duo: its
`duo_attention/` pattern folder), the tokenizer, `headwise_inference.json`, a model card (`README.md`)
and, written last, the list of those files (`headwise_export_manifest.json`). It is written to a
temporary sibling and swapped into place, so an interrupted export never leaves a half-written folder
and never loses the previous one. Where it may go is decided by `headwise.publish.export_target`: a new or
empty folder, or with `overwrite=True` a previous export holding nothing else; never the run folder,
a folder containing it, the working directory or the home folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import yaml

from headwise.errors import HeadwiseError
from headwise.inference.config import (
    ADAPTER_CONFIG_NAME,
    BaseModelRef,
    InferenceConfig,
    adapter_problem,
    parse_kv_policy,
)
from headwise.models import (
    NO_HUB_KERNELS,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from headwise.patches.base import method_for
from headwise.publish.export_target import (
    check_export_target,
    match_umask_permissions,
    move_into_place,
    new_sibling_dir,
    write_manifest,
)
from headwise.publish.model_card import write_model_card
from headwise.train.run_dir import (
    FINAL_DIR,
    SUMMARY_FILE,
    RunDirError,
    checkpoint_problem,
    read_run_recipe,
)
from headwise.version import __version__
from headwise.weight_files import weights_problem

logger = logging.getLogger(__name__)


class ExportError(HeadwiseError):
    pass


def _weights_dir(run_dir: Path, checkpoint: str | None) -> Path:
    if checkpoint:
        src = run_dir / checkpoint if not Path(checkpoint).is_absolute() else Path(checkpoint)
        problem = checkpoint_problem(src) if src.is_dir() else f"it does not exist; {_checkpoints_there(run_dir)}"
        if problem:
            raise ExportError(f"--checkpoint {checkpoint}: {problem}")
        return src
    final = run_dir / FINAL_DIR
    if not final.is_dir():
        raise ExportError(
            f"{final} does not exist: the run has not finished. Finish it (run the same `headwise train` command "
            "again: it resumes) or export a checkpoint with --checkpoint checkpoint-N"
        )
    problem = weights_problem(final)
    if problem:
        raise ExportError(
            f"{final}/{problem}: the run's final weights cannot be exported; train again (delete {final} first: the "
            "run resumes from its last checkpoint) or export a checkpoint with --checkpoint checkpoint-N"
        )
    return final


def _checkpoints_there(run_dir: Path) -> str:
    """The checkpoints of `run_dir` in words, for a --checkpoint that names none of them."""
    names = sorted((p.name for p in run_dir.glob("checkpoint-*") if p.is_dir()),
                   key=lambda n: int(n.rsplit("-", 1)[1]) if n.rsplit("-", 1)[1].isdigit() else -1)
    if not names:
        return f"{run_dir} holds no checkpoint-N folder"
    return f"the checkpoints in {run_dir} are {', '.join(names)}"


def build_inference_config(recipe, *, weights: str, kv_policy=None) -> InferenceConfig:
    method = method_for(recipe.method)
    config = load_config(recipe.model)
    rope = getattr(config, "rope_parameters", None) if recipe.model.rope_scaling else None
    return InferenceConfig(
        headwise_version=__version__,
        method=recipe.method.name,
        weights=weights,
        base_model=BaseModelRef(name=recipe.model.name, gguf_file=recipe.model.gguf_file, revision=recipe.model.revision),
        rope_parameters=dict(rope) if rope else None,
        max_position_embeddings=recipe.model.context_length,
        attention=method.inference_attention(model_config=config),
        # A method hands its policy over as data; validated here like a user's.
        kv_policy=(parse_kv_policy(kv_policy, field=f"method {recipe.method.name}: KV policy")
                   if kv_policy is not None else recipe.export.kv_policy),
        extra_modules=method.extra_modules(),
    )


def export_run(
    run_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    format: str | None = None,
    checkpoint: str | None = None,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Export a run directory; returns the export folder.

    `overrides` (`method.key=value`, `export.key=value`) change the run's recipe for this export only,
    e.g. `method.streaming_fraction=0.75` for a Duo run; the export's `headwise_recipe.yaml` records them.
    """
    run_dir = Path(run_dir)
    try:
        recipe = read_run_recipe(run_dir, overrides)
    except RunDirError as e:
        raise ExportError(str(e)) from e
    method = method_for(recipe.method)
    method.inference_attention()  # a method whose attention headwise.load cannot run yet refuses before any file
    fmt = format or recipe.export.format
    if fmt not in ("adapter", "merged"):
        raise ExportError(f"--format {fmt!r}: use `adapter` or `merged`")
    if method.export_weights() == "base":
        fmt = "base"  # e.g. DuoAttention: the weights are the unchanged base model, nothing to copy or merge
    if fmt == "adapter" and recipe.peft.type == "none":
        raise ExportError("this run trained without LoRA (peft.type none): export it with --format merged")
    src = _weights_dir(run_dir, checkpoint)
    if fmt in ("adapter", "merged") and (src / ADAPTER_CONFIG_NAME).is_file():
        problem = adapter_problem(src, load_config(recipe.model), prepare_model=method.prepare_model)
        if problem:
            raise ExportError(
                f"{problem}; the adapter cannot be exported. Export another checkpoint with --checkpoint checkpoint-N, "
                "or train again"
            )
    if out_dir:
        out, label = Path(out_dir), "--out"
    elif recipe.export.dir:
        out, label = Path(recipe.export.dir), "export.dir"
    else:
        out, label = run_dir / "export", "the default export folder"
    in_use = [("the run folder", run_dir), ("the folder of the weights being exported", src)]
    if Path(recipe.model.name).is_dir():
        in_use.append(("the folder of the run's base model", Path(recipe.model.name)))
    target = check_export_target(out, overwrite=overwrite, in_use=in_use, label=label)

    tmp = new_sibling_dir(target)
    try:
        tokenizer = load_tokenizer(recipe.model)
        if fmt == "adapter":
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if not (src / name).is_file():
                    raise ExportError(f"{src / name} is missing; the run did not save a PEFT adapter")
                shutil.copy2(src / name, tmp / name)
            _point_adapter_at_base(tmp / "adapter_config.json", recipe)
        elif fmt == "merged":
            _save_merged(recipe, src, tmp)
        else:  # base: the base model's config only (the weights load from base_model)
            load_config(recipe.model).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        policy = method.export_artifacts(src, tmp)
        inference = build_inference_config(recipe, weights=fmt, kv_policy=policy)
        inference.save(tmp)
        (tmp / "headwise_recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        write_model_card(tmp, recipe, inference, read_optional_json(run_dir / SUMMARY_FILE), run_dir=run_dir)
        write_manifest(tmp)
        match_umask_permissions(tmp)
        # Again: the folder may have gained files while the export was being built.
        check_export_target(out, overwrite=overwrite, in_use=in_use, label=label)
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_optional_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in an optional file beside a run (its training summary), {} when there is none, or None
    with a warning naming it when it cannot be read: a damaged summary costs the model card a section, not the
    export."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = str(e).splitlines()[0]
    else:
        if isinstance(data, dict):
            return data
        reason = f"it holds a {type(data).__name__}, not a JSON object"
    logger.warning("skipping %s: it is not readable (%s); the model card leaves out what it held", path, reason)
    return None


def _point_adapter_at_base(adapter_config: Path, recipe) -> None:
    """Record the base model's public id in the adapter config (not a path on the training machine)."""
    cfg = json.loads(adapter_config.read_text())
    src = resolve_model_source(recipe.model.name, recipe.model.gguf_file, recipe.model.revision)
    cfg["base_model_name_or_path"] = src.hub_id or recipe.model.name
    adapter_config.write_text(json.dumps(cfg, indent=2) + "\n")


def _save_merged(recipe, src: Path, dest: Path) -> None:
    from peft import PeftModel

    model = load_model(recipe.model, training=False)
    method = method_for(recipe.method)
    method.prepare_model(model)
    if (src / "adapter_config.json").is_file():
        try:
            model = PeftModel.from_pretrained(model, str(src))
        except (ValueError, KeyError, TypeError, OSError) as e:  # PEFT's errors for an adapter that does not fit
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ExportError(
                f"{src}: the adapter cannot be loaded onto {recipe.model.name} ({type(e).__name__}: {reason}); its "
                "adapter_config.json or weights were changed after training: export a checkpoint with --checkpoint "
                "checkpoint-N, or train again"
            ) from None
        model = model.merge_and_unload()
    else:  # peft.type none: the run saved full weights
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=model.dtype, **NO_HUB_KERNELS)
    model.config.use_cache = True
    # Only the weights the model's class defines: the method's own modules (MoH's learned routers) would be keys
    # `from_pretrained` drops as unexpected; the method's export_artifacts writes what it needs of them beside.
    import torch

    with torch.device("meta"):
        own = set(type(model)._from_config(model.config).state_dict())
    state = {name: tensor for name, tensor in model.state_dict().items() if name in own}
    model.save_pretrained(str(dest), safe_serialization=True, state_dict=state)
