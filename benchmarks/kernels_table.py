"""The standing of every kernel layout: the latest row per shape of `results/kernels.jsonl`, as markdown.

    python benchmarks/kernels_table.py                 # -> the table in BENCHMARKS.md, "Where each layout stands"
    python benchmarks/kernels_table.py --T 32768       # one length

`bench_kernels.py` appends one row per (layout, T, KV heads, pass) and run, so the file holds every
run since the first. This keeps the last row of each shape and memory layout (rows are appended in
time order) and prints, per row: the form dispatch ran then (`impl`), its time, the other forms timed
in the same run, FlexAttention's time, Flex over ours and over the fastest form of the run (where
dispatch has since moved to that form, as the sliding window to the band), cuDNN dense over ours,
and the efficiency on computed tiles (`ms_cudnn * tile_density / ms_headwise`). Nothing is re-measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "kernels.jsonl"
LAYOUT_ORDER = ["s2", "sf", "longlora", "streaming", "sliding_window", "dense"]
FORMS = ("block_sparse", "regrouped", "regrouped_fe", "band")  # the ms_<form> columns bench_kernels writes


def latest_rows(path: Path) -> list[dict]:
    """The last row per (layout, T, Hkv, pass, qkv_memory), ordered by layout, pass, T, then KV heads."""
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["layout"], r["T"], r["Hkv"], r["pass"], r.get("qkv_memory", "bthd"))] = r
    order = {name: i for i, name in enumerate(LAYOUT_ORDER)}
    return sorted(rows.values(), key=lambda r: (order.get(r["layout"], len(order)), r["pass"] != "fwd+bwd",
                                                r["T"], -r["Hkv"]))


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _ms(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


def markdown(rows: list[dict]) -> str:
    cols = ["layout", "T", "pass", "KV heads", "form", "ms", "other forms, ms", "Flex ms", "Flex / ours",
            "Flex / fastest form", "cuDNN dense / ours", "eff", "date"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ours, impl = r.get("ms_headwise"), r.get("impl", "block_sparse")
        others = ", ".join(f"{f} {_ms(r[f'ms_{f}'])}" for f in FORMS if f != impl and r.get(f"ms_{f}") is not None)
        eff = r.get("eff_vs_cudnn")
        fastest = min([t for t in [ours] + [r.get(f"ms_{f}") for f in FORMS] if isinstance(t, (int, float))],
                      default=None)
        if r.get("qkv_memory", "bthd") != "bthd":
            impl += f" ({r['qkv_memory']})"
        cells = [r["layout"], f"{r['T'] // 1024}K", r["pass"], r["Hkv"], impl, _ms(ours), others or "-",
                 _ms(r.get("ms_flex")), _ratio(r.get("ms_flex"), ours), _ratio(r.get("ms_flex"), fastest),
                 _ratio(r.get("ms_cudnn"), ours),
                 "-" if eff is None else f"{eff:.2f}", r["date"][:10]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(DEFAULT))
    p.add_argument("--T", type=int, default=None, help="only rows of this length")
    args = p.parse_args(argv)
    rows = [r for r in latest_rows(Path(args.results)) if args.T is None or r["T"] == args.T]
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
