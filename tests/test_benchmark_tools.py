"""Benchmark tools that run on this machine: the Nsight Compute summary, on a real ncu export."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from ncu_summary import summarise  # noqa: E402


def test_ncu_summary_reads_a_real_export():
    """The H200 export of the streaming layout (GQA 4): three launches in kernel order, ncu's own
    duration converted from ns (856,384 ns -> 0.856 ms), the % of peak rather than the byte/s figure
    that shares its name, and the tightest occupancy limit (dQ: 2 blocks by registers, 3 by shared memory)."""
    rows = summarise(ROOT / "benchmarks/results/ncu/ncu_streaming_hkv8.csv")
    assert [r["kernel"] for r in rows] == ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"]
    assert rows[0]["ms"] == "0.856" and rows[1]["ms"] == "1.13"
    assert rows[0]["mem %"] == "44.02" and rows[2]["SM %"] == "8.19"
    assert rows[1]["limited by"] == "Registers (2 blocks)"
    assert rows[0]["limited by"] == "Registers/Shared Mem (2 blocks)"


def test_kernels_table_keeps_the_latest_row_per_shape():
    """kernels_table.py on the real kernels.jsonl: one table row per (layout, T, KV heads, pass,
    memory layout), each the last such line of the file, with Flex / ours computed from that line."""
    import json

    from kernels_table import latest_rows, markdown

    path = ROOT / "benchmarks/results/kernels.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    keys = {(r["layout"], r["T"], r["Hkv"], r["pass"], r.get("qkv_memory", "bthd")) for r in lines}
    rows = latest_rows(path)
    assert len(rows) == len(keys) < len(lines)  # the file holds repeated runs of some shapes
    last_sf = [r for r in lines if (r["layout"], r["T"], r["Hkv"], r["pass"]) == ("sf", 8192, 32, "fwd+bwd")][-1]
    assert last_sf in rows
    table = markdown(rows).splitlines()
    assert len(table) == len(rows) + 2
    sf_line = next(x for x in table if x.startswith("| sf | 8K | fwd+bwd | 32 |"))
    assert f"| {last_sf['ms_flex'] / last_sf['ms_headwise']:.2f}x |" in sf_line


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
