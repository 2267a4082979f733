"""`method: moh`'s balance loss under every trainer path (issue 21): the loss each optimizer step minimises is the
language-model loss plus `balance_weight` times the mean over layers of each layer's Switch-style balance loss, its
gradient reaches the learned router, and each log step records the per-layer values and the weighted total.

Real runs of the recipe path (`headwise.train.trainer.train`) on the tiny Llama of conftest, observed by a probe
that wraps the built trainer's `training_step`: before each micro-batch it runs a second forward of the same batch
with the same weights (eval mode: the same routing, nothing recorded by the model) and computes, independently of
headwise's loss code,

- the summed next-token cross-entropy (torch's `cross_entropy` on the full logits) and its token count;
- per layer, the balance loss by hand from the learned router's weights and the attention block's input:
  `p = softmax(h W_r^T)` over the R routed heads, `chosen` = top-k of `p`, `R * sum_i mean(p_i) * mean(chosen_i)`
  over every position of the batch (the released MoH code's form);
- the gradient of the mean over layers of those balance losses with respect to each layer's `W_r`.

An optimizer step over micro-batches m (on every rank) then minimises
`sum_m CE_m / sum_m tokens_m + balance_weight * mean_m(mean over layers of balance_m)` (the accumulated batch's
token mean, as transformers normalises with `num_items_in_batch`), and the step's summed `training_step` losses
(averaged over ranks: DeepSpeed averages the gradients) must equal it.

On the tiny model (4 heads, activation 0.75, shared 0.5) one of the 2 routed heads is chosen per token, so a
routed gate is `p_c / p_c = 1`: the language-model loss gives `W_r` no gradient, and only the balance loss moves it
(with balance_weight 0 it stays at its zero initialisation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
import yaml

from headwise.recipe.loader import load_recipe
from tests.conftest import REPO, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

ROUTER = {"name": "moh", "router": "learned", "activation": 0.75, "shared": 0.5}
HEADS = 4  # the tiny model's query heads
N_SHARED, K = 2, 1  # round(4 * 0.5) shared; round(4 * 0.75) - 2 routed heads chosen per token
N_ROUTED = HEADS - N_SHARED
PROBE_FILE = "probe-rank{rank}.json"


# --------------------------------------------------------------------------------------------------- the probe


def _layer_of(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def routed_router_weights(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    """Per layer, the trained `W_r` (routed logits) of the learned router (PEFT's trained copy of it)."""
    found = {_layer_of(name): p for name, p in model.named_parameters()
             if "moh_router" in name and name.endswith("routed.weight") and p.requires_grad}
    assert found, "no trainable routed-router weight"
    return found


def hand_balance(hidden: torch.Tensor, routed_weight: torch.Tensor) -> torch.Tensor:
    """The balance loss of one layer from its attention input `hidden (B, T, d)` and `W_r (R, d)`."""
    probs = torch.softmax(hidden.float() @ routed_weight.float().T, dim=-1)  # (B, T, R)
    chosen = torch.zeros_like(probs).scatter(-1, probs.topk(K, dim=-1).indices, 1.0)
    return N_ROUTED * (probs.reshape(-1, N_ROUTED).mean(0) * chosen.reshape(-1, N_ROUTED).mean(0)).sum()


def reference_terms(model: torch.nn.Module, inputs: dict, gradients: bool) -> dict:
    """The independent values for one micro-batch (see the module docstring), from a second forward of `inputs`."""
    routers = routed_router_weights(model)
    attention = {_layer_of(name + "."): m for name, m in model.named_modules() if name.endswith("self_attn")}
    assert sorted(attention) == sorted(routers)
    hidden: dict[int, torch.Tensor] = {}

    def keep_input(layer: int):
        def hook(module, args, kwargs):
            hidden[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    handles = [m.register_forward_pre_hook(keep_input(layer), with_kwargs=True) for layer, m in attention.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.set_grad_enabled(gradients):
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits.float()
            targets = inputs["labels"][:, 1:].to(logits.device)
            ce_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=-100, reduction="sum")
            per_layer = {layer: hand_balance(hidden[layer], routers[layer]) for layer in sorted(routers)}
            mean_balance = torch.stack(list(per_layer.values())).mean()
            grads = None
            if gradients:
                layers = sorted(routers)
                grads = dict(zip(layers, torch.autograd.grad(mean_balance, [routers[layer] for layer in layers])))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"ce_sum": ce_sum.item(), "tokens": int((targets != -100).sum()),
            "balance": {layer: v.item() for layer, v in per_layer.items()}, "grads": grads}


class LossProbe:
    """Observes a built trainer: per micro-batch the reference terms and what `training_step` returned; per
    optimizer step the routers' gradients as the optimizer receives them (after the last micro-batch's backward).
    With `dump_dir`, each rank writes its records there at the end of training."""

    def __init__(self, trainer, *, gradients: bool, dump_dir: str | None = None) -> None:
        from transformers import TrainerCallback

        self.micro: list[dict] = []
        self.grads: dict[int, dict[int, torch.Tensor]] = {}
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            record = reference_terms(trainer.model, inputs, gradients)
            record["step"] = trainer.state.global_step + 1
            loss = original(model, inputs, num_items_in_batch)
            record["returned"] = loss.item()
            self.micro.append(record)
            return loss

        trainer.training_step = training_step
        probe = self

        class ProbeCallback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                if gradients:
                    probe.grads[state.global_step + 1] = {
                        layer: p.grad.detach().clone() for layer, p in routed_router_weights(trainer.model).items()}

            def on_train_end(self, args, state, control, **kwargs):
                if dump_dir is not None:
                    rows = [{k: v for k, v in r.items() if k != "grads"} for r in probe.micro]
                    path = os.path.join(dump_dir, PROBE_FILE.format(rank=args.process_index))
                    with open(path, "w") as f:
                        json.dump(rows, f)

        trainer.add_callback(ProbeCallback())


def attach_probe_to_build_trainer(module, probes: list, **probe_kwargs):
    """`module.build_trainer` (headwise.train.trainer), wrapped so that every trainer it builds is probed."""
    build = module.build_trainer

    def build_and_probe(*args, **kwargs):
        trainer = build(*args, **kwargs)
        probes.append(LossProbe(trainer, **probe_kwargs))
        return trainer

    return build_and_probe


# ------------------------------------------------------------------------------------------------ the checks


def expected_steps(micro_by_rank: list[list[dict]], weight: float) -> dict[int, dict]:
    """Per optimizer step: the objective (see the module docstring), the summed `training_step` losses averaged over
    ranks, and the per-layer balance losses averaged over the step's micro-batches and ranks."""
    steps: dict[int, dict] = {}
    for step in sorted({r["step"] for rows in micro_by_rank for r in rows}):
        rows = [[r for r in rank_rows if r["step"] == step] for rank_rows in micro_by_rank]
        flat = [r for rank_rows in rows for r in rank_rows]
        layers = sorted(flat[0]["balance"], key=int)
        per_layer = {str(layer): sum(r["balance"][layer] for r in flat) / len(flat) for layer in layers}
        balance = sum(per_layer.values()) / len(per_layer)
        lm = sum(r["ce_sum"] for r in flat) / sum(r["tokens"] for r in flat)
        steps[step] = {"objective": lm + weight * balance, "lm": lm, "balance": balance, "per_layer": per_layer,
                       "returned": sum(sum(r["returned"] for r in rank_rows) for rank_rows in rows) / len(rows),
                       "micro_batches": len(flat)}
    return steps


def check_losses(steps: dict[int, dict], max_steps: int) -> None:
    assert sorted(steps) == list(range(1, max_steps + 1))
    for step, s in steps.items():
        # a missing balance term is off by weight * balance ~ 0.01, a mis-scaled one by half of it: 300x this bound
        assert s["returned"] == pytest.approx(s["objective"], rel=0, abs=3e-5), (step, s)


def check_logs(run_dir, steps: dict[int, dict], weight: float) -> None:
    """The run's files: per log step (every step here) the Trainer's log (run_summary.json's log history) and
    `moh/usage.jsonl` carry each layer's balance loss and the weighted total, averaged over the step; the logged
    loss is the objective; the usage heatmap is a PNG."""
    history = json.loads((run_dir / "run_summary.json").read_text())["log_history"]
    logged = {e["step"]: e for e in history if "loss" in e}
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "moh" / "usage.jsonl").read_text().splitlines())}
    assert sorted(logged) == sorted(rows) == sorted(steps)
    for step, s in steps.items():
        entry, row = logged[step], rows[step]
        assert entry["loss"] == pytest.approx(s["objective"], rel=0, abs=3e-5)
        assert entry["moh/balance_loss_weighted"] == pytest.approx(weight * s["balance"], rel=1e-5, abs=1e-7)
        assert entry["moh/balance_loss"] == pytest.approx(s["balance"], rel=1e-5)
        assert row["balance_weighted"] == pytest.approx(weight * s["balance"], rel=1e-5, abs=1e-6)
        assert sorted(row["balance"]) == sorted(s["per_layer"])
        for layer, value in s["per_layer"].items():
            assert entry[f"moh/balance_loss/layer_{layer}"] == pytest.approx(value, rel=1e-5)
            assert row["balance"][layer] == pytest.approx(value, rel=0, abs=2e-6)
        for shares in row["usage"].values():
            assert len(shares) == N_ROUTED and sum(shares) == pytest.approx(K, abs=1e-3)
    assert (run_dir / "moh_head_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_router_gradients(probe: LossProbe, weight: float) -> None:
    """The routers' gradient of a step is `weight` times the mean over its micro-batches of the hand balance loss's
    gradient (the language-model loss gives `W_r` none, see the module docstring)."""
    assert sorted(probe.grads) == sorted({r["step"] for r in probe.micro})
    for step, got in probe.grads.items():
        micro = [r for r in probe.micro if r["step"] == step]
        for layer, grad in got.items():
            want = weight * sum(r["grads"][layer] for r in micro) / len(micro)
            assert want.abs().max() > 1e-4, f"step {step} layer {layer}: the reference gradient is only rounding"
            torch.testing.assert_close(grad, want.to(grad.dtype), rtol=1e-4, atol=1e-6 * want.abs().max().item(),
                                       msg=lambda text, step=step, layer=layer: f"step {step} layer {layer}: {text}")


def check_eval(trainer) -> None:
    """Evaluation after training: its loss is the language-model loss of the batch (no balance term, none left over
    from the training forwards) and it adds nothing to the head usage the next log step would report."""
    data = trainer.train_dataset  # TRL's SFT data is a datasets.Dataset, which its evaluation needs
    rows = data.select(range(2)) if hasattr(data, "select") else torch.utils.data.Subset(data, range(2))
    batch = next(iter(trainer.get_eval_dataloader(rows)))
    assert batch["input_ids"].shape[0] == 2  # one evaluation batch
    reference = reference_terms(trainer.model, batch, gradients=False)
    metrics = trainer.evaluate(eval_dataset=rows)
    assert metrics["eval_loss"] == pytest.approx(reference["ce_sum"] / reference["tokens"], rel=0, abs=3e-5)
    assert trainer.method.state.take_usage() == {}  # the last log step took the training counts


# ---------------------------------------------------------------------------------------------- in-process runs


def _recipe(tmp_path, tiny_model_dir, *, weight: float = 0.01, sft: bool = False, max_steps: int = 2, **training):
    data = tiny_recipe(tiny_model_dir, tmp_path / "run", max_steps=max_steps, save_steps=100,
                       per_device_train_batch_size=2, learning_rate=1e-2, max_grad_norm=1e9, **training)
    data["method"] = {**ROUTER, "balance_weight": weight}
    if sft:
        data["data"] = {"builder": "sft", "max_length": 128, "num_samples": 16, "packing": False}
    return write_recipe(tmp_path, data)


def _train_probed(monkeypatch, recipe_path, *, gradients: bool = True):
    from headwise.train import trainer as trainer_module

    probes: list[LossProbe] = []
    monkeypatch.setattr(trainer_module, "build_trainer",
                        attach_probe_to_build_trainer(trainer_module, probes, gradients=gradients))
    result = trainer_module.train(load_recipe(recipe_path))
    assert len(probes) == 1
    return result, probes[0]


PATHS = [
    pytest.param({"fused_cross_entropy": "off"}, id="plain"),
    pytest.param({"fused_cross_entropy": "off", "gradient_checkpointing": False}, id="plain-no-checkpointing"),
    pytest.param({"fused_cross_entropy": "chunked"}, id="chunked"),
    pytest.param({"fused_cross_entropy": "off", "gradient_accumulation_steps": 2}, id="plain-accumulation"),
    pytest.param({"fused_cross_entropy": "chunked", "gradient_accumulation_steps": 2}, id="chunked-accumulation"),
    pytest.param({"sft": True, "fused_cross_entropy": "off", "gradient_accumulation_steps": 2}, id="trl-sft"),
    pytest.param({"sft": True, "fused_cross_entropy": "chunked"}, id="trl-sft-chunked"),
]


@pytest.mark.parametrize("path", PATHS)
def test_the_optimised_loss_is_lm_plus_weighted_balance(tmp_path, tiny_model_dir, monkeypatch, path):
    weight = 0.01
    result, probe = _train_probed(monkeypatch, _recipe(tmp_path, tiny_model_dir, weight=weight, **path))
    if path.get("sft"):
        assert type(result.trainer).__name__ == "HeadwiseSFTTrainer"
    accumulation = path.get("gradient_accumulation_steps", 1)
    steps = expected_steps([probe.micro], weight)
    assert all(s["micro_batches"] == accumulation for s in steps.values())
    check_losses(steps, max_steps=2)
    check_router_gradients(probe, weight)
    check_logs(tmp_path / "run", steps, weight)
    check_eval(result.trainer)


def test_without_the_balance_weight_the_router_gets_no_gradient(tmp_path, tiny_model_dir, monkeypatch):
    """balance_weight 0: the loss is the language-model loss alone and `W_r` gets exactly no gradient, so it stays
    at its zero initialisation (the gradients compared above are the balance loss's)."""
    result, probe = _train_probed(monkeypatch, _recipe(tmp_path, tiny_model_dir, weight=0.0))
    steps = expected_steps([probe.micro], 0.0)
    check_losses(steps, max_steps=2)
    for step, grads in probe.grads.items():
        for layer, grad in grads.items():
            assert grad.abs().max() < 1e-9, (step, layer)
    assert all(p.abs().max() == 0 for p in routed_router_weights(result.model).values())
    check_logs(tmp_path / "run", steps, 0.0)


# -------------------------------------------------------------------------------------- DeepSpeed, two processes


LAUNCHED = """\
import sys
from headwise.cli import main
from headwise.train import trainer as trainer_module
from tests.test_moh_trainer_paths import attach_probe_to_build_trainer

probes = []
trainer_module.build_trainer = attach_probe_to_build_trainer(trainer_module, probes, gradients=False,
                                                             dump_dir=sys.argv[1])
sys.exit(main(["train", sys.argv[2]]))
"""


def test_deepspeed_zero2_two_processes(tmp_path, tiny_model_dir):
    """`accelerate launch` with 2 CPU processes under ZeRO-2, gradient accumulation 2, the chunked loss and
    activation checkpointing (the shipped 8B recipe's setup): per step the ranks' summed losses average to the
    objective over both ranks' tokens and balance losses, the log and usage.jsonl hold the per-layer balance
    averaged over micro-batches and ranks, and the routers moved off zero (only the balance loss moves them)."""
    from suite_rules import missing_dependency, require_or_skip

    if shutil.which("g++") is None:
        missing_dependency("g++ is not on PATH: DeepSpeed on CPU JIT-builds its comm op with it")
    require_or_skip("deepspeed", "pip install 'headwise[deepspeed]'")
    from safetensors.torch import load_file

    weight, max_steps = 0.01, 2
    run_dir = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, weight=weight, max_steps=max_steps, fused_cross_entropy="auto",
                     gradient_accumulation_steps=2)
    cfg = yaml.safe_load((REPO / "ds_configs" / "zero2.yaml").read_text())
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(resources.files("headwise.ds_configs") / "zero2.json")
    cfg["main_process_port"] = 29531
    accelerate_config = tmp_path / "accelerate-zero2.yaml"
    accelerate_config.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           str(script), str(tmp_path), str(recipe)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]

    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == max_steps
    micro_by_rank = [json.loads((tmp_path / PROBE_FILE.format(rank=rank)).read_text()) for rank in (0, 1)]
    assert all(len(rows) == 2 * max_steps for rows in micro_by_rank)
    steps = expected_steps(micro_by_rank, weight)
    check_losses(steps, max_steps)
    check_logs(run_dir, steps, weight)
    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    routed = {k: v for k, v in saved.items() if "moh_router" in k and k.endswith("routed.weight")}
    assert len(routed) == 2 and all(v.abs().max() > 0 for v in routed.values())
