"""Recipe schema, inheritance, overrides and error messages (no model is loaded in this file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from headwise.recipe.loader import RecipeError, list_shipped_recipes, load_recipe
from tests.conftest import REPO, run_cli, write_recipe

GOOD = {"model": {"name": "smollm2-135m"}, "training": {"output_dir": "runs/x", "max_steps": 5}}


def _with(**sections) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in sections.items():
        data[key] = value if not isinstance(value, dict) else {**data.get(key, {}), **value}
    return data


# (id, recipe mapping, substrings the single error message must contain: the field and the fix)
MALFORMED = [
    ("unknown-top-level-key", {**GOOD, "trainng": {"max_steps": 3}}, ["trainng", "did you mean `training`"]),
    ("unknown-nested-key", _with(training={"learning_rat": 1e-4}), ["training.learning_rat", "did you mean `learning_rate`"]),
    ("wrong-type", _with(training={"max_steps": "ten"}), ["training.max_steps", "integer", "'ten'"]),
    ("missing-model", {"training": {"max_steps": 3}}, ["model", "required"]),
    ("missing-model-name", {"model": {"dtype": "float32"}}, ["model.name", "required"]),
    ("unknown-method", _with(method={"name": "sinklorra"}), ["method", "sinklorra", "full"]),
    ("bad-dtype", _with(model={"name": "smollm2-135m", "dtype": "float64"}), ["model.dtype", "float32"]),
    ("text-without-files", _with(data={"builder": "text"}), ["data", "builder `text` needs `files` or `dataset`"]),
    ("files-and-dataset", _with(data={"builder": "text", "files": ["a.txt"], "dataset": "x/y"}), ["data", "either `files` or `dataset`"]),
    ("corpus-with-files", _with(data={"builder": "corpus", "files": ["a.txt"]}), ["data", "use `builder: text`"]),
    ("lora-rank-zero", _with(peft={"r": 0}), ["peft.r", "greater than 0"]),
    ("deepspeed-unknown-preset", {**GOOD, "deepspeed": "zero4"}, ["deepspeed", "zero2, zero3, zero3_offload"]),
    ("deepspeed-missing-json", {**GOOD, "deepspeed": "nope/ds.json"}, ["deepspeed", "nope/ds.json", "does not exist"]),
    (
        "rope-factor-below-one",
        _with(model={"name": "smollm2-135m", "context_length": 16384, "rope_scaling": {"type": "linear", "factor": 0.5}}),
        ["model.rope_scaling.factor", "must be > 1"],
    ),
    ("rope-without-context", _with(model={"name": "smollm2-135m", "rope_scaling": {"factor": 2}}), ["model.context_length"]),
    (
        "max-length-over-context",
        _with(model={"name": "smollm2-135m", "context_length": 512}, data={"max_length": 1024}),
        ["data.max_length (1024) exceeds model.context_length (512)"],
    ),
    ("no-lora-adapter-export", _with(peft={"type": "none", "trainable_modules": ["norm"]}), ["export.format: merged"]),
    ("hub-repo-id-shape", _with(export={"hub": {"repo_id": "just-a-name"}}), ["export.hub.repo_id", "owner/name"]),
    ("resume-missing-checkpoint", _with(training={"resume": "runs/x/checkpoint-99"}), ["training.resume", "checkpoint-99"]),
]


@pytest.mark.parametrize("case_id,data,needles", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_recipe_names_field_and_fix(tmp_path, case_id, data, needles):
    path = write_recipe(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{case_id}: {needle!r} missing from:\n{message}"
    assert str(path) in message  # the file is named


def test_many_problems_reported_at_once(tmp_path):
    data = _with(training={"max_steps": "x", "learning_rat": 1}, peft={"r": -1})
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, data))
    assert "3 problems" in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: smollm2-135m\ntraining:\n  max_steps: [1, 2\n")
    with pytest.raises(RecipeError, match=r"broken\.yaml: line \d+, column \d+: not valid YAML"):
        load_recipe(path)


def test_recipe_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- training\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections"):
        load_recipe(path)


def test_missing_base_and_base_cycle(tmp_path):
    write_recipe(tmp_path, {"base": "nowhere.yaml", **GOOD}, "child.yaml")
    with pytest.raises(RecipeError, match=r"child\.yaml: base: recipe 'nowhere.yaml' not found"):
        load_recipe(tmp_path / "child.yaml")
    write_recipe(tmp_path, {"base": "b.yaml", **GOOD}, "a.yaml")
    write_recipe(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(RecipeError, match="`base:` chain loops"):
        load_recipe(tmp_path / "a.yaml")


def test_unknown_recipe_name_suggests_shipped_one():
    with pytest.raises(RecipeError, match="did you mean `quickstart`"):
        load_recipe("quickstar")


def test_base_inheritance_deep_merges_and_lists_replace(tmp_path):
    write_recipe(
        tmp_path,
        {**GOOD, "peft": {"r": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]}, "training": {"output_dir": "a", "seed": 7}},
        "parent.yaml",
    )
    write_recipe(tmp_path, {"base": "parent.yaml", "peft": {"target_modules": ["q_proj"]}, "training": {"max_steps": 9}}, "child.yaml")
    r = load_recipe(tmp_path / "child.yaml").recipe
    assert r.peft.r == 4  # inherited
    assert r.peft.target_modules == ["q_proj"]  # list replaced, not merged
    assert (r.training.seed, r.training.max_steps, r.training.output_dir) == (7, 9, "a")


def test_shipped_base_resolves_from_user_directory(tmp_path):
    write_recipe(tmp_path, {"base": "base/smollm2", "training": {"output_dir": "o"}})
    r = load_recipe(tmp_path / "recipe.yaml").recipe
    assert r.model.name == "smollm2-135m" and r.peft.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_overrides_beat_the_file_and_parse_yaml_values(tmp_path):
    path = write_recipe(tmp_path, GOOD)
    r = load_recipe(path, ["training.max_steps=20", "peft.target_modules=[q_proj,v_proj]", "training.learning_rate=3e-4", "~training.output_dir"]).recipe
    assert r.training.max_steps == 20
    assert r.peft.target_modules == ["q_proj", "v_proj"]
    assert r.training.learning_rate == pytest.approx(3e-4)
    assert r.training.output_dir == "runs/run"  # removed -> schema default


DUO_MINIMAL = {"method": {"name": "duo"}, "peft": {"type": "none", "trainable_modules": ["duo_gate"]},
               "export": {"format": "merged"}}


@pytest.mark.parametrize("base", [{"model": {"name": "smollm2-135m"}}, {"base": "base/smollm2"}], ids=["no-base", "base-smollm2"])
def test_duo_recipe_without_learning_rate_trains_at_duoattentions_rate(tmp_path, base):
    """DuoAttention trains its O(1) gates at 0.02; the LoRA default (2e-4) would barely move them. Neither a
    minimal recipe nor the shipped base preset sets a rate, so the method's default applies."""
    path = write_recipe(tmp_path, {**base, **DUO_MINIMAL})
    assert load_recipe(path).recipe.training.learning_rate == 0.02


