"""`headwise export --out/--overwrite` never deletes or changes what is not a previous export.

One tiny run is trained per module and exported once; each test works on copies of that export. Every
refusal is checked through the real CLI: exit code 2, a message naming the reason, and every file of the
folder it was pointed at unchanged (checksums before and after).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from headwise.publish.export_target import (
    EXPORT_MANIFEST,
    ExportTargetError,
    check_export_target,
    move_into_place,
    protected_reason,
)
from headwise.inference.config import InferenceConfig
from tests.conftest import run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # trains a run and launches the CLI


@contextlib.contextmanager
def umask(mask: int):
    """Run the block (and the subprocesses it starts, which inherit it) under `mask`."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (a new or lost file shows as well)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hidden_siblings(folder: Path) -> list[str]:
    """Temporary or set-aside folders an export left beside `folder`."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("export-safety")
    run = root / "run"
    with umask(0o022):
        res = run_cli("train", str(write_recipe(root, tiny_recipe(tiny_model_dir, run))))
    assert res.returncode == 0, res.stderr[-3000:]
    (run / "notes.txt").write_text("my notes about this run\n")  # a user's file in the run folder
    return run


@pytest.fixture(scope="module")
def first_export(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first") / "export"
    with umask(0o022):
        res = run_cli("export", str(run_dir), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture
def previous_export(first_export, tmp_path) -> Path:
    """A fresh copy of a finished export, alone in its parent folder."""
    out = tmp_path / "exports" / "previous"
    shutil.copytree(first_export, out)
    return out


def assert_refused(res, folder: Path, before: dict[str, str], *phrases: str) -> str:
    err = res.stderr
    assert res.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("headwise: error:")]
    assert len(errors) == 1, err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    assert checksums(folder) == before
    return errors[0]


def _case_run_folder(run_dir, tiny_model_dir, previous_export, tmp_path):
    return run_dir, {}, "it is the run folder"


def _case_run_parent(run_dir, tiny_model_dir, previous_export, tmp_path):
    return run_dir.parent, {}, "it contains the run folder"


def _case_working_directory(run_dir, tiny_model_dir, previous_export, tmp_path):
    # A clean previous export: only its being the working directory forbids replacing it.
    return previous_export, {"cwd": previous_export}, "it is the working directory"


def _case_home(run_dir, tiny_model_dir, previous_export, tmp_path):
    return previous_export, {"env": {"HOME": str(previous_export)}}, "it is your home folder"


def _case_base_model(run_dir, tiny_model_dir, previous_export, tmp_path):
    return tiny_model_dir, {}, "it is the folder of the run's base model"


def _case_user_folder(run_dir, tiny_model_dir, previous_export, tmp_path):
    folder = tmp_path / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article}\n")
    (folder / "data" / "results.csv").write_text("a,b\n1,2\n")
    return folder, {}, "holds no headwise export"


def _case_export_with_a_user_file(run_dir, tiny_model_dir, previous_export, tmp_path):
    (previous_export / "eval").mkdir()
    (previous_export / "eval" / "results.json").write_text('{"ppl@1024": 12.5}\n')
    return previous_export, {}, "also files an export does not write (eval/results.json)"


PROTECTED = [_case_run_folder, _case_run_parent, _case_working_directory, _case_home, _case_base_model,
             _case_user_folder, _case_export_with_a_user_file]


@pytest.mark.parametrize("case", PROTECTED, ids=lambda c: c.__name__.removeprefix("_case_"))
def test_overwrite_refuses_what_is_not_only_a_previous_export(case, run_dir, tiny_model_dir, previous_export, tmp_path):
    folder, where, reason = case(run_dir, tiny_model_dir, previous_export, tmp_path)
    before = checksums(folder)
    assert before
    where.setdefault("cwd", tmp_path)
    res = run_cli("export", str(run_dir), "--out", str(folder), "--overwrite", **where)
    assert_refused(res, folder, before, reason, "nothing was changed", "--out")
    assert hidden_siblings(folder) == []


def test_the_filesystem_root_is_never_an_export_folder():
    root = Path(Path.cwd().anchor)
    assert protected_reason(root) == "it is the filesystem root"
    with pytest.raises(ExportTargetError, match="it is the filesystem root"):
        check_export_target(root, overwrite=True)


@pytest.mark.parametrize("legacy", [False, True], ids=["with-manifest", "before-manifests"])
def test_overwrite_replaces_a_previous_export(legacy, run_dir, previous_export):
    """A previous export (recognised by its manifest, or by its file names when it predates manifests)
    is replaced by the new one, which loads, gets the umask's permissions, and leaves nothing behind."""
    (previous_export / "README.md").write_text("the old model card\n")
    if legacy:
        (previous_export / EXPORT_MANIFEST).unlink()
    with umask(0o027):
        res = run_cli("export", str(run_dir), "--out", str(previous_export), "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the old model card" not in (previous_export / "README.md").read_text()
    InferenceConfig.read(previous_export)  # parses and validates headwise_inference.json
    assert (previous_export / EXPORT_MANIFEST).is_file()
    assert hidden_siblings(previous_export) == []
    assert [p.name for p in previous_export.parent.iterdir()] == [previous_export.name]
    assert previous_export.stat().st_mode & 0o777 == 0o750
    assert {oct(p.stat().st_mode & 0o777) for p in previous_export.rglob("*") if p.is_file()} == {oct(0o640)}


def test_without_overwrite_only_a_previous_export_is_told_about_overwrite(run_dir, previous_export, tmp_path):
    before = checksums(previous_export)
    res = run_cli("export", str(run_dir), "--out", str(previous_export), cwd=tmp_path)
    assert_refused(res, previous_export, before, "already holds a headwise export", "pass --overwrite")

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    before = checksums(mine)
    res = run_cli("export", str(run_dir), "--out", str(mine), cwd=tmp_path)
    message = assert_refused(res, mine, before, "holds no headwise export", "notes.txt", "--out a new or empty folder")
    assert "--overwrite" not in message


def test_out_naming_a_file_is_refused(run_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00user bytes\x01" * 100)
    before = checksums(tmp_path)
    res = run_cli("export", str(run_dir), "--out", str(weights), "--overwrite", cwd=tmp_path)
    assert_refused(res, tmp_path, before, "is a file, not a folder", "left untouched")


def test_export_folder_and_files_are_readable_by_others_under_umask_022(first_export):
    assert first_export.stat().st_mode & 0o777 == 0o755
    modes = {str(p.relative_to(first_export)): oct(p.stat().st_mode & 0o777) for p in first_export.rglob("*")}
    assert modes and set(modes.values()) == {oct(0o644)}, modes  # safetensors writes 0o600 on its own


def test_run_weights_are_readable_by_others_under_umask_022(run_dir):
    """The final weights and every checkpoint come out with umask modes (safetensors writes 0o600)."""
    written = [run_dir / "final", *sorted(run_dir.glob("checkpoint-*"))]
    assert len(written) >= 2
    for folder in written:
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()}
        assert "adapter_model.safetensors" in modes and set(modes.values()) == {oct(0o644)}, (folder, modes)


def test_a_failed_export_leaves_the_previous_export_intact(run_dir, previous_export, tiny_model_dir, tmp_path):
    """The new export fails while being written: the run's base model has a whole config (every check
    before the build passes) but cut-off weights, found only when the merge loads them. The previous
    export is untouched and no temporary folder is left."""
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    broken_run = Path(shutil.copytree(run_dir, tmp_path / "broken-run"))
    saved = broken_run / "recipe.yaml"
    saved.write_text(saved.read_text().replace(str(tiny_model_dir), str(base)))
    before = checksums(previous_export)
    res = run_cli("export", str(broken_run), "--format", "merged", "--out", str(previous_export), "--overwrite",
                  cwd=tmp_path)
    assert res.returncode != 0 and "headwise: exported" not in res.stdout, res.stderr[-3000:]
    assert checksums(previous_export) == before
    assert hidden_siblings(previous_export) == []


def test_damaged_final_weights_are_refused_before_anything_is_written(run_dir, previous_export, tmp_path):
    broken_run = tmp_path / "broken-run"
    shutil.copytree(run_dir, broken_run)
    (broken_run / "final" / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    before = checksums(previous_export)
    res = run_cli("export", str(broken_run), "--format", "merged", "--out", str(previous_export), "--overwrite",
                  cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "adapter_model.safetensors is damaged or cut short" in res.stderr
    assert checksums(previous_export) == before
    assert hidden_siblings(previous_export) == []


def test_move_into_place_puts_the_old_folder_back_when_the_new_one_cannot_move_in(previous_export, tmp_path):
    before = checksums(previous_export)
    with pytest.raises(FileNotFoundError):
        move_into_place(tmp_path / "never-written", previous_export)
    assert checksums(previous_export) == before
    assert hidden_siblings(previous_export) == []


# ------------------------------------------------------------------------------ damaged files beside the run


def test_an_unreadable_training_summary_is_left_out_of_the_card_with_a_warning(run_dir, tmp_path):
    """run_summary.json is optional: a damaged one costs the card its summary lines, not the export."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "run_summary.json").write_text('{"global_step": 2, "log_hist')  # cut short by a kill
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_bytes(b"\xff\xfe\x00binary")
    out = tmp_path / "out"
    res = run_cli("export", str(run), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert f"skipping {run / 'run_summary.json'}" in res.stderr
    assert f"skipping {run / 'eval' / 'results.json'}" in res.stderr
    card = (out / "README.md").read_text()
    assert "the training summary (run_summary.json) could not be read" in card
    assert "eval/results.json could not be read" in card


def test_a_missing_checkpoint_is_refused_with_the_checkpoints_there(run_dir):
    from headwise.publish.export import ExportError, export_run

    names = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert names  # the fixture's run saves checkpoints
    with pytest.raises(ExportError, match="checkpoint-99: it does not exist") as e:
        export_run(run_dir, checkpoint="checkpoint-99")
    assert all(n in str(e.value) for n in names)


def test_an_adapter_config_that_builds_no_adapter_is_named(run_dir, tiny_model_dir, tmp_path):
    """The check shared by export, load and push: a wrongly typed field fails on a meta-device model, and a
    whole adapter passes."""
    from transformers import AutoConfig

    from headwise.inference.config import adapter_problem

    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "final", adapter)
    assert adapter_problem(adapter, model_config) is None
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": [1]}))
    problem = adapter_problem(adapter, model_config)
    assert problem and problem.startswith(f"{adapter / 'adapter_config.json'} ")


def test_a_gate_log_of_text_gates_is_named(tmp_path):
    from headwise.errors import HeadwiseError
    from patches.duo import averaged_gates

    log = tmp_path / "duo_gates.jsonl"
    log.write_text('{"step": 1, "gates": "x"}\n{"step": 2, "gates": [[0.5, 0.5]]}\n')
    with pytest.raises(HeadwiseError, match="duo_gates.jsonl: gates must be a .* grid of numbers"):
        averaged_gates(log, 1.0)
