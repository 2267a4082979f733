"""Recipe strictness on bad input: duplicate keys, strict numbers and booleans (with YAML 1.2 floats
such as `2e-4`), files that are not UTF-8 text, an empty LoRA target list, training past the model's
native context, and errors caused by command-line overrides naming the override.

Recipes are written as text where the exact YAML spelling matters (quotes, `2e-4`, a key twice).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from headwise.cli import main as cli_main
from headwise.recipe.loader import RecipeError, list_shipped_recipes, load_recipe, shipped_recipes_dir
from tests.conftest import REPO, run_cli, write_recipe

GOOD = {"model": {"name": "smollm2-135m"}, "training": {"output_dir": "runs/x", "max_steps": 5}}


def _text_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _checksums(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def _problem(path: Path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


# ----------------------------------------------------------------------------------- duplicate keys


def test_duplicate_key_names_file_key_and_both_lines(tmp_path):
    path = _text_recipe(
        tmp_path,
        "model:\n  name: smollm2-135m\ntraining:\n  max_steps: 3\n  learning_rate: 1.0e-4\n  max_steps: 5\n",
    )
    message = _problem(path)
    assert str(path) in message
    assert "`training.max_steps`" in message and "lines 4 and 6" in message


def test_duplicate_section_and_duplicate_in_override_value(tmp_path):
    path = _text_recipe(tmp_path, "model:\n  name: smollm2-135m\npeft:\n  r: 4\npeft:\n  r: 8\n")
    message = _problem(path)
    assert "`peft`" in message and "lines 3 and 5" in message
    good = write_recipe(tmp_path, GOOD, "good.yaml")
    message = _problem(good, ["peft={r: 4, r: 8}"])
    assert "override 'peft={r: 4, r: 8}'" in message and "`peft.r` is given twice" in message


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """A `<<:` merge followed by an explicit key is YAML's way to override, not a duplicate."""
    path = _text_recipe(tmp_path, "model:\n  name: smollm2-135m\ntraining:\n  <<: {max_steps: 3, seed: 1}\n  max_steps: 7\n")
    r = load_recipe(path).recipe
    assert (r.training.max_steps, r.training.seed) == (7, 1)


# ------------------------------------------------------------------------------------- strict types


STRICT_CASES = [
    # (the exact field, recipe YAML that sets it wrongly)
    ("training.max_steps", "training:\n  max_steps: true\n"),
    ("training.bf16", 'training:\n  bf16: "yes"\n'),
    ("training.gradient_checkpointing", "training:\n  gradient_checkpointing: 1\n"),
    ("training.learning_rate", "training:\n  learning_rate: true\n"),
    ("training.learning_rate", 'training:\n  learning_rate: "0.001"\n'),
    ("training.num_train_epochs", 'training:\n  num_train_epochs: "2"\n'),
    ("data.max_length", 'data:\n  max_length: "512"\n'),
    ("data.packing", 'data:\n  packing: "no"\n'),
    ("peft.r", "peft:\n  r: true\n"),
    ("peft.dropout", 'peft:\n  dropout: "0.1"\n'),
    ("model.trust_remote_code", 'model:\n  name: smollm2-135m\n  trust_remote_code: "false"\n'),
    ("model.context_length", 'model:\n  name: smollm2-135m\n  context_length: "16384"\n'),
    ("training.max_steps", "training:\n  max_steps: 10.0\n"),  # a float is not a step count
    ("method.sinks", "method:\n  name: sinklora\n  sinks: true\n"),
    ("method.train_embeddings_and_norms", 'method:\n  name: sinklora\n  train_embeddings_and_norms: "true"\n'),
    ("method.gate_lambda", "method:\n  name: duo\n  gate_lambda: true\n"),
    ("method.haystack.n_keys", 'method:\n  name: duo\n  haystack:\n    n_keys: "10"\n'),
]


