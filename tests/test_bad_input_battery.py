"""A wide bad-input battery through the real CLI: bad arguments of every command, and every file headwise reads
given empty, truncated, binary or wrongly typed content (one case per way a file is read; the tests of each
reader's own module go through its variants in-process, where a case costs no interpreter start).

Each case copies a prepared workspace (a finished two-step LoRA run of the tiny model with its export, or a
two-step DuoAttention run), changes one thing in the copy, takes the sha256 of every file in it, runs
`python -m headwise ...` there (`tests.conftest.run_cli`, a real subprocess), and checks what a user must
get for bad input:

- exit status 2 and one `headwise: error: ...` message (argparse's `headwise CMD: error: ...` for argument
  types it checks itself), no traceback;
- the message names the offending file, field or argument (each case lists a distinctive part of it);
- nothing in the workspace changed, and nothing was added (no new file or folder, so no half-made run
  folder or export is left behind).

Some inputs have a right outcome other than a refusal, and the case says so: a resumed run skips a
damaged checkpoint with a warning naming it and trains from the previous one (docs/recipes.md); an
export may go ahead without a damaged optional file (the training summary, old eval results) when a
warning names it. `recipe validate` reports one verdict per file on stdout (`ok ...` / `invalid ...`)
and exits 2 when any is invalid.

The workspaces are built once per module; the cases of a session run up front, a few processes at a time
(`HEADWISE_BATTERY_JOBS`, default 2), since every process pays the interpreter's imports. Only the cases
pytest selected run (`-k` picks them as usual); each test then asserts its own case's outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

LORA, DUO = "lora", "duo"
CASE_TIMEOUT_S = 300
# Offline: no case may reach the network (a Hub id in a bad input must fail locally, fast).
CASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ERROR_LINE = re.compile(r"^headwise(?: [a-z]+)?: error: ", re.MULTILINE)
RESUME_MAY_WRITE = ("run/checkpoint-2/", "run/final/", "run/run_summary.json", "run/recipe.yaml")


@dataclass(frozen=True)
class Case:
    """One bad input: the workspace it starts from, what `setup` breaks in the copy, the command, and the
    parts of the message that name the culprit.

    `outcome`: `refused` (exit 2, a message, nothing changed), `verdicts` (`recipe validate`: exit 2 with
    an `invalid ...` line on stdout, or a `headwise: error:`, nothing changed) or `refused_or_warned`
    (the refusal, or exit 0 with a warning naming the culprit in `warn` and changes only under
    `may_write`)."""

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    workspace: str = LORA
    outcome: str = "refused"
    warn: tuple[str, ...] = ()
    may_write: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ breaking files


def _rng(path: Path) -> random.Random:
    return random.Random(path.name)  # the same bytes for the same file name, run after run


def empty(path: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / path).write_bytes(b"")

    return setup


def truncated(path: str, keep: float = 0.6) -> Callable[[Path], None]:
    """The file cut off part way, as a killed writer or an interrupted copy leaves it."""

    def setup(ws: Path) -> None:
        data = (ws / path).read_bytes()
        (ws / path).write_bytes(data[: max(1, int(len(data) * keep))])

    return setup


def binary(path: str, size: int = 600) -> Callable[[Path], None]:
    """Random bytes (not text in any encoding; the first byte is never ASCII)."""

    def setup(ws: Path) -> None:
        rng = _rng(ws / path)
        (ws / path).parent.mkdir(parents=True, exist_ok=True)
        (ws / path).write_bytes(bytes([0xC3 ^ 0x40]) + bytes(rng.randrange(256) for _ in range(size - 1)))

    return setup


def text(path: str, content: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / path).parent.mkdir(parents=True, exist_ok=True)
        (ws / path).write_text(content)

    return setup


def json_edit(path: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Valid JSON with a wrongly typed value: `change` edits the parsed object in place."""

    def setup(ws: Path) -> None:
        data = json.loads((ws / path).read_text())
        change(data)
        (ws / path).write_text(json.dumps(data, indent=2))

    return setup


