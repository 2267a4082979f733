"""A run that trains the input embedding of a model whose output head is tied to it (SmolLM2, LongLoRA's LoRA+ in
`method: sinklora`): the head must follow the trained embedding in training and after every way back from disk
(`headwise.load` of the export, a merged export, the Trainer's resume of a checkpoint), with the logits of the model
that was trained. Runs the real pipeline on the tiny tied Llama of conftest (seconds)."""

from __future__ import annotations

import pytest
import torch

from headwise.recipe.loader import load_recipe
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def _embedding_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    return model.get_input_embeddings(), model.get_output_embeddings()


def _trained_copy(wrapper) -> torch.nn.Parameter:
    """The trained copy of a module PEFT wraps to train it fully (`modules_to_save`)."""
    return wrapper.modules_to_save["default"].weight


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    from headwise.train.trainer import train

    root = tmp_path_factory.mktemp("tied")
    recipe = tiny_recipe(tiny_model_dir, root / "run", max_steps=2, save_steps=2, learning_rate=1e-2,
                         warmup_steps=0, lr_scheduler_type="constant")
    recipe["method"] = {"name": "sinklora", "group_size": 16, "sinks": 4}  # trains embeddings and norms by default
    loaded = load_recipe(write_recipe(root, recipe))
    result = train(loaded)
    model = result.model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    return root / "run", loaded.recipe, model, ids, logits


def test_training_moves_the_embedding_and_the_head_follows_it(trained):
    _, _, model, _, _ = trained
    embedding, head = _embedding_and_head(model)
    assert _trained_copy(head) is _trained_copy(embedding)
    assert not torch.equal(_trained_copy(embedding), embedding.original_module.weight)  # the run changed it


def test_headwise_load_of_the_adapter_export_gives_the_trained_logits(trained):
    import headwise
    from headwise.publish.export import export_run

    run_dir, _, model, ids, logits = trained
    export = export_run(run_dir, out_dir=run_dir.parent / "adapter-export")
    reloaded = headwise.load(export, device="cpu").model
    embedding, head = _embedding_and_head(reloaded)
    assert _trained_copy(head) is _trained_copy(embedding)
    torch.testing.assert_close(_trained_copy(embedding), _trained_copy(_embedding_and_head(model)[0]), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)


def test_merged_export_keeps_the_head_tied_to_the_trained_embedding(trained):
    from transformers import AutoModelForCausalLM

    from headwise.publish.export import export_run

    run_dir, _, model, ids, logits = trained
    merged = AutoModelForCausalLM.from_pretrained(str(export_run(run_dir, out_dir=run_dir.parent / "merged", format="merged")))
    merged.eval()
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(merged.get_input_embeddings().weight, _trained_copy(_embedding_and_head(model)[0]),
                               rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits)


def test_resume_loads_the_checkpoint_into_the_tied_training_model(trained):
    """What the Trainer does on resume (`load_adapter(checkpoint, is_trainable=True)` on the model `train` builds)
    restores every trained tensor, the tied head included."""
    from headwise.patches.base import method_for
    from headwise.train.trainer import build_training_model

    run_dir, recipe, model, _, _ = trained
    fresh = build_training_model(recipe, method_for(recipe.method))
    fresh.load_adapter(str(run_dir / "checkpoint-2"), "default", is_trainable=True)
    embedding, head = _embedding_and_head(fresh)
    assert _trained_copy(head) is _trained_copy(embedding)
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    restored = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    assert restored.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0, msg=name)


def test_peft_loader_needs_the_tied_copy_under_both_names(trained, tmp_path):
    """Why the adapter holds the trained embedding twice: PEFT's own loader (the one a user of the Hub folder calls)
    refuses an adapter whose tied `lm_head` copy is left out. The day it accepts one copy, this fails, and the export
    should then save the matrix once."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from headwise.publish.export import export_run

    run_dir, recipe, _, _, _ = trained
    export = export_run(run_dir, out_dir=tmp_path / "export")
    one_copy = tmp_path / "one-copy"
    shutil.copytree(export, one_copy)
    weights = one_copy / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = {name: t for name, t in tensors.items() if "lm_head" not in name}
    assert len(dropped) == len(tensors) - 1  # exactly the tied copy
    save_file(dropped, str(weights), metadata={"format": "pt"})
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name)
    with pytest.raises(KeyError, match="lm_head"):
        PeftModel.from_pretrained(base, str(one_copy))
