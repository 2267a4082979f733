"""DuoAttention's files: the gate TSV, the run's gate log, the pattern folder of an export, and the
`duo` KV policy made from them (as data: `headwise.load` and the export validate it)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from headwise.patches.base import HeadwiseError
from headwise.patches.duo.binarize import _as_grid, binarize_gates
from headwise.patches.duo.gates import GATE_MODULE
from safetensors import safe_open

GATE_TSV = "full_attention_heads.tsv"  # DuoAttention's file name

LAST_GATE_TSV = "full_attention_heads_last.tsv"  # the final gates, when GATE_TSV holds their mean (average_last)

GATE_LOG = "duo_gates.jsonl"  # one line per logging step: {"step": N, "gates": [[...], ...]}

PATTERN_DIR = "duo_attention"  # DuoAttention-compatible pattern folder inside an export

STANDARD_FRACTIONS = (0.25, 0.5, 0.75)


def write_gate_tsv(gates, path: str | Path) -> Path:
    """DuoAttention's `full_attention_heads.tsv`: one row per layer, tab-separated gates (scientific notation)."""
    g = torch.as_tensor(gates, dtype=torch.float64).cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(f"{float(v):.18e}" for v in row) + "\n" for row in g.tolist()))
    return path


def read_gate_tsv(path: str | Path) -> torch.Tensor:
    """A DuoAttention gate file (ours or the original project's) as a `(layers, kv_heads)` tensor, clipped to [0, 1]."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise HeadwiseError(f"{path}: expected one row per layer with the same number of tab-separated gates")
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64).clamp(0.0, 1.0)


def averaged_gates(log: str | Path, last_fraction: float, upto_step: int | None = None,
                   expected_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The mean of the gates logged in a Duo run's `duo_gates.jsonl` over the last `last_fraction` of
    training (steps in `(upto - last_fraction * upto, upto]`, `upto` = `upto_step` or the last logged
    step), as a `(layers, kv_heads)` float64 grid.

    Why: with lambda = 0.05 most gates reach zero within the first ~100 steps (AdamW moves each gate
    by about the learning rate per step, whatever its gradient's size), and the final values of those
    near zero, where a 50% cut falls on small models, reflect the last few steps' samples. Their mean
    over a window weighs every sample of it. A step logged twice (a resumed run logs again from its
    checkpoint) counts once, with its latest line. `expected_shape` (layers, KV heads of the model) refuses a
    log of another model's grid here rather than at generate."""
    log = Path(log)
    if not log.is_file():
        raise HeadwiseError(f"{log} is missing: method.average_last averages the gates this run logs there; "
                            "export with method.average_last: 0 to use the final gates")
    by_step: dict[int, list] = {}
    try:
        text = log.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise HeadwiseError(f"{log} is not a text gate log (not UTF-8): it is damaged; export with "
                            "method.average_last=0 to use the final gates") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row["gates"]
        except (ValueError, KeyError, TypeError) as e:
            raise HeadwiseError(f"{log}:{n}: not a gate log line ({type(e).__name__}); expected "
                                '{"step": N, "gates": [[...], ...]}') from None
    upto = upto_step if upto_step is not None else max(by_step, default=0)
    start = upto - last_fraction * upto
    window = [g for step, g in sorted(by_step.items()) if start < step <= upto]
    if not window:
        raise HeadwiseError(f"{log}: no gates logged in steps ({start:g}, {upto}]; lower training.logging_steps "
                            f"or raise method.average_last ({last_fraction})")
    grids = []
    for g in window:
        try:
            grid = _as_grid(g)
        except HeadwiseError as e:
            raise HeadwiseError(f"{log}: {e}; export with method.average_last=0 to use the final gates") from None
        shape = expected_shape or tuple(grids[0].shape if grids else grid.shape)
        if tuple(grid.shape) != tuple(shape):
            raise HeadwiseError(f"{log}: a gate grid of shape {list(grid.shape)}, expected {list(shape)} (layers x KV "
                                "heads of the model); export with method.average_last=0 to use the final gates")
        grids.append(grid)
    return torch.stack(grids).mean(dim=0)


def write_mask_tsv(mask: Sequence[Sequence[int]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join("\t".join(str(int(v)) for v in row) + "\n" for row in mask))
    return path


def write_pattern_dir(gates, directory: str | Path, *, sink: int, recent: int, extra: dict | None = None) -> Path:
    """A DuoAttention pattern folder: `full_attention_heads.tsv` + `config.json` (`sink_size`, `recent_size`)
    + the binarised masks at 25/50/75% streaming heads."""
    directory = Path(directory)
    write_gate_tsv(gates, directory / GATE_TSV)
    config = {"sink_size": sink, "recent_size": recent, **(extra or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in STANDARD_FRACTIONS:
        write_mask_tsv(binarize_gates(gates, streaming_fraction=f), directory / f"retrieval_heads_streaming={f:.2f}.tsv")
    return directory


def duo_policy(source, *, streaming_fraction: float | None = 0.5, threshold: float | None = None,
               sink: int | None = None, recent: int | None = None):
    """A `DuoPolicy` from gates: a `(layers, kv_heads)` grid, a gate TSV, or a folder holding one
    (a DuoAttention pattern folder, or a headwise Duo export). sink/recent default to the folder's
    `config.json` (`sink_size`/`recent_size`), else 128/256. `threshold` overrides the fraction."""
    cfg: dict = {}
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            p = p / PATTERN_DIR if (p / PATTERN_DIR / GATE_TSV).is_file() else p
            if (p / "config.json").is_file():
                cfg = json.loads((p / "config.json").read_text())
            p = p / GATE_TSV
        gates = read_gate_tsv(p)
    else:
        gates = source
    if threshold is not None:
        streaming_fraction = None
    mask = binarize_gates(gates, streaming_fraction=streaming_fraction, threshold=threshold)
    return {"type": "duo", "retrieval_heads": mask, "sink": sink if sink is not None else cfg.get("sink_size", 128),
            "recent": recent if recent is not None else cfg.get("recent_size", 256)}


def gates_from_weights(weights_dir: str | Path) -> torch.Tensor:
    """The gates saved by a Duo training run (`*.duo_gate.gate` tensors of its safetensors), `(layers, kv_heads)`."""
    found: dict[int, torch.Tensor] = {}
    pattern = re.compile(r"layers\.(\d+)\..*" + GATE_MODULE + r"\.gate$")
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                m = pattern.search(name)
                if m:
                    found[int(m.group(1))] = st.get_tensor(name).float()
    if not found:
        raise HeadwiseError(f"{weights_dir} holds no DuoAttention gates (*.{GATE_MODULE}.gate tensors)")
    layers = sorted(found)
    if layers != list(range(len(layers))):
        raise HeadwiseError(f"{weights_dir}: gates found for layers {layers}, expected 0..{len(layers) - 1}")
    return torch.stack([found[i] for i in layers]).clamp(0.0, 1.0)
