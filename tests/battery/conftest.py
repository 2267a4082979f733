"""The battery's verdicts, one per (family, method or policy): written as benchmark rows when asked.

    HEADWISE_BATTERY_RESULTS=benchmarks/results/support.jsonl python -m pytest tests/battery

appends one row per case (family, model type, consumer, verdict `matches` or `refused` with the features named)
with the command, machine and date; `benchmarks/report.py` renders the support table of docs/kernels.md from them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import pytest

VERDICTS: list[dict] = []


@pytest.fixture
def battery_verdict():
    """Record a case's verdict: `battery_verdict(family, model_type, consumer, verdict, reason="")`."""

    def record(family: str, model_type: str, consumer: str, verdict: str, reason: str = "") -> None:
        VERDICTS.append({"family": family, "model_type": model_type, "consumer": consumer, "verdict": verdict,
                         "reason": reason})

    return record


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("HEADWISE_BATTERY_RESULTS")
    if not target or not VERDICTS or exitstatus != 0:
        return  # rows only from a battery that passed whole
    stamp = {"command": "HEADWISE_BATTERY_RESULTS=" + target + " python -m pytest tests/battery",
             "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in VERDICTS:
            f.write(json.dumps({**row, **stamp}) + "\n")
