"""Markdown summary of Nsight Compute CSV exports: one row per profiled kernel launch.

`profile_kernels.py` gives `ncu` a fixed block-sparse workload; `ncu --csv` writes one line per metric,
which is unreadable at a glance. This prints the figures that say what limits a kernel:

    python benchmarks/ncu_summary.py benchmarks/results/kernels/ncu/ncu_streaming_hkv8.csv ...

duration, SM (compute) and memory throughput as % of peak, DRAM throughput, registers per thread,
dynamic shared memory per block, theoretical and achieved occupancy (warps per SM), the occupancy
limiter, warp cycles per issued instruction (the latency each warp waits between instructions) and
waves per SM.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

COLUMNS = {
    "Duration": "ms",
    "Compute (SM) Throughput": "SM %",
    "Memory Throughput": "mem %",
    "DRAM Throughput": "DRAM %",
    "Registers Per Thread": "regs",
    "Dynamic Shared Memory Per Block": "smem KiB",
    "Theoretical Active Warps per SM": "warps/SM (theory)",
    "Achieved Active Warps Per SM": "warps/SM (achieved)",
    "Warp Cycles Per Issued Instruction": "cycles/issue",
    "Waves Per SM": "waves",
}
LIMITS = ("Block Limit Registers", "Block Limit Shared Mem", "Block Limit Warps", "Block Limit SM")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarise(path: Path) -> list[dict[str, str]]:
    """One dict per kernel launch in an `ncu --csv` export: the COLUMNS figures plus the occupancy limiter."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    launches: dict[str, dict[str, str]] = {}
    limits: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(lines[start:]):
        launch = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"], "grid": row["Grid Size"]})
        name, unit, value = row["Metric Name"], row["Metric Unit"], row["Metric Value"]
        number = _number(value)
        if name == "Memory Throughput" and unit != "%":
            continue  # the Memory Workload section repeats the name in byte/s; the % of peak is the one wanted
        if name in COLUMNS and number is not None:
            if name == "Duration":  # ns or us or ms depending on the ncu version
                number *= {"ns": 1e-6, "us": 1e-3, "usecond": 1e-3, "msecond": 1.0, "ms": 1.0}.get(unit, 1e-6)
            elif name == "Dynamic Shared Memory Per Block":
                number /= 1024 if unit == "byte/block" else 1
            launch[COLUMNS[name]] = f"{number:.3g}" if name == "Duration" else f"{number:.4g}"
        if name in LIMITS and number is not None:
            limits.setdefault(row["ID"], {})[name.removeprefix("Block Limit ")] = number
    for launch_id, launch in launches.items():
        by_limit = limits.get(launch_id)
        if by_limit:
            smallest = min(by_limit.values())
            launch["limited by"] = "/".join(k for k, v in by_limit.items() if v == smallest) + f" ({smallest:g} blocks)"
    return list(launches.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", type=Path, help="ncu --csv exports")
    args = p.parse_args(argv)
    header = ["file", "kernel", "grid", *COLUMNS.values(), "limited by"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in args.csv:
        for launch in summarise(path):
            cells = [path.stem, launch["kernel"], launch["grid"]] + [launch.get(c, "") for c in header[3:]]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