@pytest.mark.parametrize("field,text", STRICT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(STRICT_CASES)])
def test_bools_and_strings_refused_where_numbers_or_bools_are_expected(tmp_path, field, text):
    body = text if text.startswith("model:") else "model:\n  name: smollm2-135m\n" + text
    path = _text_recipe(tmp_path, body)
    message = _problem(path)
    assert f"{field} (set in {path})" in message, message
    assert "1 problem" in message


@pytest.mark.parametrize(
    "numeral,value",
    [("2e-4", 0.0002), ("2E-4", 0.0002), ("2.0e-4", 0.0002), ("1e-3", 0.001), ("5e+1", 50.0), (".5", 0.5), ("3", 3.0)],
)
def test_scientific_numerals_are_floats_in_files_and_overrides(tmp_path, numeral, value):
    path = _text_recipe(tmp_path, f"model:\n  name: smollm2-135m\ntraining:\n  learning_rate: {numeral}\n")
    lr = load_recipe(path).recipe.training.learning_rate
    assert type(lr) is float and lr == pytest.approx(value)
    good = write_recipe(tmp_path, GOOD, "good.yaml")
    lr = load_recipe(good, [f"training.learning_rate={numeral}"]).recipe.training.learning_rate
    assert type(lr) is float and lr == pytest.approx(value)


def test_integers_stay_integers_and_strings_stay_strings(tmp_path):
    """The YAML 1.2 float rule does not turn plain integers (or ordinary words) into floats."""
    path = _text_recipe(
        tmp_path,
        "model:\n  name: smollm2-135m\n  revision: main\ntraining:\n  max_steps: 12\n  seed: 0\n  output_dir: runs/e5\n",
    )
    t = load_recipe(path).recipe.training
    assert (t.max_steps, t.seed, t.output_dir) == (12, 0, "runs/e5")
    assert type(t.max_steps) is int and type(t.seed) is int
    # an exponent numeral is a float, so an integer field refuses it
    message = _problem(path, ["training.max_steps=1e3"])
    assert "training.max_steps (set on the command line by `training.max_steps=1e3`)" in message


# ---------------------------------------------------------------------------------- unreadable files


def test_recipe_not_utf8_names_file_and_byte_position(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: café\n".encode("latin-1"))
    message = _problem(path)
    assert str(path) in message and "not UTF-8" in message and "byte position 18, line 2, column 12" in message


@pytest.mark.slow
def test_cli_validate_reports_every_file(tmp_path):
    """`recipe validate A B C ...` gives each file its verdict, whatever is wrong with the one before;
    no traceback; nothing on disk changes."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model:\n  name: café\n".encode("latin-1"))
    binary = tmp_path / "model.bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"model:\n  name: smollm2-135m\x00\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    comments = tmp_path / "comments.yaml"
    comments.write_text("# nothing but a comment\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    duplicate = _text_recipe(tmp_path, "model:\n  name: smollm2-135m\n  name: other\n", "dup.yaml")
    good = write_recipe(tmp_path, GOOD, "good.yaml")
    files = [latin1, binary, nul, empty, comments, folder, duplicate, good]
    before = _checksums(files)

    res = run_cli("recipe", "validate", *map(str, files))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stdout.splitlines()
    verdicts = [line for line in lines if line.startswith(("ok ", "invalid "))]
    assert len(verdicts) == len(files), res.stdout
    expected = [
        (latin1, "not UTF-8 text (byte 0xe9 at byte position 18, line 2, column 12)"),
        (binary, "not UTF-8 text (byte 0x80 at byte position 128"),
        (nul, "character #x0000 at line 2, column 21 is not allowed in YAML"),
        (empty, "is empty"),
        (comments, "is empty"),
        (folder, "is a directory"),
        (duplicate, "key `model.name` is given twice (lines 2 and 3)"),
    ]
    for verdict, (path, needle) in zip(verdicts, expected):
        assert verdict.startswith("invalid ") and str(path.name) in verdict and needle in verdict, verdict
    assert verdicts[-1] == f"ok      {good}"
    assert _checksums(files) == before


# ------------------------------------------------------------------------------------ PEFT targets


def test_empty_lora_target_modules_refused_at_validation(tmp_path):
    path = _text_recipe(tmp_path, "model:\n  name: smollm2-135m\npeft:\n  target_modules: []\n")
    message = _problem(path)
    assert f"peft.target_modules (set in {path})" in message
    assert "is empty" in message and "all-linear" in message and "peft.type: none" in message
    # full training of listed modules needs no LoRA targets
    path.write_text(
        "model:\n  name: smollm2-135m\npeft:\n  type: none\n  target_modules: []\n  trainable_modules: [norm]\n"
        "export:\n  format: merged\n"
    )
    assert load_recipe(path).recipe.peft.target_modules == []


# -------------------------------------------------------------------------------- native context


def _saved_config(directory: Path, max_positions: int) -> Path:
    """A model directory holding only a real config.json (all `load_config` reads)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=128, max_position_embeddings=max_positions,
    ).save_pretrained(directory)
    return directory