def test_a_learning_rate_the_user_sets_beats_the_methods_default(tmp_path):
    in_file = write_recipe(tmp_path, {**GOOD, **DUO_MINIMAL, "training": {"learning_rate": 1e-3}}, "file.yaml")
    assert load_recipe(in_file).recipe.training.learning_rate == 1e-3
    # Set to the LoRA default explicitly: still the user's value, not replaced by Duo's.
    on_command_line = write_recipe(tmp_path, {**GOOD, **DUO_MINIMAL}, "cli.yaml")
    assert load_recipe(on_command_line, ["training.learning_rate=2e-4"]).recipe.training.learning_rate == 2e-4
    write_recipe(tmp_path, {**GOOD, "training": {"learning_rate": 5e-3}}, "parent.yaml")
    inherited = write_recipe(tmp_path, {"base": "parent.yaml", **DUO_MINIMAL}, "child.yaml")
    assert load_recipe(inherited).recipe.training.learning_rate == 5e-3


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "sinklora"}])
def test_methods_without_their_own_rate_keep_the_lora_default(tmp_path, method):
    path = write_recipe(tmp_path, {"base": "base/smollm2", "method": method})
    assert load_recipe(path).recipe.training.learning_rate == 2e-4


def test_cli_recipe_show_prints_the_duo_default(tmp_path):
    path = write_recipe(tmp_path, {"model": {"name": "smollm2-135m"}, **DUO_MINIMAL})
    shown = run_cli("recipe", "show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["training"]["learning_rate"] == 0.02


def test_override_errors_say_command_line(tmp_path):
    path = write_recipe(tmp_path, GOOD)
    with pytest.raises(RecipeError, match=r"training\.max_stepz \(set on the command line by `training\.max_stepz=3`\): unknown key; did you mean `max_steps`"):
        load_recipe(path, ["training.max_stepz=3"])
    with pytest.raises(RecipeError, match="is not `key.sub=value`"):
        load_recipe(path, ["training.max_steps"])


def test_error_names_the_file_that_set_the_field(tmp_path):
    write_recipe(tmp_path, {**GOOD, "training": {"output_dir": "o", "warmup_steps": -3}}, "parent.yaml")
    write_recipe(tmp_path, {"base": "parent.yaml", "training": {"max_steps": 4}}, "child.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "child.yaml")
    assert f"training.warmup_steps (set in {tmp_path / 'parent.yaml'})" in str(info.value)


@pytest.mark.parametrize("name", list_shipped_recipes())
def test_every_shipped_recipe_validates(name):
    loaded = load_recipe(name)
    # The resolved YAML round-trips to the same recipe (it is what is saved beside each run).
    again = yaml.safe_load(loaded.resolved_yaml())
    assert type(loaded.recipe).model_validate(again) == loaded.recipe


def test_cli_recipe_show_and_validate(tmp_path):
    shown = run_cli("recipe", "show", "quickstart", "training.max_steps=3")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["training"]["max_steps"] == 3
    bad = write_recipe(tmp_path, {**GOOD, "trainng": {}}, "bad.yaml")
    res = run_cli("recipe", "validate", "quickstart", str(bad))
    assert res.returncode == 2
    assert "ok      quickstart" in res.stdout and "did you mean `training`" in res.stdout


def test_cli_train_fails_fast_without_touching_disk(tmp_path):
    out = tmp_path / "run"
    bad = write_recipe(tmp_path, {"model": {"name": "smollm2-135m"}, "training": {"output_dir": str(out), "max_steps": "x"}})
    res = run_cli("train", str(bad))
    assert res.returncode == 2
    assert "training.max_steps" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_recipe_reference_page_is_current():
    """docs/recipes.md's field reference is rendered from the schema's help strings; regenerate it with
    `python -m headwise.recipe.reference` when this fails."""
    from headwise.recipe.reference import render_recipe_reference

    page = (REPO / "docs" / "recipes.md").read_text()
    assert render_recipe_reference() in page
