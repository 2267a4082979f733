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
