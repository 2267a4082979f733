"""A killed run resumes: SIGKILL mid-training, run the same command, it continues from the last
checkpoint and finishes. Plus what the run directory refuses to do (it never clobbers a run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from headwise.train.run_dir import checkpoints
from tests.conftest import run_cli, tiny_recipe, write_recipe

MAX_STEPS = 60


def _launch(recipe_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "headwise", "train", str(recipe_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _logged_steps(run_dir) -> list[int]:
    history = json.loads((run_dir / "run_summary.json").read_text())["log_history"]
    return [h["step"] for h in history if "loss" in h]


def test_sigkill_then_same_command_resumes_and_finishes(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=MAX_STEPS, save_steps=5))
    proc = _launch(recipe)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [c for c in checkpoints(run_dir) if (c / "trainer_state.json").is_file()]
        if done and int(done[0].name.split("-")[1]) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()
    killed_at = int(checkpoints(run_dir)[0].name.split("-")[1])
    assert 10 <= killed_at < MAX_STEPS

    res = run_cli("train", str(recipe))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["global_step"] == MAX_STEPS
    resumed = summary["resumed_from"]
    assert resumed is not None and int(resumed.rsplit("-", 1)[1]) >= killed_at - 5
    # The second process trained only the remaining steps: its progress bar starts past the
    # checkpoint, and the merged log has every step exactly once.
    start = int(resumed.rsplit("-", 1)[1])
    assert f" {start + 1}/{MAX_STEPS} [" in res.stderr and f" 1/{MAX_STEPS} [" not in res.stderr
    assert _logged_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()


def test_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=4, save_steps=2, save_total_limit=5))
    assert run_cli("train", str(recipe)).returncode == 0
    # Simulate a kill during the save of checkpoint-4 and of the final folder.
    import shutil

    shutil.rmtree(run_dir / "final")
    weights = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = run_cli("train", str(recipe), "training.max_steps=6")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping" in res.stderr and "checkpoint-4" in res.stderr
    assert json.loads((run_dir / "run_summary.json").read_text())["resumed_from"].endswith("checkpoint-2")


def test_explicit_corrupt_checkpoint_is_refused(tmp_path, tiny_model_dir):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{not json")
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, tmp_path / "run", resume=str(ckpt)))
    res = run_cli("train", str(recipe))
    assert res.returncode == 2
    assert "training.resume" in res.stderr and "trainer_state.json is not valid JSON" in res.stderr


def test_run_dir_of_another_recipe_is_never_clobbered(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=2))
    assert run_cli("train", str(recipe)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    res = run_cli("train", str(recipe), "peft.r=4")
    assert res.returncode == 2
    assert "holds a run of a different recipe" in res.stderr and "peft.r: 8 -> 4" in res.stderr
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine")
    res = run_cli("train", str(recipe), f"training.output_dir={foreign}")
    assert res.returncode == 2 and "is not a headwise run" in res.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.txt"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("peft.target_modules=[q_projj]", "peft.target_modules: ['q_projj'] match no module"),
        ("peft.trainable_modules=[embedding]", "peft.trainable_modules: ['embedding'] match no module"),
        ("data.files=[missing.txt]", "data.files: missing.txt does not exist"),
    ],
)
def test_model_and_data_mistakes_fail_before_training(tmp_path, tiny_model_dir, override, needle):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, run_dir)
    if override.startswith("data.files"):
        recipe["data"] = {"builder": "text", "max_length": 64}
    res = run_cli("train", str(write_recipe(tmp_path, recipe)), override)
    assert res.returncode == 2, res.stderr[-2000:]
    assert needle in res.stderr
    assert not run_dir.exists()


def test_unknown_model_path_is_named(tmp_path):
    recipe = write_recipe(tmp_path, {"model": {"name": str(tmp_path / "nope")}, "training": {"output_dir": str(tmp_path / "r")}})
    res = run_cli("train", str(recipe))
    assert res.returncode == 2 and "model.name" in res.stderr


def test_summary_loss_is_the_whole_run_mean_after_a_resume(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=4, save_steps=2, logging_steps=1))
    assert run_cli("train", str(recipe)).returncode == 0
    res = run_cli("train", str(recipe), "training.max_steps=7")  # resumes from checkpoint-4
    assert res.returncode == 0, res.stderr[-3000:]

    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4")
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) == 7
    assert summary["train_loss"] == pytest.approx(sum(losses) / 7, rel=1e-9)
    assert summary["train_loss_after_resume"] == pytest.approx(sum(losses[4:]) / 3, rel=1e-9)
    # The Trainer's own figure for this process's steps agrees with the resumed part's mean.
    trainer_mean = [h["train_loss"] for h in summary["log_history"] if "train_loss" in h][-1]
    assert summary["train_loss_after_resume"] == pytest.approx(trainer_mean, rel=1e-6)


def test_every_checkpoint_and_the_last_step_are_logged(tmp_path, tiny_model_dir):
    """With a log at each checkpoint, the history a resumed run restarts from covers every step
    before it, so each logged loss weighs exactly the steps it averages."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=7, save_steps=2, logging_steps=3))
    assert run_cli("train", str(recipe)).returncode == 0
    assert _logged_steps(run_dir) == [2, 3, 4, 6, 7]
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [2, 3, 4, 6]


def test_mean_logged_loss_weighs_each_log_by_the_steps_it_covers():
    from headwise.train.trainer import mean_logged_loss

    history = [{"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.0}, {"train_loss": 9.0, "step": 4}, {"step": 6, "loss": 4.0}]
    assert mean_logged_loss(history) == pytest.approx((3 * 2.0 + 1.0 + 2 * 4.0) / 6)
    assert mean_logged_loss(history, after_step=4) == pytest.approx(4.0)
    assert mean_logged_loss(history, after_step=6) is None
