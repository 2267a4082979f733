"""A refused or failed `train` leaves the output folder as it found it, and a checkpoint that does not
belong to the run (foreign adapter tensors, a damaged trainer_state.json or adapter_config.json) is never
resumed from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from headwise.train.run_dir import checkpoint_problem
from tests.conftest import run_cli, tiny_recipe, write_recipe


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _foreign_checkpoint(path: Path) -> Path:
    """A checkpoint that parses, whose adapter holds tensors of some other model."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"some.other.weight": torch.zeros(3, 3)}, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("trainer_state.json", "[1, 2]", "trainer_state.json is not a JSON object"),
        ("trainer_state.json", '{"log_history": []}', "no integer `global_step`"),
        ("trainer_state.json", '{"global_step": true}', "no integer `global_step`"),
        ("adapter_config.json", '["r", 8]', "adapter_config.json is not a JSON object"),
    ],
)
def test_checkpoint_with_a_wrongly_typed_json_file_is_refused(tmp_path, name, content, needle):
    ckpt = _foreign_checkpoint(tmp_path / "checkpoint-1")
    assert checkpoint_problem(ckpt) is None  # whole, as far as files go, until one is broken
    (ckpt / name).write_text(content)
    assert needle in checkpoint_problem(ckpt)


@pytest.mark.slow
def test_refused_resume_after_the_model_loaded_leaves_no_folder_behind(tmp_path, tiny_model_dir):
    ckpt = _foreign_checkpoint(tmp_path / "elsewhere" / "checkpoint-1")
    before = _checksums(ckpt.parent)
    run_dir = tmp_path / "new" / "runs" / "a"  # parents created by the run must go too
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=2, resume=str(ckpt)))
    res = run_cli("train", str(recipe))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "training.resume" in res.stderr and "adapter_model.safetensors" in res.stderr
    assert "not this model's adapter" in res.stderr
    assert not (tmp_path / "new").exists()
    assert _checksums(ckpt.parent) == before

    # The corrected command now runs in the same folder (it is not "a run of a different recipe").
    res = run_cli("train", str(recipe), "training.resume=auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_refused_run_in_an_existing_run_folder_puts_its_recipe_back(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=2))
    assert run_cli("train", str(recipe)).returncode == 0
    before = _checksums(run_dir)
    ckpt = _foreign_checkpoint(tmp_path / "checkpoint-1")
    # A resumable change (resume, max_steps) rewrites recipe.yaml before the model is built; the refusal
    # after the build must restore the run's own recipe.yaml byte for byte.
    res = run_cli("train", str(recipe), f"training.resume={ckpt}", "training.max_steps=4")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "adapter_model.safetensors" in res.stderr and "Traceback" not in res.stderr
    assert _checksums(run_dir) == before
