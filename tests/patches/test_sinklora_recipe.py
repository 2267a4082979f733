"""The SinkLoRA smoke recipe (the quickstart) trains a few steps on CPU on the real SmolLM2, exports,
and the export loads back and generates; the 16K recipes resolve to the intended settings."""

from __future__ import annotations

import json

import pytest

from headwise.recipe.loader import load_recipe
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_quickstart_sinklora_trains_exports_and_generates(tmp_path):
    import headwise

    run_dir = tmp_path / "qs"
    res = run_cli("train", "quickstart", "training.max_steps=3", "data.num_samples=8", f"training.output_dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["global_step"] == 3
    res = run_cli("export", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    export = run_dir / "export"
    config = json.loads((export / "headwise_inference.json").read_text())
    assert config["method"] == "sinklora" and config["attention"]["name"] == "full"
    adapter = json.loads((export / "adapter_config.json").read_text())
    assert set(adapter["modules_to_save"]) >= {"embed_tokens", "norm"}  # LoRA+ trainables saved
    loaded = headwise.load(export)
    text = loaded.generate("The capital of France is", max_new_tokens=6)
    assert isinstance(text, str) and text.strip()


@pytest.mark.parametrize("name,sinks", [("sinklora-smollm2-16k", 4), ("longlora-smollm2-16k", 0)])
def test_16k_recipes_extend_context_with_the_same_budget(name, sinks):
    sink = load_recipe(name).recipe
    full = load_recipe("full-smollm2-16k").recipe
    assert sink.method.name == "sinklora" and sink.method.sinks == sinks and full.method.name == "full"
    assert sink.model.context_length == 16384 and sink.model.rope_scaling.factor == 2.0
    # Same data, steps and trainables: the comparison isolates attention.
    assert sink.data == full.data and sink.training.max_steps == full.training.max_steps
    assert sink.model == full.model and full.peft.trainable_modules == ["embed_tokens", "norm"]
