"""Shared by the benchmark drivers: append result rows (one JSON object a line) to a results file.

    from results_io import append_rows, utc_now
    append_rows("benchmarks/results/quality.jsonl", [{"method": ..., "metric": ..., "value": ..., "date": utc_now()}])

Rows measured on the GPU machine come back in files of their own (the drivers' ``--out``); merging
them into the results file records which machine ran them and drops the run-local options from
each row's command, so the command reads as the one to re-run:

    python benchmarks/results_io.py merge /work/.device/3/kernels8k.jsonl benchmarks/results/kernels.jsonl \
        --machine "GPU 1 of nvidia-h200-x2 (GPU 0 ran GPU tests)" [--note "..."]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
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


def emit_row(row: Mapping[str, Any], path: str | Path | None) -> None:
    """Print a measured row as one JSON line and, when `path` is given, append it there as soon as it exists
    (a run cut short keeps every row it finished)."""
    print(json.dumps(row), flush=True)
    if path:
        append_rows(path, [row])


# Options that only say where a run wrote its rows or when it stopped itself: not part of the measurement.
RUN_LOCAL_OPTIONS = ("--out", "--budget-s")


def command_to_rerun(command: str) -> str:
    """`command` without the run-local options (``--out PATH``, ``--budget-s N``, or their ``=`` forms)."""
    for opt in RUN_LOCAL_OPTIONS:
        command = re.sub(rf" {re.escape(opt)}(=| +)\S+", "", command)
    return command


def merge_rows(src: str | Path, dst: str | Path, machine: str, note: str | None = None) -> int:
    """Append the rows of `src` to `dst` with ``machine`` (and ``note``) set and each command made
    re-runnable (`command_to_rerun`); returns the count. Rows already carrying a machine keep it."""
    rows = []
    for line in Path(src).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "command" in row:
                row["command"] = command_to_rerun(row["command"])
            row.setdefault("machine", machine)
            if note:
                row["note"] = note
            rows.append(row)
    return append_rows(dst, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Merge rows measured elsewhere into a results file.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="append SRC's rows to DST with their machine recorded")
    m.add_argument("src")
    m.add_argument("dst")
    m.add_argument("--machine", required=True, help="which machine (and GPU) ran them, and what else ran there")
    m.add_argument("--note", default=None)
    args = p.parse_args(argv)
    n = merge_rows(args.src, args.dst, args.machine, args.note)
    print(f"{n} rows -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
