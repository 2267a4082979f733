"""Whether a folder's safetensors weights are whole: one check for checkpoints (resume, export
--checkpoint), a run's final weights (export) and export folders (load, push).

A weights file cut short by a kill or an interrupted copy would otherwise fail deep inside
`from_pretrained`, be uploaded by `headwise push`, or be resumed from.
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"


def weights_problem(folder: str | Path) -> str | None:
    """Why the `*.safetensors` files of `folder` cannot be used, in words, or None when they are whole.

    Each file's header is read against the file's length and the last tensor's offsets are touched
    (safetensors raises for a truncated or garbled file); a `model.safetensors.index.json` must name
    only shards that are present. A folder without safetensors files has no problem here: whether
    it needs weights is the caller's rule.
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    for weights in files:
        if weights.stat().st_size <= 8:
            return f"{weights.name} is empty"
        try:
            with safe_open(str(weights), framework="pt") as f:
                names = list(f.keys())
                if names:
                    f.get_slice(names[-1])
        except Exception as e:  # safetensors raises several types (SafetensorError, OSError, ...) for bad files
            reason = str(e).removeprefix("Error while deserializing header: ")
            return f"{weights.name} is damaged or cut short ({reason})"
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shard_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            shard_map = None
        if not isinstance(shard_map, dict):
            return f"{INDEX_FILE} is not a JSON object with a weight_map"
        missing = sorted({str(s) for s in shard_map.values()} - {p.name for p in files})
        if missing:
            return f"{INDEX_FILE} names shards that are missing: {', '.join(missing)}"
    return None
