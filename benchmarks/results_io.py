"""Shared by the benchmark drivers: append result rows (one JSON object a line) to a results file.

    from results_io import append_rows, utc_now
    append_rows("benchmarks/results/quality.jsonl", [{"method": ..., "metric": ..., "value": ..., "date": utc_now()}])
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second (``2026-11-29T23:42:34+00:00``)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append each row to `path` as one JSON line (creating the file and its folder); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n
