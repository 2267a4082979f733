"""End to end on the real embedded SmolLM2-135M: train a few LoRA steps, export (adapter and merged),
reload with plain transformers/peft and with `headwise.load`, and compare generations token for token
with the model that was trained in memory. Also the Hub push up to the network call."""

from __future__ import annotations

import json

import pytest
import torch

from headwise.recipe.loader import load_recipe
from tests.conftest import run_cli, write_recipe

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
NEW_TOKENS = 12


def _greedy(model, tokenizer) -> list[int]:
    enc = tokenizer(PROMPT, return_tensors="pt")
    model.eval()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Six LoRA steps on SmolLM2 with a learning rate high enough to change its greedy output."""
    from headwise.train.trainer import train

    root = tmp_path_factory.mktemp("smollm2-run")
    recipe = {
        "base": "base/smollm2",
        "data": {"builder": "corpus", "max_length": 64, "num_samples": 24, "limit_documents": 30},
        "peft": {"r": 8, "alpha": 32},
        "training": {
            "output_dir": str(root / "run"),
            "max_steps": 6,
            "learning_rate": 3e-3,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "save_steps": 3,
            "logging_steps": 1,
        },
        "export": {"hub": {"repo_id": "someone/smollm2-headwise-test"}},
    }
    result = train(load_recipe(write_recipe(root, recipe)))
    tokens = _greedy(result.model, result.tokenizer)
    return root / "run", tokens, result


def test_training_writes_run_dir_and_learns(trained):
    run_dir, _, result = trained
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["global_step"] == 6
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) == 6 and all(l == l for l in losses)  # logged every step, no NaN
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "final" / "adapter_model.safetensors").is_file()
    # LoRA B matrices start at zero: after training they must not be.
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_training_changed_the_model(trained, tmp_path):
    """The base model answers differently: otherwise the reload tests below could pass on the base."""
    from headwise.models import load_model, load_tokenizer
    from headwise.recipe.schema import ModelSection

    section = ModelSection(name="smollm2-135m")
    base_tokens = _greedy(load_model(section, training=False), load_tokenizer(section))
    assert base_tokens != trained[1]


def test_adapter_export_reloads_with_plain_peft_and_headwise(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import headwise
    from headwise.models import SMOLLM2_GGUF, resolve_model_source

    run_dir, tokens, _ = trained
    res = run_cli("export", str(run_dir))
    assert res.returncode == 0, res.stderr
    export = run_dir / "export"
    for name in ("adapter_config.json", "adapter_model.safetensors", "headwise_inference.json", "README.md", "tokenizer.json"):
        assert (export / name).is_file(), name
    assert json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    # Plain transformers + peft, base from the local GGUF (no network here).
    base_dir = resolve_model_source("smollm2-135m").path
    base = AutoModelForCausalLM.from_pretrained(base_dir, gguf_file=SMOLLM2_GGUF)
    plain = PeftModel.from_pretrained(base, str(export))
    assert _greedy(plain, AutoTokenizer.from_pretrained(str(export))) == tokens

    loaded = headwise.load(export)
    assert loaded.config.weights == "adapter" and loaded.config.kv_policy.type == "full"
    assert _greedy(loaded.model, loaded.tokenizer) == tokens
    text = loaded.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert text == loaded.tokenizer.decode(tokens, skip_special_tokens=True)

    card = (export / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card and "max_steps: 6" in card


def test_merged_export_reloads_with_plain_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, tokens, _ = trained
    out = tmp_path / "merged"
    res = run_cli("export", str(run_dir), "--format", "merged", "--out", str(out))
    assert res.returncode == 0, res.stderr
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # GGUF marks dropped: plain from_pretrained works
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert _greedy(model, AutoTokenizer.from_pretrained(str(out))) == tokens


def test_export_refuses_to_overwrite(trained, tmp_path):
    run_dir, _, _ = trained
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    res = run_cli("export", str(run_dir), "--out", str(out))
    assert res.returncode == 2 and "precious.txt" in res.stderr and "--overwrite" not in res.stderr
    assert (out / "precious.txt").read_text() == "mine"


def test_push_dry_run_checks_folder_and_never_shows_token(trained):
    run_dir, _, _ = trained
    export = run_dir / "export"
    if not export.is_dir():
        assert run_cli("export", str(run_dir)).returncode == 0
    secret = "hf_headwiseTestSecretToken123"
    res = run_cli("push", str(run_dir), "--dry-run", env={"HF_TOKEN": secret, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert "someone/smollm2-headwise-test (private)" in res.stdout  # repo id from the recipe
    assert "adapter_model.safetensors" in res.stdout and "dry run" in res.stdout
    assert secret not in res.stdout + res.stderr
    for f in export.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".yaml", ".jinja"):
            assert secret not in f.read_text()
    bad = run_cli("push", str(export), "--repo-id", "no-owner", "--dry-run")
    assert bad.returncode == 2 and "owner/name" in bad.stderr
    # The real upload path up to the network: huggingface_hub refuses offline, headwise reports it
    # in one line without the token.
    real = run_cli("push", str(run_dir), env={"HF_TOKEN": secret, "HF_HUB_OFFLINE": "1"})
    assert real.returncode == 2 and "someone/smollm2-headwise-test failed" in real.stderr
    assert secret not in real.stdout + real.stderr and "Traceback" not in real.stderr
