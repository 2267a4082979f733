"""The run directory: what a training run owns on disk, and how a run picks up where it stopped.

```
<output_dir>/
  recipe.yaml           the resolved recipe (written before training starts)
  checkpoint-<step>/    Trainer checkpoints (adapter + optimizer + trainer_state.json)
  final/                the trained adapter (or weights) and tokenizer, written at the end
  run_summary.json      steps, loss, runtime, versions
  export/               `headwise export` output (default location)
```

Nothing a user had is overwritten: a directory that holds a run of a *different* recipe is refused
before any model is loaded, and resuming validates checkpoints before handing one to the Trainer
(a checkpoint cut off by a kill mid-save is skipped with a warning, falling back to the previous).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from headwise.errors import HeadwiseError
from headwise.recipe import Recipe

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
FINAL_DIR = "final"
SUMMARY_FILE = "run_summary.json"
# Fields a resumed run may change without becoming a different run: how long it trains and how it
# logs or saves, not what it trains.
RESUMABLE_CHANGES = {
    ("training", "resume"),
    ("training", "max_steps"),
    ("training", "num_train_epochs"),
    ("training", "save_steps"),
    ("training", "save_total_limit"),
    ("training", "logging_steps"),
    ("training", "report_to"),
    ("training", "dataloader_num_workers"),
    ("export",),
    ("description",),
}


class RunDirError(HeadwiseError):
    """The output directory cannot be used as asked; nothing in it was touched."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _diff(old: Any, new: Any, prefix: tuple = ()) -> list[tuple[tuple, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), prefix + (k,))
        return out
    return [] if old == new else [(prefix, old, new)]


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Changes between two resolved recipes that make them different runs."""
    out = []
    for path, a, b in _diff(old, new):
        if any(path[: len(p)] == p for p in RESUMABLE_CHANGES):
            continue
        out.append(f"{'.'.join(map(str, path))}: {a!r} -> {b!r}")
    return out


def checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, newest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a missing or unreadable file), or None when it is whole."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return f"{state.name} is missing"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{state.name} is not valid JSON ({e})"
    weights = [p for p in ckpt.glob("*.safetensors")]
    if not weights and not any(ckpt.glob("global_step*")):
        return "it holds no weights (*.safetensors or a DeepSpeed global_step folder)"
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                names = list(f.keys())
                if names:
                    f.get_slice(names[-1])  # touches the header and the last tensor's offsets
        except Exception as e:  # safetensors raises several types for truncated or garbled files
            return f"{w.name} is unreadable ({type(e).__name__}: {e})"
        if w.stat().st_size <= 8:
            return f"{w.name} is empty"
    return None


def prepare_run_dir(recipe: Recipe, resolved: dict[str, Any], resolved_yaml: str) -> Path | None:
    """Check `training.output_dir` against the recipe and return the checkpoint to resume from.

    Raises RunDirError (touching nothing) when the directory holds another recipe's run, when
    checkpoints exist and `resume: never`, or when an explicit resume checkpoint is corrupt.
    Writes the resolved recipe beside the run on the main process.
    """
    run_dir = recipe.run_dir()
    saved = run_dir / RECIPE_FILE
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            old = None
        diffs = recipe_differences(old or {}, resolved) if isinstance(old, dict) else ["(unreadable recipe.yaml)"]
        if diffs:
            listed = "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
            raise RunDirError(
                f"training.output_dir {str(run_dir)!r} holds a run of a different recipe ({listed}); choose another "
                "training.output_dir (e.g. `training.output_dir=runs/new`) or delete that directory"
            )
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise RunDirError(
            f"training.output_dir {str(run_dir)!r} exists and is not a headwise run (no {RECIPE_FILE}); choose another "
            "training.output_dir or empty it"
        )

    resume: Path | None = None
    mode = recipe.training.resume
    if mode not in ("auto", "never"):
        resume = Path(mode)
        problem = checkpoint_problem(resume)
        if problem:
            raise RunDirError(f"training.resume {mode!r}: {problem}; pick another checkpoint or `resume: auto`")
    else:
        found = checkpoints(run_dir)
        if found and mode == "never":
            raise RunDirError(
                f"training.output_dir {str(run_dir)!r} has checkpoints ({found[0].name}) and training.resume is `never`; "
                "use `training.resume=auto` to continue, or another output_dir"
            )
        for ckpt in found:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                resume = ckpt
                break
            logger.warning("skipping %s: %s (a run killed while saving leaves this); trying an older one", ckpt, problem)

    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(resolved_yaml)
    return resume


EXPORT_OVERRIDABLE = ("method", "export")


def read_run_recipe(run_dir: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The resolved recipe saved beside a run (used by export and push), with `overrides` applied.

    Only `method.*` (not `method.name`) and `export.*` may be overridden: everything else describes
    how the saved weights were trained."""
    from headwise.recipe_loader import RecipeError, apply_overrides, parse_override, validate_mapping

    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: {run_dir} is not a headwise run directory (train it with `headwise train`)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunDirError(f"{path} is not valid YAML ({e}); restore it from the recipe you trained with") from e
    try:
        for text in overrides:
            key = parse_override(text)[0]
            if key[0] not in EXPORT_OVERRIDABLE or key[:2] == ["method", "name"]:
                raise RunDirError(
                    f"override {text!r}: only method.* (not method.name) and export.* settings can change after "
                    f"training; {'.'.join(key)} describes how {run_dir} was trained (train again to change it)"
                )
        label = str(path) + (f" with {' '.join(overrides)}" if overrides else "")
        return validate_mapping(apply_overrides(data, overrides, {}), label=label)
    except RecipeError as e:
        raise RunDirError(str(e)) from e
