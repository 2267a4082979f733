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
FAILED_CASES: list[str] = []  # battery cases that failed (the rows' own check, test_support_rows, does not count)


@pytest.fixture
def battery_verdict():
    """Record a case's verdict: `battery_verdict(family, model_type, consumer, verdict, reason="")`."""

    def record(family: str, model_type: str, consumer: str, verdict: str, reason: str = "") -> None:
        VERDICTS.append({"family": family, "model_type": model_type, "consumer": consumer, "verdict": verdict,
                         "reason": reason})

    return record


def pytest_runtest_logreport(report):
    if report.failed and "test_support_rows" not in report.nodeid:
        FAILED_CASES.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("HEADWISE_BATTERY_RESULTS")
    # rows only from a battery whose every case ran and passed (the support-row check, which fails until the
    # rows are written, may fail; exit status 1 is "some tests failed", anything above is an aborted run)
    if not target or not VERDICTS or FAILED_CASES or exitstatus not in (0, 1):
        return
    stamp = {"command": "HEADWISE_BATTERY_RESULTS=" + target + " python -m pytest tests/battery",
             "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in VERDICTS:
            f.write(json.dumps({**row, **stamp}) + "\n")
