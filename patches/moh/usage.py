"""What a MoH run writes about its routers: per log step the balance loss and the share of tokens that chose each
routed head, per layer (`moh/usage.jsonl`), and at the end a heatmap of the last window (`moh_head_usage.png`)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch

from headwise.patches.moh.attention import MoHState

USAGE_LOG = "moh/usage.jsonl"
USAGE_PLOT = "moh_head_usage.png"


def plot_head_usage(shares: dict[int, torch.Tensor], path: str | Path, title: str) -> Path:
    """PNG heatmap: layers on y, routed units on x, the share of tokens that chose each (k / R when balanced)."""
    import matplotlib  # heavy, and only needed at the end of a run

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = torch.stack([shares[layer] for layer in sorted(shares)]).numpy()
    n_layers, n_units = grid.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * n_units + 2.0), max(3.0, 0.2 * n_layers + 1.5)), dpi=100)
    try:
        im = ax.imshow(grid, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xlabel("routed head (after the shared ones)")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_units))
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, label="share of tokens choosing it")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


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