def test_training_length_past_native_context_is_refused(tmp_path):
    from headwise.models import ModelLoadError, check_training_length, load_config
    from headwise.recipe.schema import ModelSection

    model_dir = _saved_config(tmp_path / "m", 1024)
    section = ModelSection(name=str(model_dir))
    config = load_config(section)
    check_training_length(config, section, 1024)  # exactly the native length is fine
    with pytest.raises(ModelLoadError) as info:
        check_training_length(config, section, 1025)
    message = str(info.value)
    for needle in ("data.max_length 1025", "1024 positions", "model.context_length", "model.rope_scaling", "lower data.max_length"):
        assert needle in message, message
    # with the context extended (RoPE scaling) the same length trains
    extended = ModelSection(name=str(model_dir), context_length=2048, rope_scaling={"type": "linear", "factor": 2})
    check_training_length(load_config(extended), extended, 2048)


@pytest.mark.slow
def test_cli_train_past_native_context_stops_before_loading(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path,
        {"model": {"name": str(tiny_model_dir)}, "data": {"builder": "corpus", "max_length": 1500},
         "training": {"output_dir": str(out), "max_steps": 1}},
    )
    res = run_cli("train", str(recipe))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "headwise: error: data.max_length 1500 exceeds the 1024 positions" in res.stderr
    assert "model.rope_scaling" in res.stderr and "lower data.max_length" in res.stderr
    assert not out.exists()  # refused before the run directory (or any weights) was touched


# ------------------------------------------------------------------------------ override provenance


TEXT_BASE = {
    "model": {"name": "smollm2-135m", "context_length": 2048},
    "method": {"name": "sinklora", "sinks": 0},
    "data": {"builder": "text", "files": ["a.txt"]},
}

PROVENANCE_CASES = [
    # (overrides, what the error must say about where the bad value came from)
    (["training.max_steps=x"], "training.max_steps (set on the command line by `training.max_steps=x`)"),
    (["training.max_stepz=3"], "training.max_stepz (set on the command line by `training.max_stepz=3`)"),
    (["training={max_steps: x}"], "training.max_steps (set on the command line by `training={max_steps: x}`)"),
    (["method.sinks=-1"], "method.sinks (set on the command line by `method.sinks=-1`)"),
    (["method={name: duo, sink: -1}"], "method.sink (set on the command line by `method={name: duo, sink: -1}`)"),
    (["training.bf16='yes'"], "training.bf16 (set on the command line by `training.bf16='yes'`)"),
    (["~model.name"], "model.name (removed on the command line by `~model.name`): required but missing"),
    (["~data.files"], "data (set in {file}; changed on the command line by `~data.files`)"),
    (["data.builder=corpus"], "data (set in {file}; changed on the command line by `data.builder=corpus`)"),
    (["method.name=duo"], "method.sinks (set in {file}; changed on the command line by `method.name=duo`): unknown key"),
    (
        ["training.max_steps=3", "data.max_length=4096"],
        "(set in {file}; changed on the command line by `data.max_length=4096`): data.max_length (4096) exceeds",
    ),
]


