"""The Trainer callback of a Duo run: projects the gates after each step, logs them, writes the gate
files and the heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from headwise.patches.duo.gates import collect_gates, gate_modules
from headwise.patches.duo.pattern_files import (
    GATE_LOG,
    GATE_TSV,
    LAST_GATE_TSV,
    averaged_gates,
    write_gate_tsv,
)
from headwise.patches.duo.plots import plot_gate_heatmap


def _gate_callback(run_dir: str, state_ref, average_last: float):
    # heavy: transformers is imported when a run builds its callbacks
    from transformers import TrainerCallback

    class DuoGateCallback(TrainerCallback):
        """Projects the gates onto [0, 1] after every optimizer step, logs them, and writes the gate
        TSV (DuoAttention's format) at every checkpoint and the gates + heatmap PNG at the end (with
        `average_last`, the TSV and heatmap hold the gates' mean over that window, and
        `full_attention_heads_last.tsv` the final values)."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            for g in gate_modules(model):
                g.project()

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if model is None or logs is None or "loss" not in logs:
                return
            g = collect_gates(model)
            stats = {"gate_mean": round(float(g.mean()), 5), "gate_min": round(float(g.min()), 5),
                     "gate_frac_below_0.5": round(float((g < 0.5).float().mean()), 5)}
            duo_state = state_ref()
            if duo_state is not None:
                stats.update({k: round(v, 6) for k, v in duo_state.last.items()})
            logs.update(stats)
            if state.log_history:
                state.log_history[-1].update(stats)
            if state.is_world_process_zero:
                _log_gates(run_dir, state.global_step, g)

        def on_save(self, args, state, control, model=None, **kwargs):
            if model is not None and state.is_world_process_zero:
                write_gate_tsv(collect_gates(model), Path(run_dir) / "duo" / f"full_attention_heads_step={state.global_step}.tsv")

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is None or not state.is_world_process_zero:
                return
            g = collect_gates(model)
            title = f"DuoAttention gates, step {state.global_step}"
            if average_last > 0:
                _log_gates(run_dir, state.global_step, g)  # the final gates join the window (a no-op if just logged)
                write_gate_tsv(g, Path(run_dir) / LAST_GATE_TSV)
                g = averaged_gates(Path(run_dir) / GATE_LOG, average_last, state.global_step)
                title = f"DuoAttention gates, mean over the last {average_last:.0%} of {state.global_step} steps"
            write_gate_tsv(g, Path(run_dir) / GATE_TSV)
            plot_gate_heatmap(g, Path(run_dir) / "duo_gates.png", title=title)

    return DuoGateCallback()


def _log_gates(run_dir: str, step: int, gates: torch.Tensor) -> None:
    """Append one line to the run's gate log, unless its last line already is this step's."""
    path = Path(run_dir) / GATE_LOG
    if path.is_file():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("step") == step:
            return
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "gates": gates.tolist()}) + "\n")
