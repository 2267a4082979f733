"""Summarise one pytest run's log as a JSON file in `benchmarks/results/gpu_tests/`: date, commit, counts.

    python benchmarks/gpu_tests_summary.py tests.log --exit-code 0 --command "pytest tests/kernels -n 8" \
        --machine "NVIDIA H200 x 1" [--commit SHA] [--copy-to $OUT/gpu_tests]

`benchmarks/gpu_round.sh` runs it after the GPU tests, so every GPU test run leaves one file, named
`<UTC date>_<commit>.json`:

    {"date": "2026-12-03T14:05:09+00:00", "commit": "d41f3e8...", "machine": "...", "command": "...",
     "passed": 352, "failed": 0, "skipped": 25, "errors": 0, "xfailed": 0, "xpassed": 0,
     "complete": true, "exit_code": 0, "failed_tests": []}

The counts come from pytest's closing line (`== 352 passed, 25 skipped in 470.1s ==`) when the run
finished. A run stopped by its time limit never writes that line; then they are counted from the
per-test lines `pytest -v` prints (`[gw3] [ 41%] PASSED tests/...::test_x` under xdist,
`tests/...::test_x PASSED [ 41%]` without), and `complete` is false: the counts are those of the tests
that finished before the limit. `docs/benchmarks.md` shows the recorded runs (`report.py` region
`gpu-tests`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTCOMES = ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")

# The closing line: "==== 3 failed, 352 passed, 25 skipped, 2 warnings in 470.12s (0:07:50) ====" (or, with -q,
# the same without the rules).
_FINAL = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s\b")
_COUNT = re.compile(r"(\d+) ([a-z]+)")
# Per-test lines of `pytest -v`: under xdist the outcome comes first, without it last.
_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (\S+::\S+)")
_PLAIN = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_KEYS = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors", "XFAIL": "xfailed",
         "XPASS": "xpassed"}
# pytest's own words in the closing line, mapped onto the summary's keys.
_FINAL_WORDS = {"passed": "passed", "failed": "failed", "skipped": "skipped", "error": "errors", "errors": "errors",
                "xfailed": "xfailed", "xpassed": "xpassed"}


def parse_log(text: str) -> dict:
    """Counts of one pytest run (module docstring): the closing line's if there is one, else the per-test lines'."""
    per_test: dict[str, set[str]] = {key: set() for key in OUTCOMES}
    final = None
    for line in text.splitlines():
        line = line.rstrip()
        m = _XDIST.match(line)
        if m:
            per_test[_KEYS[m.group(1)]].add(m.group(2))
            continue
        m = _PLAIN.match(line)
        if m:
            per_test[_KEYS[m.group(2)]].add(m.group(1))
            continue
        m = _FINAL.match(line)
        if m:
            final = {key: 0 for key in OUTCOMES}
            for n, word in _COUNT.findall(m.group(1)):
                if word in _FINAL_WORDS:
                    final[_FINAL_WORDS[word]] += int(n)
    counts = final if final is not None else {key: len(ids) for key, ids in per_test.items()}
    return {**counts, "complete": final is not None, "failed_tests": sorted(per_test["failed"] | per_test["errors"])}


def current_commit() -> str:
    """HEAD of the repository, with `+dirty` when the work tree differs from it; `unknown` without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git repository where the tests ran; pass --commit)"
    return head + ("+dirty" if dirty else "")


def write_summary(log: Path, *, command: str, machine: str, commit: str | None = None, exit_code: int | None = None,
                  out_dir: Path = REPO / "benchmarks" / "results" / "gpu_tests", copy_to: Path | None = None,
                  now: dt.datetime | None = None) -> Path:
    """Parse `log` and write the summary JSON into `out_dir` (and `copy_to`); returns the file written."""
    now = now or dt.datetime.now(dt.timezone.utc)
    commit = commit or current_commit()
    summary = {"date": now.isoformat(timespec="seconds"), "commit": commit, "machine": machine, "command": command,
               **parse_log(log.read_text(errors="replace")), "exit_code": exit_code}
    name = f"{now.strftime('%Y-%m-%dT%H%M%SZ')}_{re.sub(r'[^0-9a-zA-Z+]', '', commit.split()[0])[:13]}.json"
    text = json.dumps(summary, indent=1) + "\n"
    path = None
    for folder in [out_dir] + ([copy_to] if copy_to else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        path = path or folder / name
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="the pytest output (run with -v so a run cut short can still be counted)")
    p.add_argument("--command", required=True, help="the pytest command that wrote the log")
    p.add_argument("--machine", required=True, help="which machine and GPU ran it")
    p.add_argument("--commit", default=None, help="the commit tested (default: git HEAD here, +dirty if changed)")
    p.add_argument("--exit-code", type=int, default=None, help="pytest's exit status (124: stopped by `timeout`)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results" / "gpu_tests"))
    p.add_argument("--copy-to", default=None, help="a second folder for the same file (a device call's $OUT)")
    args = p.parse_args(argv)
    path = write_summary(Path(args.log), command=args.command, machine=args.machine, commit=args.commit,
                         exit_code=args.exit_code, out_dir=Path(args.out_dir),
                         copy_to=Path(args.copy_to) if args.copy_to else None)
    s = json.loads(path.read_text())
    print(f"{path}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped, {s['errors']} errors"
          + ("" if s["complete"] else " (run stopped before the end)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
