"""The documented multi-GPU path, run for real on CPU: `accelerate launch` with 2 processes under
DeepSpeed ZeRO-2 and ZeRO-3 (DS_ACCELERATOR=cpu, gloo), then the saved adapter reloads with
non-empty, trained weights (the ZeRO-3 empty-adapter trap)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources

import pytest
import torch
import yaml

from suite_rules import missing_dependency, require_or_skip
from tests.conftest import REPO, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow
if shutil.which("g++") is None:
    missing_dependency("g++ is not on PATH: DeepSpeed on CPU JIT-builds its comm op with it")
deepspeed = require_or_skip("deepspeed", "pip install 'headwise[deepspeed]'")


def _accelerate_config(tmp_path, stage: str, port: int):
    """The shipped ds_configs/<stage>.yaml, pointed at the shipped JSON by absolute path."""
    cfg = yaml.safe_load((REPO / "ds_configs" / f"{stage}.yaml").read_text())
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(resources.files("headwise.ds_configs") / f"{stage}.json")
    cfg["main_process_port"] = port
    path = tmp_path / f"accelerate-{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", [None, "sinklora"], ids=["lora", "sinklora"])
@pytest.mark.parametrize("stage,port", [("zero2", 29511), ("zero3", 29512)])
def test_accelerate_launch_deepspeed_two_cpu_processes(tmp_path, tiny_model_dir, stage, port, method):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    # The logit-free loss, as the DeepSpeed recipes use it. Plain LoRA leaves the head a frozen Linear:
    # its gradients come from the forward (under ZeRO-3 with the weight gathered for it). SinkLoRA
    # trains the embeddings, tied to the head in this model, so the head is a PEFT wrapper: checkpointed
    # module calls (reentrant under ZeRO-3, whose hooks must gather the head in the recompute).
    data = tiny_recipe(tiny_model_dir, run_dir, max_steps=3, per_device_train_batch_size=2, fused_cross_entropy="auto")
    if method:
        data["method"] = {"name": method}
    recipe = write_recipe(tmp_path, data)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(_accelerate_config(tmp_path, stage, port)),
        "-m", "headwise", "train", str(recipe),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]

    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert losses and all(0 < x < 20 for x in losses)  # a real cross-entropy (ln 49K = 10.8 at init), not 0 or NaN
    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert saved and all(t.numel() > 0 for t in saved.values())
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # trained, not the zero init

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(run_dir / "final"))
    params = dict(model.named_parameters())
    for key, tensor in lora_b.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(params[name].detach(), tensor)
