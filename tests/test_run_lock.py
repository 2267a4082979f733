"""One run per output folder: a run holds a lock on `training.output_dir` while it trains, a second
run on the same folder is refused before it loads the model or writes anything, a lock left by a
killed run does not block the next one, and the lock is gone after the run ends, however it ends.
Plus an `output_dir` that names a file. Every run here is a real `headwise train` process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from headwise.train.run_dir import LOCK_FILE, LOCK_OWNER_FILE, checkpoints
from tests.conftest import run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def _launch(recipe_path: Path, log: Path) -> subprocess.Popen:
    """`headwise train` in the background; its output goes to `log` (a pipe left unread could fill and stall it)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        # A suite started in the background (`pytest &` from a script) inherits SIGINT ignored, and so would the
        # run: it must take Ctrl-C as a terminal's foreground job does, so SIGINT is reset before the exec.
        return subprocess.Popen([sys.executable, "-m", "headwise", "train", str(recipe_path)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_until(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting until {what}")


def _lock_owner(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / LOCK_OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _holds_lock(run_dir: Path, proc: subprocess.Popen) -> bool:
    owner = _lock_owner(run_dir)
    return owner is not None and owner.get("pid") == proc.pid


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_second_run_on_a_busy_output_dir_is_refused_and_the_first_finishes(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    max_steps = 30
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=max_steps, save_steps=2))
    log = tmp_path / "first.log"
    first = _launch(recipe, log)
    try:
        # Let the first run write a checkpoint, then pause it (SIGSTOP keeps its lock) so the second
        # run meets it mid-training and nothing in the folder moves while the second one runs.
        _wait_until(lambda: any((c / "trainer_state.json").is_file() for c in checkpoints(run_dir)), first, log,
                    "the first run saved a checkpoint")
        first.send_signal(signal.SIGSTOP)
        owner = _lock_owner(run_dir)
        assert owner is not None and owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        assert "train" in owner["command"] and owner["started"]
        before = _checksums(run_dir)

        second = run_cli("train", str(recipe))

        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()} since {owner['started']}" in second.stderr
        assert "choose another training.output_dir" in second.stderr
        assert "trainable params" not in second.stdout  # refused before the model was built
        assert _checksums(run_dir) == before  # it wrote nothing, not even recipe.yaml

        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        _stop(first)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["global_step"] == max_steps and summary["resumed_from"] is None
    assert [h["step"] for h in summary["log_history"] if "loss" in h] == list(range(1, max_steps + 1))
    assert [c.name for c in checkpoints(run_dir)] == [f"checkpoint-{max_steps}", f"checkpoint-{max_steps - 2}"]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    # Released after a normal finish.
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / LOCK_OWNER_FILE).exists()


def test_lock_of_a_killed_run_does_not_block_the_next(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=3))
    log = tmp_path / "killed.log"
    killed = _launch(recipe, log)
    try:
        _wait_until(lambda: _holds_lock(run_dir, killed), killed, log, "the run held the lock")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    finally:
        _stop(killed)
    assert _lock_owner(run_dir)["pid"] == killed.pid  # the record of the dead run is still there

    res = run_cli("train", str(recipe))

    assert res.returncode == 0, res.stderr[-3000:]
    assert f"names a run that ended without releasing it (pid {killed.pid} " in res.stderr
    assert json.loads((run_dir / "run_summary.json").read_text())["global_step"] == 3
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / LOCK_OWNER_FILE).exists()


def test_lock_is_released_when_the_run_fails(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=500, save_steps=2))
    log = tmp_path / "interrupted.log"
    run = _launch(recipe, log)
    try:
        _wait_until(lambda: _holds_lock(run_dir, run) and checkpoints(run_dir), run, log, "the run was training")
        run.send_signal(signal.SIGINT)  # Ctrl-C: a KeyboardInterrupt raised in the middle of training
        code = run.wait(timeout=120)
    finally:
        _stop(run)
    assert code != 0 and "KeyboardInterrupt" in log.read_text()
    assert not (run_dir / "final").exists()
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / LOCK_OWNER_FILE).exists()


def test_lock_from_another_host_is_refused_with_the_way_out(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, run_dir, max_steps=2))
    (run_dir / LOCK_OWNER_FILE).write_text(json.dumps(
        {"pid": 4242, "host": "gpu-node-7.example", "started": "2025-01-02T03:04:05+00:00", "command": "headwise train r.yaml"}
    ))
    before = _checksums(run_dir)

    res = run_cli("train", str(recipe))

    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "claimed by a run on another host (pid 4242 on host gpu-node-7.example since 2025-01-02T03:04:05+00:00" in res.stderr
    assert f"delete {run_dir / LOCK_OWNER_FILE} and start again" in res.stderr
    assert _checksums(run_dir) == before
    assert not (run_dir / "recipe.yaml").exists()


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_output_dir_naming_a_file_is_refused_and_the_file_kept(tmp_path, tiny_model_dir, under):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    digest = hashlib.sha256(notes.read_bytes()).hexdigest()
    output_dir = notes / "run" if under else notes
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, output_dir))

    res = run_cli("train", str(recipe))

    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    what = f"lies under {str(notes)!r}, which is a file" if under else "is a file"
    assert f"training.output_dir {str(output_dir)!r} {what}, not a folder" in res.stderr
    assert notes.is_file() and hashlib.sha256(notes.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "recipe.yaml"]


def test_output_dir_holding_the_users_own_recipe_yaml_is_not_taken_for_a_run(tmp_path, tiny_model_dir):
    """A folder whose recipe.yaml is the user's recipe (no resolved-recipe header) is not a run:
    refused, and the recipe keeps its comments byte for byte (a run would rewrite it resolved)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# my notes on this run\n" + yaml.safe_dump(tiny_recipe(tiny_model_dir, tmp_path)))
    before = _checksums(tmp_path)

    res = run_cli("train", str(recipe))

    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "holds a recipe.yaml that headwise did not write" in res.stderr
    assert _checksums(tmp_path) == before
