"""The heatmap PNG a method writes at the end of a run (Duo's gates, MoH's head usage): layers on y, heads on x."""

from __future__ import annotations

from pathlib import Path

import torch


def save_heatmap(grid, path: str | Path, *, title: str, xlabel: str, colorbar_label: str, cmap: str = "viridis",
                 vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """Write `grid` (layers x heads, values in [vmin, vmax]) as a PNG heatmap with one tick per head."""
    import matplotlib  # heavy, and only needed at the end of a run

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    g = torch.as_tensor(grid, dtype=torch.float32).cpu().numpy()
    n_layers, n_heads = g.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * n_heads + 2.0), max(3.0, 0.2 * n_layers + 1.5)), dpi=100)
    try:
        im = ax.imshow(g, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, label=colorbar_label)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
