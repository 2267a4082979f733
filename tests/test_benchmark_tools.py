"""Benchmark tools that run on this machine: the Nsight Compute summary on a real ncu export, the kernel
table of `report.py`, the merge of rows measured elsewhere, and the GPU test-run summary."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from ncu_summary import summarise  # noqa: E402


def test_ncu_summary_reads_a_real_export():
    """The H200 export of the streaming layout (GQA 4): three launches in kernel order, ncu's own
    duration converted from ns (856,384 ns -> 0.856 ms), the % of peak rather than the byte/s figure
    that shares its name, and the tightest occupancy limit (dQ: 2 blocks by registers, 3 by shared memory)."""
    rows = summarise(ROOT / "benchmarks/results/kernels/ncu/ncu_streaming_hkv8.csv")
    assert [r["kernel"] for r in rows] == ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"]
    assert rows[0]["ms"] == "0.856" and rows[1]["ms"] == "1.13"
    assert rows[0]["mem %"] == "44.02" and rows[2]["SM %"] == "8.19"
    assert rows[1]["limited by"] == "Registers (2 blocks)"
    assert rows[0]["limited by"] == "Registers/Shared Mem (2 blocks)"


def test_kernels_table_keeps_the_latest_row_per_shape():
    """report.py's kernel table on the real kernels.jsonl: one table row per (layout, T, KV heads, pass,
    memory layout), each the last such line of the file, with Flex / ours computed from that line."""
    import json

    from report import latest_rows, markdown

    path = ROOT / "benchmarks/results/kernels.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    # bench_moh.py's rows (layout "moh:<router>") time a MoH layer, not a kernel layout: not in this table
    keys = {(r["layout"], r["T"], r["Hkv"], r["pass"], r.get("qkv_memory", "bthd")) for r in lines
            if not r["layout"].startswith("moh:")}
    rows = latest_rows(path)
    assert len(rows) == len(keys) < len(lines)  # the file holds repeated runs of some shapes
    last_sf = [r for r in lines if (r["layout"], r["T"], r["Hkv"], r["pass"]) == ("sf", 32768, 8, "fwd+bwd")][-1]
    assert last_sf in rows and last_sf["ms_flex"] is not None
    table = markdown(rows).splitlines()
    assert len(table) == len(rows) + 2
    sf_line = next(x for x in table if x.startswith("| sf | 32K | fwd+bwd | 8 |"))
    assert f"| {last_sf['ms_flex'] / last_sf['ms_headwise']:.2f}x |" in sf_line
    no_flex = [r for r in rows if r["ms_flex"] is None]  # runs made with --no-flex: Flex cells are "-"
    assert no_flex and all("| - | - | - |" in line for line in table if line.startswith(f"| {no_flex[0]['layout']} |")
                           and f"| {no_flex[0]['Hkv']} |" in line and "12-03" in line)


def test_merging_device_rows_records_the_machine_and_a_rerunnable_command(tmp_path):
    """A real row from kernels.jsonl, as the GPU machine wrote it (its --out and --budget-s options),
    merged into a results file: the machine and note are recorded, the run-local options dropped, the
    measurement untouched, and the rows already in the file kept."""
    import json

    from results_io import merge_rows

    row = json.loads((ROOT / "benchmarks/results/kernels.jsonl").read_text().splitlines()[-1])
    row.pop("machine", None)
    measured = dict(row)
    row["command"] = ("python benchmarks/bench_kernels.py --quick --budget-s 500 --layouts s2 "
                      "--plan 8192:fwd+bwd:32 --out=/root/out/k.jsonl")
    src, dst = tmp_path / "device.jsonl", tmp_path / "results.jsonl"
    src.write_text(json.dumps(row) + "\n")
    dst.write_text('{"layout": "earlier"}\n')
    assert merge_rows(src, dst, "GPU 0 of nvidia-h200-x2", note="eighth session") == 1
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    assert lines[0] == {"layout": "earlier"} and len(lines) == 2
    merged = lines[1]
    assert merged["command"] == "python benchmarks/bench_kernels.py --quick --layouts s2 --plan 8192:fwd+bwd:32"
    assert merged["machine"] == "GPU 0 of nvidia-h200-x2" and merged["note"] == "eighth session"
    assert {k: v for k, v in merged.items() if k not in ("command", "machine", "note")} == \
        {k: v for k, v in measured.items() if k not in ("command", "note")}


_SUITE = '''
import pytest

def test_a(): pass
def test_b(): pass
def test_c(): assert 1 == 2
@pytest.mark.skip(reason="not here")
def test_d(): pass
@pytest.mark.xfail(reason="known")
def test_e(): assert False
'''


def _run_suite(tmp_path):
    """A real `pytest -v` run of a suite whose outcomes are known by construction: 2 passed, 1 failed,
    1 skipped, 1 xfailed."""
    import subprocess

    (tmp_path / "test_suite.py").write_text(_SUITE)
    res = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rf", "--tb=line",
                          "test_suite.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout[-2000:]
    return res.stdout


def test_gpu_test_summary_counts_a_finished_run(tmp_path):
    """gpu_tests_summary.py on a finished run reads pytest's closing line: the counts of the suite."""
    from gpu_tests_summary import parse_log

    got = parse_log(_run_suite(tmp_path))
    assert {k: got[k] for k in ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")} == \
        {"passed": 2, "failed": 1, "skipped": 1, "errors": 0, "xfailed": 1, "xpassed": 0}
    assert got["complete"] is True
    assert got["failed_tests"] == ["test_suite.py::test_c"]


def test_gpu_test_summary_counts_a_run_cut_short(tmp_path):
    """A run stopped by its time limit writes no closing line: the counts come from the per-test lines that
    were written, and `complete` says the run did not finish. Under xdist the outcome leads the line."""
    from gpu_tests_summary import parse_log

    log = _run_suite(tmp_path)
    cut = log[: log.index("test_suite.py::test_e")]  # killed while test_e ran
    got = parse_log(cut)
    assert (got["passed"], got["failed"], got["skipped"], got["xfailed"], got["complete"]) == (2, 1, 1, 0, False)

    xdist = ("[gw0] [ 25%] PASSED tests/kernels/test_a.py::test_one[bf16]\n"
             "[gw1] [ 50%] FAILED tests/kernels/test_a.py::test_two\n"
             "[gw0] [ 75%] SKIPPED tests/kernels/test_b.py::test_gpu_only\n"
             "[gw1] [100%] PASSED tests/kernels/test_a.py::test_one[fp16]\n")
    got = parse_log(xdist)
    assert (got["passed"], got["failed"], got["skipped"], got["complete"]) == (2, 1, 1, False)
    assert got["failed_tests"] == ["tests/kernels/test_a.py::test_two"]


def test_gpu_test_summary_file(tmp_path):
    """The summary file: one JSON per run, named by date and commit, in the results folder and the copy folder,
    holding the date, commit, machine, command, counts and exit code."""
    import datetime as dt
    import json

    from gpu_tests_summary import write_summary

    log = tmp_path / "tests.log"
    log.write_text(_run_suite(tmp_path))
    when = dt.datetime(2026, 12, 3, 14, 5, 9, tzinfo=dt.timezone.utc)
    path = write_summary(log, command="pytest tests/kernels", machine="NVIDIA H200 x 1", commit="d41f3e8abc",
                         exit_code=1, out_dir=tmp_path / "gpu_tests", copy_to=tmp_path / "out", now=when)
    assert path == tmp_path / "gpu_tests" / "2026-12-03T140509Z_d41f3e8abc.json"
    assert (tmp_path / "out" / path.name).read_text() == path.read_text()
    summary = json.loads(path.read_text())
    assert summary["date"] == "2026-12-03T14:05:09+00:00" and summary["commit"] == "d41f3e8abc"
    assert (summary["machine"], summary["command"], summary["exit_code"]) == ("NVIDIA H200 x 1", "pytest tests/kernels", 1)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (2, 1, 1)
