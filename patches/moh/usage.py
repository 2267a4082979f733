"""What a MoH run writes about its routers: per log step the balance loss and the share of tokens that chose each
routed head, per layer (`moh/usage.jsonl`), and at the end a heatmap of the last window (`moh_head_usage.png`)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch

from headwise.patches.heatmaps import save_heatmap
from headwise.patches.moh.attention import MoHState

USAGE_LOG = "moh/usage.jsonl"
USAGE_PLOT = "moh_head_usage.png"


def plot_head_usage(shares: dict[int, torch.Tensor], path: str | Path, title: str) -> Path:
    """PNG heatmap: layers on y, routed units on x, the share of tokens that chose each (k / R when balanced)."""
    grid = torch.stack([shares[layer] for layer in sorted(shares)])
    return save_heatmap(grid, path, title=title, xlabel="routed head (after the shared ones)",
                        colorbar_label="share of tokens choosing it", cmap="magma")


def usage_callback(run_dir: str, state: MoHState):
    """A Trainer callback: logs the balance loss, appends each log step's usage to `moh/usage.jsonl` and plots
    the last window at the end of training."""
    from transformers import TrainerCallback  # heavy: imported when a run builds its callbacks

    state_ref = weakref.ref(state)

    class MoHUsageCallback(TrainerCallback):
        last: dict[int, torch.Tensor] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            moh = state_ref()
            if moh is None or logs is None or "loss" not in logs or not moh.chosen:
                return
            balance = {layer: float(loss.detach()) for layer, loss in moh.balance.items()}
            self.last = moh.take_usage()
            if balance:
                logs["moh_balance_loss"] = round(sum(balance.values()) / len(balance), 6)
            if state.is_world_process_zero:
                path = Path(run_dir) / USAGE_LOG
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step,
                                        "balance": {str(k): round(v, 6) for k, v in balance.items()},
                                        "usage": {str(k): [round(x, 4) for x in v.tolist()]
                                                  for k, v in self.last.items()}}) + "\n")

        def on_train_end(self, args, state, control, **kwargs):
            moh = state_ref()
            shares = moh.take_usage() if moh is not None and moh.chosen else self.last
            if shares and state.is_world_process_zero:
                plot_head_usage(shares, Path(run_dir) / USAGE_PLOT,
                                title=f"MoH head usage, step {state.global_step} (balanced: k / R per head)")

    return MoHUsageCallback()
