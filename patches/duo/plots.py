"""The gate heatmap a Duo run writes at its end (`duo_gates.png`)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_gate_heatmap(gates, path: str | Path, title: str = "DuoAttention gates") -> Path:
    """PNG heatmap of the gates: layers on y, KV heads on x (1 = full attention, 0 = streaming)."""
    import matplotlib  # heavy, and only needed at the end of a run

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    g = torch.as_tensor(gates, dtype=torch.float32).cpu().numpy()
    n_layers, n_heads = g.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * n_heads + 2.0), max(3.0, 0.2 * n_layers + 1.5)), dpi=100)
    try:
        im = ax.imshow(g, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_title(f"{title} (mean {g.mean():.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, label="gate (1 = retrieval)")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
