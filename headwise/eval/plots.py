"""The passkey heatmap: accuracy by context length and key depth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from headwise.eval import EvalError
from headwise.eval.passkey import accuracy_grid


def plot_passkey_heatmap(
    results: Sequence[dict],
    path: str | Path,
    title: str | None = None,
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """A PNG heatmap of passkey accuracy: context length on x, needle depth on y (0 = top), each cell
    annotated with its accuracy and sample count. The image is exactly ``figsize * dpi`` pixels
    (default size grows with the grid)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    if not results:
        raise EvalError("no passkey results to plot")
    lengths, depths, grid = accuracy_grid(results)
    counts = {(int(r["length"]), float(r["depth"])): 0 for r in results}
    for r in results:
        counts[(int(r["length"]), float(r["depth"]))] += 1
    acc = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    if figsize is None:
        figsize = (max(4.0, 1.1 * len(lengths) + 2.5), max(3.0, 0.55 * len(depths) + 1.8))
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    try:
        im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (fraction of the context)")
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.0%}\n(n={counts[(L, d)]})", ha="center", va="center", fontsize=8,
                            color="black")
        total = sum(bool(r["correct"]) for r in results) / len(results)
        ax.set_title(f"{title or 'Passkey retrieval'} (mean {total:.0%})", fontsize=10)
        fig.colorbar(im, ax=ax, label="accuracy")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)  # no bbox_inches="tight": the size stays figsize * dpi
    finally:
        plt.close(fig)
    return path