@pytest.mark.parametrize("overrides,needle", PROVENANCE_CASES, ids=[" ".join(c[0]) for c in PROVENANCE_CASES])
def test_errors_caused_by_overrides_name_the_override(tmp_path, overrides, needle):
    path = write_recipe(tmp_path, TEXT_BASE)
    message = _problem(path, overrides)
    assert needle.replace("{file}", str(path)) in message, message
    assert "1 problem" in message


def test_export_override_errors_name_the_override(tmp_path):
    """`headwise export RUN method.x=...` validates the run's saved recipe.yaml plus the override."""
    from headwise.train.run_dir import RunDirError, read_run_recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(load_recipe("duo-smollm2").resolved_yaml())
    with pytest.raises(RunDirError) as info:
        read_run_recipe(run, ["method.streaming_fraction=2"])
    assert "method.streaming_fraction (set on the command line by `method.streaming_fraction=2`)" in str(info.value)


# --------------------------------------------------------------------------------- shipped recipes


def _shipped_files() -> list[Path]:
    root = shipped_recipes_dir()
    return sorted(root.glob("*.yaml")) + sorted((root / "base").glob("*.yaml"))


@pytest.mark.slow
def test_every_shipped_recipe_validates_with_the_cli_and_files_stay_unchanged():
    files = _shipped_files()
    assert len(files) == len(list_shipped_recipes())
    before = _checksums(files)
    res = run_cli("recipe", "validate", *map(str, files), cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines() == [f"ok      {f}" for f in files]
    assert _checksums(files) == before


def _leaves(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, data


@pytest.mark.parametrize("name", list_shipped_recipes())
def test_shown_shipped_recipe_keeps_every_written_value_and_type(name, capsys, tmp_path):
    """`recipe show` prints each value the recipe file writes, with its YAML type (an int stays an
    int, a bool a bool; an int written for a float field becomes that float); the shown recipe is
    also what a run saves, and a run's saved recipe validates again."""
    assert cli_main(["recipe", "show", name]) == 0
    shown_text = capsys.readouterr().out
    shown = yaml.safe_load(shown_text)
    written = yaml.safe_load((shipped_recipes_dir() / f"{name}.yaml").read_text())
    written.pop("base", None)
    for path, value in _leaves(written):
        got = shown
        for key in path:
            got = got[key]
        where = ".".join(path)
        if isinstance(value, bool) or value is None:
            assert got is value, where
        elif isinstance(value, int) and isinstance(got, float):
            assert got == float(value), where
        else:
            assert type(got) is type(value) and got == value, where
    # the saved copy of this output beside a run validates (export reads it back)
    from headwise.train.run_dir import read_run_recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(shown_text)
    assert read_run_recipe(run).model_dump(mode="json") == shown


def test_show_of_a_hand_written_reference_recipe(tmp_path, capsys):
    path = _text_recipe(
        tmp_path,
        "model:\n  name: smollm2-135m\n"
        "method:\n  name: sinklora\n  group_ratio: 0.25\n  sinks: 0\n"
        "peft:\n  r: 16\n  target_modules: [q_proj, v_proj]\n"
        "training:\n  learning_rate: 2e-4\n  num_train_epochs: 2\n  max_steps: 10\n  bf16: false\n",
    )
    before = _checksums([path])
    assert cli_main(["recipe", "show", str(path)]) == 0
    text = capsys.readouterr().out
    for line in ("  learning_rate: 0.0002\n", "  num_train_epochs: 2.0\n", "  max_steps: 10\n", "  bf16: false\n",
                 "  r: 16\n", "  - q_proj\n  - v_proj\n", "  group_ratio: 0.25\n", "  sinks: 0\n"):
        assert line in text, line
    shown = yaml.safe_load(text)
    assert shown["training"]["learning_rate"] == 0.0002 and type(shown["training"]["learning_rate"]) is float
    assert shown["method"]["name"] == "sinklora" and shown["model"]["name"] == "smollm2-135m"
    assert _checksums([path]) == before
