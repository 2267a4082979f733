"""`training.seed` makes a run repeatable: the same recipe and seed start from the same adapter
(every tensor equal) and give the same loss curve and final adapter; another seed starts elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from headwise.patches.base import method_for
from headwise.recipe.loader import validate_mapping
from headwise.train.trainer import build_training_model
from tests.conftest import run_cli, tiny_recipe, write_recipe


def _step0_adapter(model_dir, tmp_path, seed: int) -> dict[str, torch.Tensor]:
    """The trainable tensors of the model as `headwise train` builds it before its first step."""
    from peft import get_peft_model_state_dict

    recipe = validate_mapping(tiny_recipe(model_dir, tmp_path / "run", seed=seed))
    model = build_training_model(recipe, method_for(recipe.method))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_step0_adapter_follows_the_seed(tmp_path, tiny_model_dir):
    first = _step0_adapter(tiny_model_dir, tmp_path, seed=7)
    torch.rand(1000)  # whatever ran before must not matter
    again = _step0_adapter(tiny_model_dir, tmp_path, seed=7)
    other = _step0_adapter(tiny_model_dir, tmp_path, seed=8)

    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    lora_a = [k for k in first if "lora_A" in k]
    assert lora_a and all(not torch.equal(first[k], other[k]) for k in lora_a)


def _losses(run_dir) -> list[tuple[int, float]]:
    history = json.loads((run_dir / "run_summary.json").read_text())["log_history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


@pytest.mark.slow
def test_same_recipe_and_seed_train_identically(tmp_path, tiny_model_dir):
    runs = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        # LoRA dropout on, so the dropout masks are part of what must repeat.
        data = tiny_recipe(tiny_model_dir, run_dir, max_steps=4, save_steps=1, save_total_limit=4, seed=7)
        data["peft"] = {"dropout": 0.1}
        res = run_cli("train", str(write_recipe(tmp_path, data, f"{name}.yaml")))
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(run_dir)
    a, b = runs

    assert len(_losses(a)) == 4 and _losses(a) == _losses(b)
    final_a, final_b = (load_file(str(r / "final" / "adapter_model.safetensors")) for r in runs)
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)

    # `train` starts from the seeded step-0 adapter: LoRA B starts at zero, so the first step gives
    # A no gradient and checkpoint-1 still holds A's initial values.
    step1 = load_file(str(a / "checkpoint-1" / "adapter_model.safetensors"))
    step0 = _step0_adapter(tiny_model_dir, tmp_path, seed=7)
    lora_a = [k for k in step0 if "lora_A" in k]
    assert lora_a and all(torch.equal(step1[k], step0[k]) for k in lora_a)
