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
    """A Trainer callback: per training log step, the balance loss of each layer and their weighted total in the
    Trainer's log, and a row of `moh/usage.jsonl` with those and the share of tokens choosing each routed unit;
    at the end of training, the heatmap of the last window.

    The balance losses are averaged over every micro-batch since the previous log step (read after each one's
    backward, so eval forwards in between add nothing), as the logged loss is; on several ranks they and the usage
    are averaged over the ranks too, as the Trainer averages the loss. They reach the log through
    `training_log_values`, which the headwise trainer calls before the Trainer records a training log (a
    callback's `on_log` runs after the log history is written and after the trackers' callbacks)."""
    from transformers import TrainerCallback  # heavy: imported when a run builds its callbacks

    state_ref = weakref.ref(state)

    class MoHUsageCallback(TrainerCallback):
        def __init__(self) -> None:
            self.balance_sum: torch.Tensor | None = None  # (layers,) summed over the micro-batches since the last log
            self.layers: list[int] = []
            self.micro_batches = 0
            self.last: dict[int, torch.Tensor] = {}

        def _add_micro_batch(self) -> None:
            moh = state_ref()
            if moh is None or not moh.balance:
                return
            self.layers = sorted(moh.balance)
            # stays on the model's device: a host copy here would sync the GPU on every micro-batch
            values = torch.stack([moh.balance[layer].detach().float() for layer in self.layers])
            self.balance_sum = values if self.balance_sum is None else self.balance_sum + values
            self.micro_batches += 1

        def on_substep_end(self, args, state, control, **kwargs):
            self._add_micro_batch()

        def on_step_end(self, args, state, control, **kwargs):
            self._add_micro_batch()

        def training_log_values(self, args, state) -> dict[str, float]:
            """The entries this log step adds to the Trainer's log; also appends the step's usage.jsonl row. Called
            on every rank at the same log step (it may reduce across ranks)."""
            moh = state_ref()
            if moh is None or self.balance_sum is None:
                return {}
            per_layer = _mean_over_ranks(self.balance_sum / self.micro_batches).tolist()
            micro_batches, self.balance_sum, self.micro_batches = self.micro_batches, None, 0
            self.last = _usage_over_ranks(moh)
            balance = dict(zip(self.layers, per_layer))
            mean = sum(per_layer) / len(per_layer)
            weighted = moh.config.balance_weight * mean
            if state.is_world_process_zero:
                path = Path(run_dir) / USAGE_LOG
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "micro_batches": micro_batches,
                                        "balance": {str(k): round(v, 6) for k, v in balance.items()},
                                        "balance_mean": round(mean, 6), "balance_weighted": round(weighted, 8),
                                        "usage": {str(k): [round(x, 4) for x in v.tolist()]
                                                  for k, v in self.last.items()}}) + "\n")
            return {"moh/balance_loss": mean, "moh/balance_loss_weighted": weighted,
                    **{f"moh/balance_loss/layer_{layer}": value for layer, value in balance.items()}}

        def on_train_end(self, args, state, control, **kwargs):
            moh = state_ref()
            shares = _usage_over_ranks(moh) if moh is not None and moh.chosen else self.last
            if shares and state.is_world_process_zero:
                plot_head_usage(shares, Path(run_dir) / USAGE_PLOT,
                                title=f"MoH head usage, step {state.global_step} (balanced: k / R per head)")

    return MoHUsageCallback()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over the ranks of a distributed run (itself in a single process), on the host."""
    if _world_size() > 1:
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        values = values / _world_size()
    return values.cpu()


def _usage_over_ranks(moh: MoHState) -> dict[int, torch.Tensor]:
    """Per layer, the share of tokens choosing each routed unit since the last call (`MoHState.take_usage`),
    averaged over the ranks (reduced on the model's device, where the counts live: NCCL needs CUDA tensors)."""
    device = next(iter(moh.chosen.values())).device if moh.chosen else torch.device("cpu")
    shares = moh.take_usage()
    if _world_size() == 1 or not shares:
        return shares
    layers = sorted(shares)
    stacked = _mean_over_ranks(torch.stack([shares[layer] for layer in layers]).to(device))
    return dict(zip(layers, stacked))
