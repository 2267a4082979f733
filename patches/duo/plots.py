"""The gate heatmap a Duo run writes at its end (`duo_gates.png`)."""

from __future__ import annotations

from pathlib import Path

import torch

from headwise.patches.heatmaps import save_heatmap


def plot_gate_heatmap(gates, path: str | Path, title: str = "DuoAttention gates") -> Path:
    """PNG heatmap of the gates: layers on y, KV heads on x (1 = full attention, 0 = streaming)."""
    g = torch.as_tensor(gates, dtype=torch.float32)
    return save_heatmap(g, path, title=f"{title} (mean {float(g.mean()):.2f})", xlabel="KV head",
                        colorbar_label="gate (1 = retrieval)")
