"""Chat/SFT data through TRL's SFTTrainer (loss on answers only), packed and unpacked."""

from __future__ import annotations

import json

import pytest

from headwise.recipe.loader import load_recipe
from headwise.train.trainer import train
from tests.conftest import tiny_recipe, write_recipe


@pytest.mark.parametrize("packing", [False, True])
def test_sft_recipe_trains_on_answers_only(tmp_path, tiny_model_dir, packing):
    data = tiny_recipe(tiny_model_dir, tmp_path / "run", max_steps=2)
    data["data"] = {"builder": "sft", "max_length": 128, "num_samples": 8, "packing": packing}
    result = train(load_recipe(write_recipe(tmp_path, data)))
    assert type(result.trainer).__name__ == "HeadwiseSFTTrainer"
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    # TRL masked the prompts: fewer supervised tokens than input tokens in every training row.
    batch = next(iter(result.trainer.get_train_dataloader()))
    supervised = (batch["labels"] != -100).sum().item()
    assert 0 < supervised < batch["input_ids"].numel()
