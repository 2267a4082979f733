"""Bad input to `headwise generate` / `headwise.load`, `headwise eval`, `headwise_inference.json` and
`headwise push`'s folder checks: one message naming the argument or file and the fix, exit 2, no traceback,
and no user file changed (checksums before and after).

The exports are real: a tiny recipe trained for one step and exported with `export_run` (an adapter on the
tiny random model of tests/conftest.py), copied into each test before it is damaged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import headwise
from headwise.cli import main
from headwise.errors import HeadwiseError
from tests.conftest import run_cli, tiny_recipe, write_recipe

CONFIG = "headwise_inference.json"


def checksums(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (a root may be a single file)."""
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A run of one training step and its real export, and `bare_run`: a second such run, never exported.

    Two trainings, not a copy: a run directory's export is found through the output_dir its saved recipe names.
    """
    from headwise.publish.export import export_run
    from headwise.recipe.loader import load_recipe
    from headwise.train.trainer import train

    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for name in ("run", "bare_run"):
        runs[name] = root / name
        recipe = tiny_recipe(tiny_model_dir, runs[name], max_steps=1, save_steps=1)
        train(load_recipe(write_recipe(root, recipe, name=f"{name}.yaml")))
    return {**runs, "export": Path(export_run(runs["run"]))}


@pytest.fixture()
def export_copy(trained, tmp_path) -> Path:
    """A copy of the real export that a test may damage."""
    return Path(shutil.copytree(trained["export"], tmp_path / "export"))


@pytest.fixture(scope="module")
def loaded_tiny(tiny_model_dir):
    return headwise.load(str(tiny_model_dir), dtype="float32")


# ------------------------------------------------------------------------------------------------------------
# generate: prompts, token counts, policies, paths


@pytest.mark.parametrize("prompt", ["", "  \n\t"], ids=["empty", "whitespace"])
@pytest.mark.parametrize("flags", [[], ["--static"], ["--compile"]], ids=["dynamic", "static", "compile"])
def test_cli_generate_refuses_an_empty_prompt_before_the_model_loads(tmp_path, capsys, prompt, flags):
    """Refused at argument parsing: the model path does not even exist, and the prompt is what is named."""
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path / "no-model-here"), prompt, *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument prompt:" in err and "prompt: give text for the model to continue" in err, err
    assert "no-model-here" not in err.split("error:")[-1]


@pytest.mark.slow
def test_cli_generate_empty_prompt_through_the_real_command(trained):
    before = checksums(trained["export"])
    res = run_cli("generate", str(trained["export"]), "   ", "--static")
    assert res.returncode == 2
    assert "whitespace-only prompt: give text for the model to continue" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert checksums(trained["export"]) == before


@pytest.mark.parametrize("prompt, words", [
    ("", "prompt is empty: give the text to continue"),
    (" \n ", "prompt is only whitespace"),
    ([], "prompt is an empty list"),
    (["Hello there", ""], "prompt[1] is empty"),
    (["Hello there", None], "prompt[1] is NoneType, not a string"),
])
@pytest.mark.parametrize("mode", [{}, {"static": True}, {"compile": True}], ids=["dynamic", "static", "compile"])
def test_python_generate_refuses_empty_prompts(loaded_tiny, prompt, words, mode):
    with pytest.raises(HeadwiseError) as e:
        loaded_tiny.generate(prompt, max_new_tokens=2, **mode)
    assert words in str(e.value)


def test_python_generate_still_takes_a_plain_prompt(loaded_tiny):
    """The checks refuse only bad input: a prompt with a space in it generates, as a batch too."""
    assert isinstance(loaded_tiny.generate("Hello there", max_new_tokens=2), str)
    assert len(loaded_tiny.generate(["Hello", " world"], max_new_tokens=2, static=True)) == 2


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many"])
def test_cli_generate_refuses_a_bad_max_new_tokens_at_parsing(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path / "no-model-here"), "Hello", "--max-new-tokens", value])
    assert e.value.code == 2
    assert f"argument --max-new-tokens: '{value}': give a whole number, 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, -1, True, 2.0])
@pytest.mark.parametrize("mode", [{}, {"static": True}], ids=["dynamic", "static"])
def test_python_generate_refuses_a_bad_max_new_tokens(loaded_tiny, value, mode):
    with pytest.raises(HeadwiseError, match=r"max_new_tokens .*: give a whole number of tokens to generate, 1 or more"):
        loaded_tiny.generate("Hello", max_new_tokens=value, **mode)


def test_generate_ids_refuses_no_tokens_and_no_new_tokens(loaded_tiny):
    import torch

    with pytest.raises(HeadwiseError, match=r"max_new_tokens 0"):
        loaded_tiny.generate_ids(torch.tensor([[1, 2, 3]]), max_new_tokens=0)
    with pytest.raises(HeadwiseError, match=r"input_ids of shape \(1, 0\): give \(batch, tokens\)"):
        loaded_tiny.generate_ids(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("policy, words", [
    ("h2o:=3", "--policy: '=3' is not key=value"),
    ("[1, 2]", "--policy: expected a mapping with a `type` (full, streaming, h2o, duo), got list"),
    ("h2o:heavy=lots,recent=4", "--policy.heavy: Input should be a valid integer"),
])
def test_cli_generate_names_what_is_wrong_with_a_policy(tiny_model_dir, capsys, policy, words):
    before = checksums(tiny_model_dir)
    assert main(["generate", str(tiny_model_dir), "Hello", "--policy", policy]) == 2
    assert words in capsys.readouterr().err
    assert checksums(tiny_model_dir) == before


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cli_names_a_model_path_that_is_missing_a_file_or_empty(tmp_path, capsys, command):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a model\n")
    before = checksums(a_file)
    extra = ["Hello"] if command == "generate" else ["--ppl", "--window", "16", "--max-windows", "1"]
    cases = [(str(tmp_path / "missing"), "does not exist"), (str(a_file), "is a file, not a model folder"),
             ("", "the model path is empty")]
    for path, words in cases:
        assert main([command, path, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and "a Hub id (owner/name) or an alias" in err, err
    assert checksums(a_file) == before


def test_load_refuses_a_bad_device_or_dtype_before_loading(tiny_model_dir):
    with pytest.raises(HeadwiseError, match=r"device 'gpu0' is not a device name: use cpu, cuda, cuda:N or mps"):
        headwise.load(str(tiny_model_dir), device="gpu0")
    with pytest.raises(HeadwiseError, match=r"dtype 'fp8' is not one of auto, float32, bfloat16, float16"):
        headwise.load(str(tiny_model_dir), dtype="fp8")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_load_refuses_cuda_without_a_gpu(tiny_model_dir):
    with pytest.raises(HeadwiseError, match=r"device 'cuda': no CUDA GPU is visible"):
        headwise.load(str(tiny_model_dir), device="cuda")


# ------------------------------------------------------------------------------------------------------------
# eval: options that would fail only after the model ran


def test_cli_eval_refuses_a_results_folder_that_is_a_file_before_running(tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "results"
    a_file.write_text("earlier notes\n")
    before = checksums(a_file, tiny_model_dir)
    for out in (a_file, a_file / "sub"):
        args = ["eval", str(tiny_model_dir), "--ppl", "--window", "16", "--max-windows", "1", "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"results folder {out}: {a_file} is a file, not a folder; choose another with --out DIR" in err, err
    assert checksums(a_file, tiny_model_dir) == before


def test_cli_eval_never_overwrites_a_results_file_it_did_not_write(tiny_model_dir, tmp_path, capsys):
    """A user's results.json in the --out folder is refused before the model runs; an earlier eval's own
    results in the same folder are replaced (the control: the refusal is about ownership, not existence)."""
    args = ["eval", str(tiny_model_dir), "--ppl", "--window", "16", "--max-windows", "1"]
    users = tmp_path / "mine"
    users.mkdir()
    (users / "results.json").write_text('{"my": "numbers"}\n')
    before = checksums(users)
    assert main([*args, "--out", str(users)]) == 2
    err = capsys.readouterr().err
    assert f"results folder {users} already holds results.json, which headwise eval did not write" in err, err
    assert checksums(users) == before

    ours = tmp_path / "ours"
    assert main([*args, "--out", str(ours)]) == 0
    assert main([*args, "--out", str(ours)]) == 0
    assert "ppl@16" in json.loads((ours / "results.json").read_text())


def test_cli_eval_names_a_bad_device(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval_out"
    assert main(["eval", str(tiny_model_dir), "--ppl", "--window", "16", "--max-windows", "1", "--out", str(out),
                 "--device", "accelerator"]) == 2
    assert "device 'accelerator' is not a device name" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# headwise_inference.json that is not what headwise wrote


def _config_variants(text: str) -> dict[str, bytes]:
    raw = json.loads(text)
    without_version = {k: v for k, v in raw.items() if k != "format_version"}
    return {
        "list": json.dumps([raw]).encode(),
        "missing_version": json.dumps(without_version).encode(),
        "newer_version": json.dumps({**raw, "format_version": 2}).encode(),
        "older_version": json.dumps({**raw, "format_version": 0}).encode(),
        "string_version": json.dumps({**raw, "format_version": "1"}).encode(),
        "boolean_version": json.dumps({**raw, "format_version": True}).encode(),
        "empty": b"",
        "binary": bytes(range(256)),
        "truncated": text.encode()[: len(text) // 2],
        "not_json": b"format_version = 1\n",
    }


CONFIG_CASES = {
    "list": ("holds a list, not a JSON object", "re-export"),
    "missing_version": ("format_version is missing", "re-export"),
    "newer_version": ("format_version 2 is newer than this headwise", "upgrade headwise"),
    "older_version": ("format_version 0 is not one this headwise", "re-export"),
    "string_version": ('format_version "1" is not a format version', "re-export"),
    "boolean_version": ("format_version true is not a format version", "re-export"),
    "empty": ("is empty", "re-export"),
    "binary": ("is binary, not JSON text", "re-export"),
    "truncated": ("is truncated", "re-export"),
    "not_json": ("is not valid JSON (line 1, column 1", "re-export"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_inference_config_problems_are_told_apart(export_copy, case):
    config = export_copy / CONFIG
    config.write_bytes(_config_variants(config.read_text())[case])
    before = checksums(export_copy)
    with pytest.raises(HeadwiseError) as e:
        headwise.load(str(export_copy))
    message = str(e.value)
    what, fix = CONFIG_CASES[case]
    assert str(config) in message and what in message and fix in message, message
    if fix != "upgrade headwise":  # only a file from a newer headwise is fixed by upgrading
        assert "upgrade" not in message, message
    assert checksums(export_copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", ["list", "binary"])
def test_inference_config_problems_through_the_real_command(export_copy, capsys, case):
    config = export_copy / CONFIG
    config.write_bytes(_config_variants(config.read_text())[case])
    before = checksums(export_copy)
    res = run_cli("generate", str(export_copy), "Hello")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("headwise: error: ") and CONFIG_CASES[case][0] in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert main(["push", str(export_copy), "--repo-id", "someone/model", "--dry-run"]) == 2
    assert CONFIG_CASES[case][0] in capsys.readouterr().err
    assert checksums(export_copy) == before


def test_truncated_weights_are_named_by_load_and_push(export_copy, capsys):
    weights = export_copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = checksums(export_copy)
    with pytest.raises(HeadwiseError, match=r"adapter_model.safetensors is damaged or cut short .*re-export"):
        headwise.load(str(export_copy))
    assert main(["push", str(export_copy), "--repo-id", "someone/model", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is damaged or cut short" in err and "headwise export RUN_DIR --overwrite" in err, err
    assert checksums(export_copy) == before


# ------------------------------------------------------------------------------------------------------------
# push: what is pushed must be a complete export


def test_push_dry_run_of_a_run_directory_resolves_its_export(trained, capsys):
    """The control for the refusals below: a run with an export and the export itself both pass the checks."""
    for path in (trained["run"], trained["export"]):
        assert main(["push", str(path), "--repo-id", "someone/model", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"from {trained['export']} -> someone/model" in out and "adapter_model.safetensors" in out, out


def test_push_of_a_moved_run_directory_takes_the_export_inside_it(trained, tmp_path, capsys):
    """A run folder copied elsewhere pushes its own export/, not the one at the output_dir its recipe names."""
    moved = Path(shutil.copytree(trained["run"], tmp_path / "moved-run"))
    assert main(["push", str(moved), "--repo-id", "someone/model", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"from {moved / 'export'} -> someone/model" in out, out


def test_push_names_what_is_not_an_export(trained, tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "model.safetensors"
    shutil.copy(tiny_model_dir / "model.safetensors", a_file)
    before = checksums(trained["bare_run"], tiny_model_dir, a_file)
    cases = [
        (tiny_model_dir, "is neither a headwise export folder (no headwise_inference.json) nor a run directory"),
        (trained["bare_run"], f"is a run directory without an export; run `headwise export {trained['bare_run']}`"),
        (tmp_path / "missing", "does not exist; give an export folder"),
        (a_file, "is a file; give the export folder that holds headwise_inference.json"),
    ]
    for path, words in cases:
        assert main(["push", str(path), "--repo-id", "someone/model", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"headwise: error: {path} {words}" in err, err
    assert checksums(trained["bare_run"], tiny_model_dir, a_file) == before


@pytest.mark.parametrize("damage, words", [
    ("README.md", "is incomplete: missing README.md"),
    ("tokenizer", "is incomplete: missing tokenizer.json"),
    ("recipe_yaml", "headwise_recipe.yaml is not readable YAML"),
])
def test_push_names_an_incomplete_export(export_copy, capsys, damage, words):
    if damage == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (export_copy / name).unlink()
    elif damage == "recipe_yaml":
        (export_copy / "headwise_recipe.yaml").write_text("export: {hub: [unclosed\n")
    else:
        (export_copy / damage).unlink()
    before = checksums(export_copy)
    # no --repo-id: the default comes from the export's recipe, which the YAML case cannot read
    assert main(["push", str(export_copy), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert words in err and ("re-export" in err or "re-run `headwise export" in err), err
    assert checksums(export_copy) == before