def yaml_edit(path: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        raw = (ws / path).read_text()
        header = "".join(line + "\n" for line in raw.splitlines() if line.startswith("#"))
        data = yaml.safe_load(raw)
        change(data)
        (ws / path).write_text(header + yaml.safe_dump(data, sort_keys=False))

    return setup


def foreign_tensors(path: str) -> Callable[[Path], None]:
    """A valid safetensors file holding none of the tensors that belong there."""

    def setup(ws: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"some.other.weight": torch.zeros(3, 3)}, str(ws / path))

    return setup


def wrong_shapes(path: str) -> Callable[[Path], None]:
    """The right tensor names with one more row each (e.g. an adapter of another rank or model)."""

    def setup(ws: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(ws / path))
        save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:], dtype=v.dtype) for k, v in tensors.items()}, str(ws / path))

    return setup


def steps(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for s in setups:
            s(ws)

    return setup


def mkdir(path: str) -> Callable[[Path], None]:
    return lambda ws: (ws / path).mkdir(parents=True)


def remove(path: str) -> Callable[[Path], None]:
    return lambda ws: shutil.rmtree(ws / path)


def user_notes(path: str = "notes.txt") -> Callable[[Path], None]:
    """A file of the user's that a command must never touch."""
    return text(path, "my notes\n")


def copy_recipe(name: str) -> Callable[[Path], None]:
    return lambda ws: shutil.copy(ws / "recipe.yaml", ws / name)


def data_recipe(files: list[str], builder: str = "text") -> Callable[[Path], None]:
    """`data.yaml`: the workspace recipe training on `files` into a new `fresh/` folder."""

    def setup(ws: Path) -> None:
        recipe = yaml.safe_load((ws / "recipe.yaml").read_text())
        recipe["data"] = {"builder": builder, "files": files, "max_length": 64, "num_samples": 8}
        recipe["training"]["output_dir"] = "fresh"
        write_recipe(ws, recipe, "data.yaml")

    return setup


DOC = "Attention is computed per head. " * 30
ROWS = [{"text": DOC} for _ in range(4)]


def jsonl(path: str, rows: list) -> Callable[[Path], None]:
    return text(path, "".join(json.dumps(r) + "\n" for r in rows))


def parquet(path: str, rows: list[dict]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(ws / path))

    return setup


def data_case(case_id: str, file: str, make: Callable[[Path], None], expect: tuple[str, ...], builder: str = "text") -> Case:
    return Case(case_id, ("train", "data.yaml"), expect, steps(make, data_recipe([file], builder)))


# ------------------------------------------------------------------------------------------------- cases

EXPORT_RUN = ("export", "run", "--out", "out")
EXPORT_CKPT = ("export", "run", "--checkpoint", "checkpoint-2", "--out", "out")
RESUME = ("train", "recipe.yaml")
PUSH = ("push", "run/export", "--repo-id", "owner/name", "--dry-run")
GENERATE = ("generate", "run/export", "Hello", "--max-new-tokens", "2")
DUO_EXPORT_AVG = ("export", "drun", "method.average_last=1", "--out", "out")
FRESH = "training.output_dir=fresh"

DUPLICATE_TRAINING_SECTION = "training:\n  output_dir: fresh\n  max_steps: 2\n"

CASES: list[Case] = [
    # ---- train: arguments and overrides
    Case("train-recipe-is-a-directory", ("train", "recipes_dir"), ("recipes_dir",), mkdir("recipes_dir")),
    Case("train-override-unknown-key", ("train", "recipe.yaml", "training.max_stepz=3"), ("training.max_stepz", "max_steps")),
    Case("train-override-bool-for-int", ("train", "recipe.yaml", "training.max_steps=true"), ("training.max_steps",)),
    Case("train-override-empty-target-modules", ("train", "recipe.yaml", "peft.target_modules=[]", FRESH),
         ("peft.target_modules",)),
    Case("train-bf16-on-cpu-leaves-no-run-folder", ("train", "recipe.yaml", "training.bf16=true", FRESH), ("training.bf16",)),
    Case("train-report-to-unknown-tracker", ("train", "recipe.yaml", "training.report_to=[bogus]", FRESH),
         ("report_to", "bogus")),
    # ---- train: the recipe file itself
    Case("recipe-yaml-truncated", ("train", "bad.yaml"), ("bad.yaml",),
         text("bad.yaml", "model: {name: tiny, dtype: auto}\ntraining: {output_dir: fresh, max_st")),
    Case("recipe-yaml-binary", ("train", "bad.yaml"), ("bad.yaml",), binary("bad.yaml")),
    Case("recipe-yaml-duplicate-key", ("train", "bad.yaml"), ("bad.yaml", "training"),
         steps(copy_recipe("bad.yaml"), lambda ws: (ws / "bad.yaml").write_text((ws / "bad.yaml").read_text()
                                                                                 + DUPLICATE_TRAINING_SECTION))),
    # ---- recipe validate
    Case("recipe-validate-one-bad-among-good", ("recipe", "validate", "recipe.yaml", "bad.yaml", "good.yaml"),
         ("ok      recipe.yaml", "bad.yaml", "ok      good.yaml"), steps(copy_recipe("good.yaml"), binary("bad.yaml")),
         outcome="verdicts"),
    Case("recipe-validate-no-file-given", ("recipe", "validate"), ("recipe",), outcome="verdicts"),
    Case("recipe-validate-file-name-with-equals", ("recipe", "validate", "lr=2e-4.yaml"), ("lr=2e-4.yaml",),
         text("lr=2e-4.yaml", "model: [\n"), outcome="verdicts"),
    # ---- export: arguments
    Case("export-not-a-run", ("export", "notrun", "--out", "out"), ("notrun",), user_notes("notrun/notes.txt")),
    Case("export-checkpoint-missing", (*EXPORT_RUN, "--checkpoint", "checkpoint-9"), ("checkpoint-9",)),
    Case("export-out-is-a-file", ("export", "run", "--out", "notes.txt"), ("notes.txt",), user_notes()),
    Case("export-overwrite-a-user-folder", ("export", "run", "--out", "mine", "--overwrite"), ("mine",),
         user_notes("mine/notes.txt")),
    Case("export-override-model-field", (*EXPORT_RUN, "model.name=other"), ("model.name",)),
    # ---- the run folder's recipe.yaml (export reads it; train compares against it to resume)
    Case("export-run-recipe-binary", EXPORT_RUN, ("recipe.yaml",), binary("run/recipe.yaml")),
    Case("train-resume-run-recipe-binary", RESUME, ("recipe.yaml",), binary("run/recipe.yaml")),
    # ---- a checkpoint's trainer_state.json and adapter (export --checkpoint; train's resume)
    Case("export-checkpoint-trainer-state-truncated", EXPORT_CKPT, ("trainer_state.json",),
         truncated("run/checkpoint-2/trainer_state.json")),
    Case("export-checkpoint-trainer-state-list", EXPORT_CKPT, ("trainer_state.json",),
         text("run/checkpoint-2/trainer_state.json", "[1, 2]\n")),
    Case("export-checkpoint-adapter-foreign-tensors", EXPORT_CKPT, ("adapter_model.safetensors",),
         foreign_tensors("run/checkpoint-2/adapter_model.safetensors")),
    Case("train-resume-trainer-state-list", RESUME, ("checkpoint-2", "trainer_state.json"),
         text("run/checkpoint-2/trainer_state.json", "[1, 2]\n"), outcome="refused_or_warned",
         warn=("skipping", "checkpoint-2"), may_write=RESUME_MAY_WRITE),
    Case("train-resume-adapter-foreign-tensors", RESUME, ("checkpoint-2", "adapter_model.safetensors"),
         foreign_tensors("run/checkpoint-2/adapter_model.safetensors"), outcome="refused_or_warned",
         warn=("skipping", "checkpoint-2"), may_write=RESUME_MAY_WRITE),
    Case("train-resume-adapter-wrong-shapes", RESUME, ("checkpoint-2", "adapter_model.safetensors"),
         wrong_shapes("run/checkpoint-2/adapter_model.safetensors"), outcome="refused_or_warned",
         warn=("skipping", "checkpoint-2"), may_write=RESUME_MAY_WRITE),
    # ---- export: the final adapter and its config
    Case("export-final-adapter-truncated", EXPORT_RUN, ("adapter_model.safetensors",),
         truncated("run/final/adapter_model.safetensors")),
    Case("export-final-adapter-foreign-tensors", EXPORT_RUN, ("adapter_model.safetensors",),
         foreign_tensors("run/final/adapter_model.safetensors")),
    Case("export-merged-final-adapter-binary", (*EXPORT_RUN, "--format", "merged"), ("adapter_model.safetensors",),
         binary("run/final/adapter_model.safetensors")),
    Case("export-final-adapter-config-binary", EXPORT_RUN, ("adapter_config.json",), binary("run/final/adapter_config.json")),
    Case("export-final-adapter-config-string-for-int", EXPORT_RUN, ("adapter_config.json",),
         json_edit("run/final/adapter_config.json", lambda c: c.update(r="eight"))),
    # ---- export: optional files beside the run (training summary, eval results)
    Case("export-run-summary-list", EXPORT_RUN, ("run_summary.json",), text("run/run_summary.json", "[1]\n"),
         outcome="refused_or_warned", warn=("run_summary.json",), may_write=("out/",)),
    Case("export-eval-results-binary", EXPORT_RUN, ("results.json",), binary("run/eval/results.json"),
         outcome="refused_or_warned", warn=("results.json",), may_write=("out/",)),
    # ---- the export folder: headwise_inference.json, headwise_recipe.yaml, adapter config and weights
    Case("push-inference-json-list", PUSH, ("headwise_inference.json",), text("run/export/headwise_inference.json", "[1]\n")),
    Case("push-inference-json-no-format-version", PUSH, ("headwise_inference.json", "format_version"),
         json_edit("run/export/headwise_inference.json", lambda c: c.pop("format_version"))),
    Case("generate-inference-json-binary", GENERATE, ("headwise_inference.json",), binary("run/export/headwise_inference.json")),
    Case("push-recipe-yaml-number-for-repo-id", ("push", "run/export", "--dry-run"), ("headwise_recipe.yaml", "repo_id"),
         yaml_edit("run/export/headwise_recipe.yaml", lambda r: r["export"]["hub"].update(repo_id=5))),
    Case("push-weights-foreign-tensors", PUSH, ("adapter_model.safetensors",),
         foreign_tensors("run/export/adapter_model.safetensors")),
    Case("push-adapter-config-binary", PUSH, ("adapter_config.json",), binary("run/export/adapter_config.json")),
    Case("generate-adapter-config-list", GENERATE, ("adapter_config.json",), text("run/export/adapter_config.json", "[1]\n")),
    Case("generate-adapter-config-string-for-int", GENERATE, ("adapter_config.json",),
         json_edit("run/export/adapter_config.json", lambda c: c.update(r="eight"))),
    Case("generate-adapter-weights-foreign-tensors", GENERATE, ("adapter_model.safetensors",),
         foreign_tensors("run/export/adapter_model.safetensors")),
    Case("generate-adapter-weights-wrong-shapes", GENERATE, ("adapter_model.safetensors",),
         wrong_shapes("run/export/adapter_model.safetensors")),
    # ---- push: arguments
    Case("push-repo-id-without-owner", ("push", "run/export", "--repo-id", "noowner", "--dry-run"), ("--repo-id", "noowner")),
    Case("push-repo-id-double-dot", ("push", "run/export", "--repo-id", "owner/my..model", "--dry-run"),
         ("--repo-id", "owner/my..model")),
    Case("push-repo-id-dot-git", ("push", "run/export", "--repo-id", "owner/model.git", "--dry-run"),
         ("--repo-id", "owner/model.git")),
    # ---- generate: arguments
    Case("generate-run-dir-instead-of-export", ("generate", "run", "Hello"), ("run", "export")),
    Case("generate-prompt-empty", ("generate", "run/export", ""), ("prompt",)),
    Case("generate-max-new-tokens-zero", (*GENERATE[:3], "--max-new-tokens", "0"), ("--max-new-tokens",)),
    Case("generate-policy-duo-mask-wrong-shape", (*GENERATE, "--policy", '{"type": "duo", "retrieval_heads": [[1]]}'),
         ("retrieval_heads",)),
    Case("generate-policy-duplicate-key", (*GENERATE, "--policy", "streaming:sink=4,recent=8,recent=16"), ("recent",)),
    Case("generate-policy-bool-for-int", (*GENERATE, "--policy", "h2o:heavy=true,recent=4"), ("heavy",)),
    # ---- eval: arguments (headwise.eval.command.configure_eval_parser)
    Case("eval-depths-out-of-range", ("eval", "run/export", "--depths", "0,1.5"), ("--depths",)),
    Case("eval-stride-above-window", ("eval", "run/export", "--ppl", "--window", "64", "--stride", "100"), ("--stride",)),
    Case("eval-out-is-a-file", ("eval", "run/export", "--ppl", "--window", "64", "--max-windows", "1", "--out", "notes.txt"),
         ("notes.txt",), user_notes()),
    Case("eval-run-without-export", ("eval", "run", "--ppl"), ("headwise export",), remove("run/export")),
    # ---- a DeepSpeed JSON config named by `deepspeed:`
    Case("deepspeed-json-truncated", ("train", "recipe.yaml", "deepspeed=ds.json", FRESH), ("ds.json",),
         text("ds.json", '{"zero_optimization": {"stage": 2')),
    Case("deepspeed-json-list", ("train", "recipe.yaml", "deepspeed=ds.json", FRESH), ("ds.json",), text("ds.json", "[1, 2]\n")),
    Case("deepspeed-preset-without-a-launcher", ("train", "recipe.yaml", "deepspeed=zero2", FRESH), ("deepspeed",)),
    # ---- Duo: the gate log (export with method.average_last) and the gate weights
    Case("duo-gate-log-binary", DUO_EXPORT_AVG, ("duo_gates.jsonl",), binary("drun/duo_gates.jsonl"), workspace=DUO),
    Case("duo-gate-log-wrong-grid", DUO_EXPORT_AVG, ("duo_gates.jsonl",),
         jsonl("drun/duo_gates.jsonl", [{"step": 1, "gates": [[0.5]]}, {"step": 2, "gates": [[0.5]]}]), workspace=DUO),
    Case("duo-export-gate-weights-binary", ("export", "drun", "--out", "out"), ("model.safetensors",),
         binary("drun/final/model.safetensors"), workspace=DUO),
    # ---- data.files: .txt, .jsonl, .json, .parquet (builder text) and chat rows (builder sft)
    data_case("data-txt-empty", "d.txt", empty("d.txt"), ("d.txt",)),
    data_case("data-txt-binary", "d.txt", binary("d.txt"), ("d.txt",)),
    data_case("data-jsonl-empty", "d.jsonl", empty("d.jsonl"), ("d.jsonl",)),
    data_case("data-jsonl-truncated", "d.jsonl", steps(jsonl("d.jsonl", ROWS), truncated("d.jsonl", 0.9)), ("d.jsonl",)),
    data_case("data-json-string", "d.json", text("d.json", '"just a string"'), ("d.json",)),
    data_case("data-parquet-number-for-text", "d.parquet", parquet("d.parquet", [{"text": 5}]), ("d.parquet", "text")),
    data_case("data-sft-messages-string", "chat.jsonl", jsonl("chat.jsonl", [{"messages": "hi"}]), ("chat.jsonl", "messages"),
              builder="sft"),
]


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    changed: list[str]  # files or folders added, removed or modified (relative paths; folders end in /)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, and every folder (so an added empty folder shows too).

    A run's recipe.yaml starts with a comment naming the absolute path of the recipe it was resolved from;
    that line differs between the copies of a workspace and is left out, so rewriting the file with the same
    recipe does not count as a change."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            out[rel + "/"] = "dir"
            continue
        data = path.read_bytes()
        if path.name == "recipe.yaml" and data.startswith(b"# Resolved headwise recipe"):
            data = data.split(b"\n", 1)[-1]
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def changed_paths(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def build_workspaces(names: set[str], root: Path, model_dir: Path) -> dict[str, Path]:
    """The finished runs each case starts from (paths in them are relative, so a copy works anywhere)."""

    def lora() -> Path:
        ws = root / LORA
        ws.mkdir()
        write_recipe(ws, tiny_recipe(model_dir, Path("run"), max_steps=2, save_steps=1, save_total_limit=5))
        for args in (("train", "recipe.yaml"), ("export", "run")):
            res = run_cli(*args, cwd=ws, env=CASE_ENV)
            assert res.returncode == 0, res.stderr[-3000:]
        return ws

    def duo() -> Path:
        ws = root / DUO
        ws.mkdir()
        data = tiny_recipe(model_dir, Path("drun"), max_steps=2, save_steps=2, learning_rate=0.02,
                           lr_scheduler_type="constant")
        data["method"] = {"name": "duo", "sink": 4, "recent": 16,
                          "haystack": {"num_samples": 2, "min_tokens": 160, "max_tokens": 200, "n_keys": 2, "words_per_key": 2}}
        data["peft"] = {"type": "none", "trainable_modules": ["duo_gate"]}
        data["export"] = {"format": "merged"}
        write_recipe(ws, data)
        res = run_cli("train", "recipe.yaml", cwd=ws, env=CASE_ENV)
        assert res.returncode == 0, res.stderr[-3000:]
        return ws

    builders = {LORA: lora, DUO: duo}
    with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
        futures = {name: pool.submit(builders[name]) for name in names}
        return {name: f.result() for name, f in futures.items()}


def run_case(case: Case, workspace: Path, where: Path) -> Outcome:
    ws = where / case.id
    shutil.copytree(workspace, ws, symlinks=True)
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    res = run_cli(*case.args, cwd=ws, env=CASE_ENV, timeout=CASE_TIMEOUT_S)
    outcome = Outcome(res.returncode, res.stdout, res.stderr, changed_paths(before, snapshot(ws)))
    shutil.rmtree(ws)  # a copy of a run per case would add up to gigabytes
    return outcome


@pytest.fixture(scope="module")
def outcomes(request, tiny_model_dir, tmp_path_factory) -> dict[str, Outcome]:
    """Run every selected case (a few processes at a time) before the first test asserts."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module.__name__ == __name__ and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    # Training and model-loading cases first, so that the short ones fill the gaps at the end.
    selected.sort(key=lambda c: c.args[0] not in ("train", "generate", "eval"))
    root = tmp_path_factory.mktemp("battery")
    workspaces = build_workspaces({c.workspace for c in selected}, root, tiny_model_dir)
    cases_dir = root / "cases"
    cases_dir.mkdir()
    jobs = int(os.environ.get("HEADWISE_BATTERY_JOBS", "2"))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {c.id: pool.submit(run_case, c, workspaces[c.workspace], cases_dir) for c in selected}
        return {case_id: f.result() for case_id, f in futures.items()}


# ------------------------------------------------------------------------------------------------ checks


def _report(case: Case, out: Outcome) -> str:
    return (f"\n$ headwise {' '.join(case.args)}\nexit {out.returncode}\n--- stdout (tail)\n{out.stdout[-1500:]}"
            f"\n--- stderr (tail)\n{out.stderr[-3000:]}\n--- changed: {out.changed}")


def _error_message(case: Case, out: Outcome) -> str:
    """The user-facing message: from the first `headwise: error:` line of stderr on (or, for `recipe
    validate`, its `invalid ...` verdicts on stdout as well)."""
    found = ERROR_LINE.search(out.stderr)
    message = out.stderr[found.start():] if found else ""
    if case.outcome == "verdicts":
        message += out.stdout
        assert found or "\ninvalid " in "\n" + out.stdout, "no `invalid ...` verdict and no error message" + _report(case, out)
    else:
        assert found, "no `headwise: error:` message on stderr" + _report(case, out)
    return message


def check_refused(case: Case, out: Outcome) -> None:
    assert "Traceback" not in out.stderr + out.stdout, "a traceback reached the user" + _report(case, out)
    assert out.returncode == 2, f"exit {out.returncode}, expected 2" + _report(case, out)
    message = _error_message(case, out)
    missing = [part for part in case.expect if part not in message]
    assert not missing, f"the message does not name {missing}" + _report(case, out)
    assert not out.changed, f"a refused command changed or added {out.changed}" + _report(case, out)


def check_warned(case: Case, out: Outcome) -> None:
    """Exit 0 is right here when a warning names the culprit and only the command's own output changed."""
    assert "Traceback" not in out.stderr + out.stdout, "a traceback reached the user" + _report(case, out)
    missing = [part for part in case.warn if part not in out.stderr]
    assert not missing, f"succeeded without a warning naming {missing}" + _report(case, out)
    outside = [p for p in out.changed if not p.startswith(case.may_write)]
    assert not outside, f"changed or added {outside} (allowed: {case.may_write})" + _report(case, out)


def test_case_ids_are_unique_and_k_friendly():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, Outcome]):
    out = outcomes[case.id]
    if case.outcome == "refused_or_warned" and out.returncode == 0:
        check_warned(case, out)
    else:
        check_refused(case, out)
