"""Every figure README.md and docs/ show, rendered from the rows of `benchmarks/results/`.

    python benchmarks/report.py --check              # exit 1, naming each document and region that disagrees
    python benchmarks/report.py --write              # rewrite every generated region from the results
    python benchmarks/report.py --show kernels-latest   # print one region, as docs/benchmarks.md holds it
    python benchmarks/report.py --list               # the regions and the documents that use them

A document marks a generated region with two HTML comments, which markdown renders as nothing:

    <!-- report:NAME -->             a block region: the markers on lines of their own, a table between them
    ...
    <!-- /report -->

    text <!-- report:NAME -->1.59x<!-- /report --> text      an inline region, inside a sentence

Everything between the markers belongs to this script: `--write` replaces it, `--check` compares it.
A block region ends with the rows it came from: the results file (a link), the line numbers, and per
command, date and machine which lines that command wrote. An inline figure is a link to its rows
(`kernels.jsonl#L93-L96`), titled with their command, date and machine. The region renderers are the
`@region` functions below; each selects rows by the fields the benchmark drivers write and computes
nothing it could not show (ratios are the rows' own or two rows' quotient, counts are accuracy x samples).

No torch, no headwise: this reads JSON and runs in well under a second.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PREFIX = "benchmarks/results"  # how rows' files are named in documents, whatever --results points at

# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


class Row(dict):
    """One results row as its file holds it; `file` (as a document names it) and `line` (1-based) say where.

    A plain dict otherwise: equal to the parsed JSON object, so callers can compare it with `json.loads`."""

    file: str = ""
    line: int = 0


def read_rows(path: Path, name: str) -> list[Row]:
    """The rows of the JSON-lines file `path` (blank lines skipped), each knowing its line number."""
    rows = []
    for i, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip():
            row = Row(json.loads(text))
            row.file, row.line = name, i
            rows.append(row)
    return rows


class Results:
    """The results folder: `rows("kernels")` reads `kernels.jsonl` once; `summaries(...)` reads JSON files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._rows: dict[str, list[Row]] = {}

    def rows(self, bench: str) -> list[Row]:
        if bench not in self._rows:
            self._rows[bench] = read_rows(self.folder / f"{bench}.jsonl", f"{RESULTS_PREFIX}/{bench}.jsonl")
        return self._rows[bench]

    def summaries(self, sub: str) -> list[Row]:
        """Every `sub/*.json` file as one row (line 0), sorted by file name."""
        out = []
        for path in sorted((self.folder / sub).glob("*.json")):
            row = Row(json.loads(path.read_text()))
            row.file, row.line = f"{RESULTS_PREFIX}/{sub}/{path.name}", 0
            out.append(row)
        return out


def tag_of(row: Row) -> str | None:
    """The `--tag` a benchmark command was given (duo_smollm2.py names its evaluations by it)."""
    m = re.search(r"--tag[ =](\S+)", row.get("command") or "")
    return m.group(1) if m else None


def latest(rows: Iterable[Row], key: Callable[[Row], object]) -> list[Row]:
    """The last row (files are appended in time order) of every `key`, in the order of those last rows."""
    last: dict[object, Row] = {}
    for r in rows:
        last[key(r)] = r
    return sorted(last.values(), key=lambda r: r.line)


def one(rows: Iterable[Row], what: str) -> Row:
    """The single row of `rows`; a missing or duplicated row is an error naming `what`."""
    found = list(rows)
    if len(found) != 1:
        raise LookupError(f"{what}: expected one results row, found {len(found)}")
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# Citing rows
# ---------------------------------------------------------------------------------------------------------------


def line_ranges(lines: Iterable[int]) -> str:
    """`[3, 4, 5, 9]` -> `3-5, 9`."""
    nums = sorted(set(lines))
    parts, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(parts)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Citer:
    """Renders one region for one document: links relative to the document, and the rows it used."""

    def __init__(self, results: Results, doc: Path, root: Path) -> None:
        self.results, self.doc, self.root = results, doc, root
        self.used: list[Row] = []

    def href(self, file: str, lines: Sequence[int] = ()) -> str:
        """Link from the document to `file` (a repository path), at its lines where there are any."""
        rel = os.path.relpath(self.root / file, self.doc.parent).replace(os.sep, "/")
        lines = [n for n in lines if n]
        if not lines:
            return rel
        lo, hi = min(lines), max(lines)
        return f"{rel}#L{lo}" if lo == hi else f"{rel}#L{lo}-L{hi}"

    def cite(self, rows: Iterable[Row]) -> list[Row]:
        rows = list(rows)
        self.used.extend(rows)
        return rows

    def link(self, text: str, rows: Iterable[Row]) -> str:
        """`text` as a link to `rows` (one file), titled with their command, date and machine."""
        rows = self.cite(rows)
        files = {r.file for r in rows}
        if len(files) != 1:
            raise ValueError(f"an inline figure links to one results file, got {sorted(files)}")
        groups = list(_groups(rows))
        _, cmd, date, machine = groups[0]
        title = f"{cmd} ({date}, {machine})"
        if len(groups) > 1:
            title += f"; and {len(groups) - 1} more {'command' if len(groups) == 2 else 'commands'}"
        title = title.replace('"', "'")
        return f'[{text}]({self.href(rows[0].file, [r.line for r in rows])} "{title}")'

    def footer(self) -> str:
        """Which rows the region shows: per file a link and the lines, then each command's lines."""
        if not self.used:
            return ""
        by_file: dict[str, list[Row]] = {}
        for r in self.used:
            by_file.setdefault(r.file, []).append(r)
        heads, table = [], ["| file | lines | date | machine | command |", "|---|---|---|---|---|"]
        for file, rows in by_file.items():
            lines = sorted({r.line for r in rows if r.line})
            where = f", lines {line_ranges(lines)}" if lines else ""
            n = len({(r.file, r.line) for r in rows})
            heads.append(f"[`{Path(file).name}`]({self.href(file)}){where} ({n} {'row' if n == 1 else 'rows'})")
            for (_, cmd, date, machine), group in _groups(rows).items():
                glines = line_ranges(r.line for r in group if r.line) or "-"
                table.append(f"| {Path(file).name} | {glines} | {_cell(date)} | {_cell(machine)} | `{_cell(cmd)}` |")
        return ("<sub>Source: " + "; ".join(heads) + ".</sub>\n\n<details><summary>The rows by command, date and "
                "machine</summary>\n\n" + "\n".join(table) + "\n\n</details>")


def _groups(rows: Iterable[Row]) -> dict[tuple, list[Row]]:
    """Rows grouped by (file, command, date, machine), in line order."""
    out: dict[tuple, list[Row]] = {}
    for r in sorted(rows, key=lambda r: (r.file, r.line)):
        key = (r.file, r.get("command") or "(no command recorded)", str(r.get("date") or "?")[:10],
               r.get("machine") or "(no machine recorded)")
        out.setdefault(key, []).append(r)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RegionSpec:
    name: str
    render: Callable[[Citer], str]
    inline: bool
    doc: str = ""


REGIONS: dict[str, RegionSpec] = {}


def region(name: str, *, inline: bool = False) -> Callable:
    def wrap(fn: Callable[[Citer], str]) -> Callable[[Citer], str]:
        REGIONS[name] = RegionSpec(name, fn, inline, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def _x(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}x"


def _ms(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K"


# --- kernels -----------------------------------------------------------------------------------------------------

LAYOUT_ORDER = ["s2", "sf", "longlora", "streaming", "sliding_window", "dense"]
LAYOUT_NAMES = {"s2": "S2 strided", "sf": "SF-Attn (shifted groups + 4 sinks)", "longlora": "LongLoRA S2-Attn",
                "streaming": "streaming 128 + 256", "sliding_window": "sliding window 4K", "dense": "dense causal"}
FORMS = ("block_sparse", "regrouped", "regrouped_fe", "band")  # the ms_<form> columns bench_kernels.py writes
# The forms `auto` dispatch can choose; regrouped_fe is opt-in (HEADWISE_SHIFTED_GROUPS_IMPL=regrouped_fe).
AUTO_FORMS = ("block_sparse", "regrouped", "band")


def _kernel_key(r: dict) -> tuple:
    return (r["layout"], r["T"], r["Hkv"], r["pass"], r.get("qkv_memory", "bthd"))


def latest_rows(path: Path) -> list[dict]:
    """The last row per (layout, T, Hkv, pass, qkv_memory) of a kernels.jsonl, ordered by layout, pass, T,
    then KV heads (`bench_kernels.py` appends one row per shape and run, so the file holds every run)."""
    rows = latest(layout_rows(read_rows(Path(path), f"{RESULTS_PREFIX}/{Path(path).name}")), _kernel_key)
    return _kernel_order(rows)


MOH_LAYOUT_PREFIX = "moh:"  # bench_moh.py's rows in kernels.jsonl: one MoH layer, not a layout of the kernel family


def layout_rows(rows: Iterable[Row]) -> list[Row]:
    """The rows of kernels.jsonl that time a layout of the block-sparse family (bench_kernels.py's), without MoH's."""
    return [r for r in rows if not str(r.get("layout", "")).startswith(MOH_LAYOUT_PREFIX)]


def _kernel_order(rows: list) -> list:
    order = {name: i for i, name in enumerate(LAYOUT_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["layout"], len(order)), r["pass"] != "fwd+bwd", r["T"], -r["Hkv"]))


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def fastest_auto_ms(r: dict) -> float | None:
    """The fastest time of the row among the forms `auto` dispatch can choose for its layout (the Triton
    kernel everywhere, the regrouped cuDNN form for shifted groups, cuDNN's band for the sliding window;
    the form the row ran included)."""
    eligible = {"sf": ("block_sparse", "regrouped"), "longlora": ("block_sparse", "regrouped"),
                "sliding_window": ("block_sparse", "band")}.get(r.get("layout"), ("block_sparse",))
    times = [r.get("ms_headwise")] + [r.get(f"ms_{f}") for f in AUTO_FORMS if f in eligible]
    times = [t for t in times if isinstance(t, (int, float))]
    return min(times) if times else None


def markdown(rows: list[dict]) -> str:
    """The per-shape kernel table: the form dispatch ran then, its time, the other forms timed in the same
    run, FlexAttention's time, Flex over ours and over the fastest form `auto` dispatch can choose, cuDNN
    dense over ours, and the efficiency on computed tiles (`ms_cudnn * tile_density / ms_headwise`)."""
    cols = ["layout", "T", "pass", "KV heads", "form", "ms", "other forms, ms", "Flex ms", "Flex / ours",
            "Flex / fastest form", "cuDNN dense / ours", "eff", "date"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ours, impl = r.get("ms_headwise"), r.get("impl", "block_sparse")
        others = ", ".join(f"{f} {_ms(r[f'ms_{f}'])}" for f in FORMS if f != impl and r.get(f"ms_{f}") is not None)
        eff = r.get("eff_vs_cudnn")
        fastest = fastest_auto_ms(r)
        if r.get("qkv_memory", "bthd") != "bthd":
            impl += f" ({r['qkv_memory']})"
        cells = [r["layout"], _k(r["T"]), r["pass"], r["Hkv"], impl, _ms(ours), others or "-",
                 _ms(r.get("ms_flex")), _ratio(r.get("ms_flex"), ours), _ratio(r.get("ms_flex"), fastest),
                 _ratio(r.get("ms_cudnn"), ours), "-" if eff is None else f"{eff:.2f}", str(r["date"])[:10]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _kernel_latest(c: Citer) -> list[Row]:
    return _kernel_order(latest(layout_rows(c.results.rows("kernels")), _kernel_key))


@region("kernels-latest")
def kernels_latest(c: Citer) -> str:
    """Every kernel shape's latest row (B=1, 32 query heads, head_dim 128, bf16, H200)."""
    return markdown(c.cite(_kernel_latest(c)))


KERNEL_COLUMNS = [(8192, "fwd+bwd"), (16384, "fwd+bwd"), (32768, "fwd+bwd"), (131072, "fwd")]


def _vs_flex(c: Citer, layout: str, T: int, pas: str) -> tuple[str, list[Row]]:
    """Flex over ours from the latest run of each shape that timed FlexAttention (runs with --no-flex have none)."""
    timed = latest((r for r in layout_rows(c.results.rows("kernels")) if r.get("ms_flex") is not None), _kernel_key)
    rows = [r for r in _kernel_order(timed) if (r["layout"], r["T"], r["pass"]) == (layout, T, pas)
            and r.get("qkv_memory", "bthd") == "bthd"]
    by_hkv = {r["Hkv"]: r for r in rows}
    cells = [_ratio(by_hkv[h].get("ms_flex"), fastest_auto_ms(by_hkv[h])) if h in by_hkv else "-" for h in (32, 8)]
    return " / ".join(cells), rows


@region("kernels-vs-flex")
def kernels_vs_flex(c: Citer) -> str:
    """FlexAttention's time over headwise's per layout and length, 32 / 8 KV heads."""
    head = "| layout | " + " | ".join(f"{_k(T)} {p}" for T, p in KERNEL_COLUMNS) + " |"
    lines = [head, "|---|" + "---|" * len(KERNEL_COLUMNS)]
    for layout in LAYOUT_ORDER:
        cells = []
        for T, p in KERNEL_COLUMNS:
            text, rows = _vs_flex(c, layout, T, p)
            c.cite(rows)
            cells.append(text)
        lines.append(f"| {LAYOUT_NAMES[layout]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flex_figure(c: Citer, layout: str, T: int, pas: str) -> str:
    text, rows = _vs_flex(c, layout, T, pas)
    parts = text.split(" / ")
    if len(set(parts)) == 1:
        text = parts[0]
    return c.link(text, rows)


@region("status-kernels", inline=True)
def status_kernels(c: Citer) -> str:
    """FlexAttention over headwise at 32K forward + backward, per layout."""
    names = {"s2": "S2", "sf": "SF", "longlora": "LongLoRA", "streaming": "streaming", "sliding_window":
             "sliding window", "dense": "dense causal"}
    return ", ".join(f"{names[lay]} {_flex_figure(c, lay, 32768, 'fwd+bwd')}" for lay in LAYOUT_ORDER)


def _latest_kernel_row(c: Citer, layout: str, T: int, hkv: int, pas: str, need: str = "ms_headwise") -> Row | None:
    rows = [r for r in c.results.rows("kernels") if (r["layout"], r["T"], r["Hkv"], r["pass"]) == (layout, T, hkv, pas)
            and r.get(need) is not None]
    return rows[-1] if rows else None


@region("kernels-model-rules")
def kernels_model_rules(c: Citer) -> str:
    """A model's own rules composed with SF-Attn on Mistral-7B's shape (32 heads, 8 KV heads, head_dim 128) at
    32K: its 4096-token window against FlexAttention with the same mask, and the softcap's cost in our kernel."""
    lines = ["| 32K, 8 KV heads | pass | ours, ms | compared with, ms | ratio |", "|---|---|---|---|---|"]
    for pas in ("fwd+bwd", "fwd"):
        win = _latest_kernel_row(c, "sf+window", 32768, 8, pas, need="ms_flex")
        if win is not None:
            c.cite([win])
            lines.append(f"| SF-Attn ∩ 4096 window | {pas} | {_ms(win['ms_headwise'])} | FlexAttention "
                         f"{_ms(win['ms_flex'])} | Flex / ours {_ratio(win['ms_flex'], win['ms_headwise'])} |")
    for pas in ("fwd+bwd", "fwd"):
        capped = _latest_kernel_row(c, "sf+softcap", 32768, 8, pas)
        plain = _latest_kernel_row(c, "sf", 32768, 8, pas, need="ms_block_sparse")
        if capped is not None and plain is not None:
            c.cite([capped, plain])
            lines.append(f"| SF-Attn with softcap 50 | {pas} | {_ms(capped['ms_headwise'])} | the same kernel without "
                         f"{_ms(plain['ms_block_sparse'])} | cost {_ratio(capped['ms_headwise'], plain['ms_block_sparse'])} |")
    return "\n".join(lines)


@region("status-s2", inline=True)
def status_s2(c: Citer) -> str:
    """The S2 layout against FlexAttention."""
    return (f"{_flex_figure(c, 's2', 32768, 'fwd+bwd')} FlexAttention's speed at 32K forward + backward and "
            f"{_flex_figure(c, 's2', 131072, 'fwd')} at 128K forward (32 / 8 KV heads)")


@region("dense-128k", inline=True)
def dense_128k(c: Citer) -> str:
    """The dense layout's 128K forward, first and latest run."""
    rows = [r for r in c.results.rows("kernels") if (r["layout"], r["T"], r["Hkv"], r["pass"]) ==
            ("dense", 131072, 32, "fwd")]
    first, last = rows[0], rows[-1]
    a, b = "%.1f ms" % first["ms_headwise"], "%.1f ms" % last["ms_headwise"]
    return (f"{c.link(a, [first])} on {str(first['date'])[:10]}, "
            f"{c.link(b, [last])} on {str(last['date'])[:10]}")


NCU_RUN = "kernels/ncu"  # Nsight Compute exports of one run, with run.json saying when, where and how


@region("ncu-profile")
def ncu_profile(c: Citer) -> str:
    """What limits each Triton kernel: Nsight Compute's figures per launch (`ncu_summary.py`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ncu_summary import summarise  # noqa: E402  (a sibling script: csv parsing only)

    folder = c.results.folder / NCU_RUN
    run = json.loads((folder / "run.json").read_text())
    names = {"_fwd_kernel": "forward", "_bwd_dq_kernel": "dQ", "_bwd_dkdv_kernel": "dK/dV"}
    lines = ["| workload | kernel | ms | SM % of peak | memory % of peak | DRAM % | registers | smem KiB / block | "
             "warps / SM | limited by | cycles / issue |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.csv")):
        row = Row(run)
        row.file, row.line = f"{RESULTS_PREFIX}/{NCU_RUN}/{path.name}", 0
        c.cite([row])
        layout, _, hkv = path.stem.removeprefix("ncu_").rpartition("_hkv")
        for k in summarise(path):
            lines.append(f"| {layout}, {hkv} KV heads | {names.get(k['kernel'], k['kernel'])} | {k.get('ms', '-')} | "
                         f"{k.get('SM %', '-')} | {k.get('mem %', '-')} | {k.get('DRAM %', '-')} | {k.get('regs', '-')} | "
                         f"{k.get('smem KiB', '-')} | {k.get('warps/SM (achieved)', '-')} | {k.get('limited by', '-')} | "
                         f"{k.get('cycles/issue', '-')} |")
    return "\n".join(lines)


@region("kernel-tuning-stages")
def kernel_tuning_stages(c: Citer) -> str:
    """The kernel tuning sweeps: per stage, the layouts swept and the rows."""
    rows = c.results.rows("kernel_tuning")
    stages: dict[str, list[Row]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    lines = ["| stage | layouts | T | timings (correct) | dates |", "|---|---|---|---|---|"]
    for stage, group in stages.items():
        layouts = ", ".join(dict.fromkeys(r["layout"] for r in group))
        lengths = ", ".join(_k(t) for t in sorted({r["T"] for r in group}))
        dates = sorted({str(r["date"])[:10] for r in group})
        ok = sum(1 for r in group if r.get("correct"))
        span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines.append(f"| `{stage}` | {layouts} | {lengths} | {len(group)} ({ok}) | {span} |")
    c.cite(rows)
    return "\n".join(lines)


# --- training speed ----------------------------------------------------------------------------------------------

TRAIN_METHODS = {"dense": "dense SDPA", "sf": "SF-Attn (SinkLoRA, 4 sinks)", "longlora": "LongLoRA S2-Attn"}


def _train_setting(r: Row) -> str:
    if r.get("fused_ops") and r.get("loss") == "liger":
        return "+ Liger's ops and loss"
    if r.get("fused_ops"):
        return "+ Liger's ops"
    return "default"


def _run_methods(r: Row) -> set[str]:
    """The methods a bench_train.py run measured (its `--methods`, implementation suffixes dropped): a dense row is
    the baseline of the methods beside it."""
    found = re.search(r"--methods[ =](\S+)", r.get("command", ""))
    return {m.partition("@")[0] for m in found.group(1).split(",")} if found else set()


def _train_rows(c: Citer, methods: dict[str, str] = TRAIN_METHODS) -> list[Row]:
    """The latest row per (setting, context, method) on today's path (fused LoRA forward, full pieces), from runs
    that measured one of `methods` beside dense."""
    rows = [r for r in c.results.rows("train") if r.get("peft_forward") == "fused" and r.get("max_piece_heads") is None
            and r["method"] in methods and _run_methods(r) & (set(methods) - {"dense"})]
    return latest(rows, lambda r: (_train_setting(r), r["context"], r["method"]))


@region("train-speed")
def train_speed(c: Citer) -> str:
    """One LoRA step of a Llama-3-8B shape, per attention method, with dense in the same run."""
    order = ["default", "+ Liger's ops", "+ Liger's ops and loss"]
    rows = sorted(_train_rows(c), key=lambda r: (r["context"], order.index(_train_setting(r)),
                                                  list(TRAIN_METHODS).index(r["method"])))
    lines = ["| setting | context | method | s/step | tokens/s | peak GiB | tensor bytes at the peak, MiB | vs dense "
             "(same run) |", "|---|---|---|---|---|---|---|---|"]
    for r in c.cite(rows):
        ratio = "1.00x" if r["method"] == "dense" else f"{r['ratio_to_dense']}x"
        req = r.get("peak_requested_mib")
        lines.append(f"| {_train_setting(r)} | {_k(r['context'])} | {TRAIN_METHODS[r['method']]} | {r['s_per_step']:.3f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.2f} | {'-' if req is None else f'{req:,.1f}'} "
                     f"| {ratio} |")
    return "\n".join(lines)


def _train_pick(c: Citer, setting: str, context: int, method: str) -> Row:
    return one((r for r in _train_rows(c) if (_train_setting(r), r["context"], r["method"]) == (setting, context, method)),
               f"train {setting} {context} {method}")


# --- SinkLoRA quality --------------------------------------------------------------------------------------------

SINKLORA_MODELS = [("untuned", "untuned (native 8K positions, no RoPE scaling)"), ("full", "full attention"),
                   ("longlora-s2", "LongLoRA S2-Attn (`sinks: 0`)"), ("sinklora-sf", "SinkLoRA SF-Attn (4 sinks)")]
SINKLORA_METRICS = ("ppl@16384", "passkey_acc@16384", "passkey_acc_space_primed@16384")


def _sinklora_rows(c: Citer) -> dict[tuple[str, str], Row]:
    rows = [r for r in c.results.rows("quality") if r["metric"] in SINKLORA_METRICS and r.get("policy") is None]
    return {(r["method"], r["metric"]): r for r in latest(rows, lambda r: (r["method"], r["metric"]))}


@region("sinklora-16k")
def sinklora_16k(c: Citer) -> str:
    """SmolLM2-135M extended from 8K to 16K: perplexity and passkey at 16K, per training attention."""
    rows = _sinklora_rows(c)
    lines = ["| model | steps | perplexity at 16K | passkey at 16K, strict / primed | training s (100 steps) |",
             "|---|---|---|---|---|"]
    for method, label in SINKLORA_MODELS:
        ppl = c.cite([rows[(method, "ppl@16384")]])[0]
        pk = [rows.get((method, m)) for m in SINKLORA_METRICS[1:]]
        c.cite([r for r in pk if r])
        n = 20  # 5 depths x 4 samples (sinklora_quality.py's defaults, which these rows ran with)
        pk_text = " / ".join("-" if r is None else f"{round(r['value'] * n)}/{n}" for r in pk)
        train_s = ppl.get("train_s")
        lines.append(f"| {label} | {ppl['steps']} | {ppl['value']:.2f} | {pk_text} | "
                     f"{'-' if train_s is None else f'{train_s:.0f}'} |")
    return "\n".join(lines)


def _gap_closed(c: Citer) -> str:
    rows = _sinklora_rows(c)
    full, ll, sf = (rows[(m, "ppl@16384")] for m in ("full", "longlora-s2", "sinklora-sf"))
    share = (ll["value"] - sf["value"]) / (ll["value"] - full["value"])
    return c.link(f"{share:.0%}", [full, ll, sf])


@region("status-sinklora", inline=True)
def status_sinklora(c: Citer) -> str:
    """SinkLoRA's headline: the perplexity gap SF-Attn closes, and the 8B-shape step time against dense."""
    s32, s64 = _train_pick(c, "default", 32768, "sf"), _train_pick(c, "default", 65536, "sf")
    d32 = _train_pick(c, "default", 32768, "dense")
    r32, r64, peak = f"{s32['ratio_to_dense']}x", f"{s64['ratio_to_dense']}x", "%.2f GiB" % s32["peak_mem_gib"]
    return (f"SF-Attn closes {_gap_closed(c)} of LongLoRA's perplexity gap to full attention at 16K (SmolLM2-135M); "
            f"a LoRA step of a Llama-3-8B shape runs {c.link(r32, [d32, s32])} dense's speed "
            f"at 32K and {c.link(r64, [s64])} at 64K, at dense's peak memory "
            f"({c.link(peak, [d32, s32])} at 32K)")


@region("sinklora-gap", inline=True)
def sinklora_gap(c: Citer) -> str:
    """The share of the S2-Attn -> full-attention perplexity gap SF-Attn closes at 16K."""
    return _gap_closed(c)


# --- KV policies: quality ----------------------------------------------------------------------------------------

KV_POLICIES = [("full", "full", "100%"), ("streaming@0.2", "streaming, 4 sinks + recent", "20%"),
               ("h2o@0.2", "H2O, heavy + recent", "20%"), ("streaming@0.5", "streaming, 4 sinks + recent", "50%"),
               ("h2o@0.5", "H2O, heavy + recent", "50%")]


def _kv_quality_rows(c: Citer) -> dict[tuple[str, str], Row]:
    rows = [r for r in c.results.rows("quality") if r["method"].startswith("kv-policy:")]
    return {(r["method"].split(":", 1)[1], r["metric"]): r for r in latest(rows, lambda r: (r["method"], r["metric"]))}


@region("kv-policy-quality")
def kv_policy_quality(c: Citer) -> str:
    """Untuned SmolLM2-135M on CPU with an evicting cache: perplexity token by token, and passkey."""
    rows = _kv_quality_rows(c)
    lines = ["| policy | KV kept | perplexity (1,024 tokens) | passkey at 4K | passkey at 8K |", "|---|---|---|---|---|"]
    for key, label, kept in KV_POLICIES:
        ppl = rows[(key, "ppl_token_by_token")]
        cells = []
        for metric in ("passkey@4096 (repeat filler)", "passkey@8192 (repeat filler)"):
            r = rows.get((key, metric))
            if r is None:
                cells.append("-")
                continue
            c.cite([r])
            cells.append(f"{round(r['value'] * r['samples'])}/{r['samples']}")
        c.cite([ppl])
        lines.append(f"| {label} | {kept} | {ppl['value']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@region("h2o-gap", inline=True)
def h2o_gap(c: Citer) -> str:
    """The share of streaming's perplexity gap to full attention that H2O closes at the same budget."""
    rows = _kv_quality_rows(c)
    full, out = rows[("full", "ppl_token_by_token")], []
    for budget in ("0.2", "0.5"):
        st, h2o = rows[(f"streaming@{budget}", "ppl_token_by_token")], rows[(f"h2o@{budget}", "ppl_token_by_token")]
        share = (st["value"] - h2o["value"]) / (st["value"] - full["value"])
        out.append(f"{c.link(f'{share:.0%}', [full, st, h2o])} at {float(budget):.0%}")
    return " and ".join(out)


# --- decode ------------------------------------------------------------------------------------------------------

DECODE_POLICIES = [("full", "full (static buffer)"), ("streaming", "streaming (4 sinks + 20%)"),
                   ("h2o", "H2O (10% heavy + 10% recent)"), ("duo", "Duo, 50% streaming heads (128 + 256)")]


def _decode(c: Citer, mode: str, contexts: Sequence[int]) -> dict[tuple[str, int], Row]:
    """The newest KV-policy rows per (policy, context); runs that measured MoH have their own table (moh-decode)."""
    moh_runs = {r["command"] for r in c.results.rows("decode") if r["policy"] in MOH_DECODE_ROWS and r["policy"] != "full"}
    rows = [r for r in c.results.rows("decode") if r.get("decode_mode") == mode and r["context"] in contexts
            and (mode == "hf-loop" or r.get("fused_decode")) and r["command"] not in moh_runs]
    return {(r["policy"], r["context"]): r for r in latest(rows, lambda r: (r["policy"], r["context"]))}


@region("decode-policies")
def decode_policies(c: Citer) -> str:
    """Decode per KV policy on a Llama-3-8B shape: ms per token against the HBM bound, memory, KV bytes."""
    contexts = (32768, 131072)
    comp, graph, hf = _decode(c, "compile", contexts), _decode(c, "cuda_graph", contexts), _decode(c, "hf-loop", contexts)
    lines = ["| policy | context | compiled ms (x bound) | CUDA graph ms (x bound) | bound ms | peak GiB | KV bytes |",
             "|---|---|---|---|---|---|---|"]
    for T in contexts:
        for key, label in DECODE_POLICIES:
            a, b = comp[(key, T)], graph[(key, T)]
            c.cite([a, b])
            lines.append(f"| {label} | {_k(T)} | {a['ms_per_token']:.2f} ({a['ratio_to_bound']:.2f}x) | "
                         f"{b['ms_per_token']:.2f} ({b['ratio_to_bound']:.2f}x) | {a['bound_ms_per_token']:.2f} | "
                         f"{b['peak_mem_gib']:.2f} | {a['kv_kept_bytes'] / 1e9:.2f} GB |")
        if ("full-hf", T) in hf:
            r = c.cite([hf[("full-hf", T)]])[0]
            lines.append(f"| plain transformers loop (DynamicCache, SDPA) | {_k(T)} | {r['ms_per_token']:.2f} "
                         f"({r['ratio_to_bound']:.2f}x) | | {r['bound_ms_per_token']:.2f} | {r['peak_mem_gib']:.2f} | "
                         f"{r['kv_kept_bytes'] / 1e9:.2f} GB |")
    return "\n".join(lines)


@region("status-kv", inline=True)
def status_kv(c: Citer) -> str:
    """The compiled decode step against the HBM bound, and the plain transformers loop."""
    comp = list(_decode(c, "compile", (32768, 131072)).values())
    comp = [r for r in comp if r["policy"] in dict(DECODE_POLICIES)]
    hf = list(_decode(c, "hf-loop", (32768, 131072)).values())
    lo, hi = min(r["ratio_to_bound"] for r in comp), max(r["ratio_to_bound"] for r in comp)
    hlo, hhi = min(r["ratio_to_bound"] for r in hf), max(r["ratio_to_bound"] for r in hf)
    return (f"every policy decodes within {c.link(f'{lo:.2f}-{hi:.2f}x', comp)} of the H200's memory-bandwidth bound "
            f"on a Llama-3-8B shape at 32K-128K context (the plain transformers loop: {c.link(f'{hlo:.0f}-{hhi:.0f}x', hf)})")


@region("compile-warmup", inline=True)
def compile_warmup(c: Citer) -> str:
    """How long compiling the decode step took (the compiled rows' `warmup_s`), Llama-3-8B shape."""
    rows = [r for r in c.results.rows("decode") if r.get("decode_mode") == "compile" and r.get("warmup_s")]
    lo, hi = min(r["warmup_s"] for r in rows), max(r["warmup_s"] for r in rows)
    return c.link(f"{lo:.0f}-{hi:.0f} s", rows)


def _decode_long(c: Citer) -> dict[tuple[str, int], Row]:
    return _decode(c, "compile", (524288, 786432))


@region("decode-long")
def decode_long(c: Citer) -> str:
    """Duo against full attention at 512K and 768K context (compiled decode, Llama-3-8B shape)."""
    rows = _decode_long(c)
    lines = ["| context | policy | ms per token (x bound) | tokens/s | peak GiB | KV bytes | Duo vs full: speed / memory |",
             "|---|---|---|---|---|---|---|"]
    for T in (524288, 786432):
        full, duo = rows[("full", T)], rows[("duo", T)]
        c.cite([full, duo])
        for r, label in ((full, "full (static buffer)"), (duo, "Duo, 50% streaming heads (128 + 256)")):
            vs = "" if r is full else (f"{full['ms_per_token'] / duo['ms_per_token']:.2f}x faster / "
                                       f"{full['peak_mem_gib'] / duo['peak_mem_gib']:.2f}x less")
            lines.append(f"| {_k(T)} | {label} | {r['ms_per_token']:.2f} ({r['ratio_to_bound']:.2f}x) | "
                         f"{r['tokens_per_s']:.2f} | {r['peak_mem_gib']:.2f} | {r['kv_kept_bytes'] / 1e9:.1f} GB | {vs} |")
    return "\n".join(lines)


def _duo_vs_full_512k(c: Citer) -> str:
    rows = _decode_long(c)
    full, duo = rows[("full", 524288)], rows[("duo", 524288)]
    speed = "%.2fx" % (full["ms_per_token"] / duo["ms_per_token"])
    memory = "%.2fx" % (full["peak_mem_gib"] / duo["peak_mem_gib"])
    return f"{c.link(speed, [full, duo])} faster in {c.link(memory, [full, duo])} less memory"


@region("h2o-prefill")
def h2o_prefill(c: Citer) -> str:
    """H2O's prefill on CPU (SmolLM2-135M, fp32): CPU time over the same prefill without eviction."""
    rows = [r for r in c.results.rows("decode") if r.get("bench") == "prefill" and r["policy"] == "h2o"]
    rows = latest(rows, lambda r: (r.get("threads"), r.get("omp_wait_policy"), r["context"]))
    settings = list(dict.fromkeys((r.get("threads"), r.get("omp_wait_policy")) for r in rows))
    contexts = sorted({r["context"] for r in rows})
    lines = ["| threads | OMP_WAIT_POLICY | " + " | ".join(_k(t) for t in contexts) + " |",
             "|---|---|" + "---|" * len(contexts)]
    for threads, wait in settings:
        cells = []
        for T in contexts:
            r = next((r for r in rows if (r.get("threads"), r.get("omp_wait_policy"), r["context"]) == (threads, wait, T)), None)
            cells.append("-" if r is None else f"{r['cpu_ratio_to_full']:.2f}x")
        lines.append(f"| {threads} | {wait or 'default'} | " + " | ".join(cells) + " |")
    c.cite(rows)
    return "\n".join(lines)


# --- DuoAttention passkey ----------------------------------------------------------------------------------------

DUO_LENGTHS = (1024, 2048, 4096, 8192)


def _passkey_cells(c: Citer, tags: Sequence[str], policy: str) -> tuple[list[int], list[int], Row | None, list[Row]]:
    """Hits and samples per length (1K-8K) of `policy` in the evaluations `tags`, plus the row of hits where
    full attention retrieves (None for full attention) per length, and every row used."""
    q = [r for r in c.results.rows("quality") if tag_of(r) in tags and r.get("policy") == policy]
    hits, n, where, used = [], [], [], []
    for L in DUO_LENGTHS:
        acc = one((r for r in q if r["context"] == L and r["metric"] == "passkey_accuracy"),
                  f"passkey {tags} {policy} {L}")
        samples = acc["samples_per_cell"] * len(acc["depths"])
        hits.append(round(acc["value"] * samples))
        n.append(samples)
        used.append(acc)
        if policy != "full":
            w = one((r for r in q if r["context"] == L and r["metric"] == "passkey_accuracy_where_full_retrieves"),
                    f"where-full {tags} {policy} {L}")
            where.append(w)
            used.append(w)
    return hits, n, where, used


def _where_full(where: list[Row]) -> tuple[int, int]:
    got = sum(round(w["value"] * w["n_samples"]) for w in where if w["value"] is not None)
    return got, sum(w["n_samples"] for w in where)


def _kv_ratio(c: Citer, tag: str, policy: str) -> tuple[float, Row]:
    r = one((r for r in c.results.rows("quality") if tag_of(r) == tag and r.get("policy") == policy
             and r["metric"] == "kv_bytes_bf16_from_shapes"), f"kv bytes {tag} {policy}")
    return r["ratio_vs_full"], r


def _duo_table(c: Citer, specs: Sequence[tuple[list[str], str, Sequence[str], str]], kv: bool = True) -> str:
    """Rows of (label cells, policy, evaluation tags, KV tag): hits per length, all, where full retrieves."""
    head = ["training seed", "eval seed", "policy"]
    lines = ["| " + " | ".join(head + [_k(L) for L in DUO_LENGTHS] + ["all", "where full retrieves"]
                               + (["KV bytes at 8K vs full"] if kv else [])) + " |",
             "|" + "---|" * (len(head) + len(DUO_LENGTHS) + 2 + kv)]
    for labels, policy, tags, kv_tag in specs:
        hits, n, where, used = _passkey_cells(c, tags, policy)
        c.cite(used)
        cells = [f"{h}/{m}" for h, m in zip(hits, n, strict=True)] + [f"{sum(hits)}/{sum(n)}"]
        if policy == "full":
            cells.append(f"{sum(hits)}/{sum(hits)}")
        else:
            got, total = _where_full(where)
            cells.append(f"{got}/{total} ({got / total:.0%})")
        if kv and policy == "full":
            cells.append("1.000")
        elif kv:
            ratio, r = _kv_ratio(c, kv_tag, policy)
            c.cite([r])
            cells.append(f"{ratio:.3f}")
        name = "full attention" if policy == "full" else f"{float(policy.split('=')[1]):.0%} streaming heads"
        lines.append("| " + " | ".join(labels + [name] + cells) + " |")
    return "\n".join(lines)


def _duo_spec(seed: str, eval_seed: str, policy: str, tags: Sequence[str], baseline: str | None = None) -> tuple:
    """One row of a Duo table: (training seed, evaluation seed), policy, its evaluation tags, the tag of full
    attention's baseline on the same samples (default: the first tag)."""
    return [seed, eval_seed], policy, list(tags), baseline or tags[0]


# Evaluation tags (duo_smollm2.py --tag) of the recipe's gates, `headwise train duo-smollm2-gpu` with the default
# training seed (42) and seeds 7 and 11; full attention's baselines on the same samples.
PRIMED = [
    _duo_spec("-", "0", "full", ["duo_smollm2_gpu_primed", "duo_smollm2_gpu_primed_4k8k"], "duo_smollm2_pred-800_primed"),
    _duo_spec("default (42)", "0", "streaming=0.50", ["duo_smollm2_pred-800_primed"]),
    _duo_spec("7", "0", "streaming=0.50", ["duo_smollm2_pred-800-seed7_primed"]),
    _duo_spec("11", "0", "streaming=0.50", ["duo_smollm2_pred-800-seed11_primed"]),
    _duo_spec("-", "1", "full", ["duo_smollm2_pred-800-seed11_primed_seed1"]),
    _duo_spec("11", "1", "streaming=0.50", ["duo_smollm2_pred-800-seed11_primed_seed1"]),
]
STRICT = (
    [_duo_spec("-", e, "full", [f"duo_smollm2_pred-800_seed{e}"]) for e in "01"]
    + [_duo_spec("default (42)", e, f"streaming={f}", [f"duo_smollm2_pred-800_seed{e}"])
       for f in ("0.25", "0.50", "0.75") for e in "01"]
    + [_duo_spec(seed, e, "streaming=0.50", [f"duo_smollm2_pred-800-seed{seed}_seed{e}"])
       for seed, e in (("7", "0"), ("7", "1"), ("11", "1"))]
)
# `method.average_last: 0.5` (the gates' mean over the second half of training) against the final gates of
# the same training seed, on the same evaluation seed.
AVERAGED = [
    (["default (42)", "1", "final"], ["duo_smollm2_pred-800_seed1"]),
    (["default (42)", "1", "mean of the second half"], ["duo_smollm2_avg-seed42_seed1"]),
    (["7", "0", "final"], ["duo_smollm2_pred-800-seed7_seed0"]),
    (["7", "0", "mean of the second half"], ["duo_smollm2_avg-seed7_seed0"]),
    (["11", "1", "final"], ["duo_smollm2_pred-800-seed11_seed1"]),
    (["11", "1", "mean of the second half"], ["duo_smollm2_avg-seed11_seed1"]),
]


@region("duo-primed-seeds")
def duo_primed_seeds(c: Citer) -> str:
    """Passkey hits of the recipe's gates over three training seeds, the key's leading space primed."""
    return _duo_table(c, PRIMED)


@region("duo-strict-seeds")
def duo_strict_seeds(c: Citer) -> str:
    """Passkey hits of the recipe's gates, strict protocol (the prompt ends with "The pass key is")."""
    return _duo_table(c, STRICT)


@region("duo-average-last")
def duo_average_last(c: Citer) -> str:
    """Final gates against their mean over the second half of training, 50% streaming heads, strict protocol."""
    lines = ["| training seed | eval seed | gates | " + " | ".join(_k(L) for L in DUO_LENGTHS)
             + " | all | where full retrieves |", "|" + "---|" * (3 + len(DUO_LENGTHS) + 2)]
    for labels, tags in AVERAGED:
        hits, n, where, used = _passkey_cells(c, tags, "streaming=0.50")
        c.cite(used)
        got, total = _where_full(where)
        cells = [f"{h}/{m}" for h, m in zip(hits, n, strict=True)]
        cells += [f"{sum(hits)}/{sum(n)}", f"{got}/{total} ({got / total:.0%})"]
        lines.append("| " + " | ".join(labels + cells) + " |")
    return "\n".join(lines)


SUPPORT_CONSUMERS = ["method full", "method sinklora", "method duo", "kv_policy full", "kv_policy streaming",
                     "kv_policy duo"]


@region("family-support")
def family_support(c: Citer) -> str:
    """Per model family, what each method and KV policy does there: matches the fp64 reference of the test battery,
    or refuses the model (the feature it lacks in the cell)."""
    rows = latest(c.results.rows("support"), lambda r: (r["family"], r["consumer"]))
    c.cite(rows)
    by = {(r["family"], r["consumer"]): r for r in rows}
    families = sorted({r["family"] for r in rows})
    consumers = [k for k in SUPPORT_CONSUMERS if any(r["consumer"] == k for r in rows)]
    consumers += sorted({r["consumer"] for r in rows} - set(consumers))
    lines = ["| family | " + " | ".join(f"`{k}`" for k in consumers) + " |", "|---|" + "---|" * len(consumers)]
    for fam in families:
        cells = []
        for k in consumers:
            r = by.get((fam, k))
            cells.append("-" if r is None else "matches" if r["verdict"] == "matches" else f"refused: {r['reason']}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@region("quickstart-adapter", inline=True)
def quickstart_adapter(c: Citer) -> str:
    """The quickstart export's adapter file: its size and what fills it."""
    r = latest([r for r in c.results.rows("export") if r["recipe"] == "quickstart"], lambda r: r["recipe"])[-1]
    mb = lambda n: "%.0f MB" % (n / 1e6) if n >= 1e7 else "%.1f MB" % (n / 1e6)  # noqa: E731
    return (f"{c.link(mb(r['file_bytes']), [r])} ({'/'.join(r['dtypes'])}): the trained embedding "
            f"({mb(r['embedding_bytes'] / r['tied_copies'])}) saved {({2: 'twice'}).get(r['tied_copies'], str(r['tied_copies']) + ' times')}, as `embed_tokens` and as "
            f"the tied `lm_head`, plus {mb(r['lora_bytes'])} of LoRA and {mb(r['other_bytes'])} of norms")


@region("status-duo", inline=True)
def status_duo(c: Citer) -> str:
    """Duo's headline: retrieval kept at 50% streaming heads, and decoding at 512K."""
    kept, total, used = 0, 0, []
    seeds = [s for s in PRIMED if s[1] != "full"]
    for _, policy, tags, _ in seeds:
        _, _, where, rows = _passkey_cells(c, tags, policy)
        got, n = _where_full(where)
        kept, total, used = kept + got, total + n, used + [r for r in rows if r["metric"].endswith("where_full_retrieves")]
    ratio, kv_row = _kv_ratio(c, PRIMED[1][3], "streaming=0.50")
    share = f"all {total}" if kept == total else f"{kept} of {total}"
    return (f"at 50% streaming heads ({c.link(f'{ratio:.3f}x', [kv_row])} the KV bytes), SmolLM2-135M keeps "
            f"{c.link(share, used)} of full attention's passkey retrievals from 1K to 8K in {len(seeds)} evaluations "
            f"of three training seeds (the key's leading space primed); at 512K context a Llama-3-8B shape decodes "
            f"{_duo_vs_full_512k(c)} than with full attention")


# --- MoH quality -------------------------------------------------------------------------------------------------

MOH_BENCHMARK = "moh_smollm2"  # the `benchmark` field benchmarks/moh_smollm2.py writes
MOH_NOT_MEASURED = ("No rows yet: `python benchmarks/moh_smollm2.py` (one GPU, about 8 minutes) appends them to "
                    "`benchmarks/results/quality.jsonl`.")
MOH_ORDER = [(None, None), ("query_norm", 0.75), ("kv_group", 0.67), ("learned", 0.75), ("query_norm", 0.5)]


def _moh_key(r: Row) -> tuple:
    return (r["method"], r.get("router"), r.get("activation"), r.get("shared"), r["context"], r["steps"])


def _moh_rows(c: Citer) -> list[Row]:
    """The latest measured row of every model, context and step count (smoke-test rows never count), steps 0 first,
    then in MOH_ORDER."""
    rows = [r for r in c.results.rows("quality") if r.get("benchmark") == MOH_BENCHMARK and not r.get("smoke")]
    order = {k: i for i, k in enumerate(MOH_ORDER)}
    return sorted(latest(rows, _moh_key), key=lambda r: (r["context"], r["steps"], order.get(
        (r.get("router"), r.get("activation")), len(order)), r.line))


def _moh_model(r: Row) -> str:
    if r.get("router") is None:
        return "dense"
    return f"MoH `{r['router']}` ({r['activation']:g} / {r['shared']:g})"


def _moh_active(r: Row) -> str:
    h = r["heads"]
    text = f"{r['active_heads']}/{h['query_heads']}"
    if r.get("router") is not None:
        unit = "KV groups" if h["unit"] == "kv_group" else "heads"
        text += f": {h['shared']} shared + {h['active_routed']} of {h['routed']} {unit}"
    return text


def _tokens(n: int) -> str:
    return "0" if not n else f"{n / 1e6:.2f}M"


@region("moh-smollm2-quality")
def moh_smollm2_quality(c: Citer) -> str:
    """SmolLM2-135M perplexity: dense, each router right after conversion, and after the same continue-tuning."""
    rows = c.cite(_moh_rows(c))
    if not rows:
        return MOH_NOT_MEASURED
    lines = [("| model (activation / shared) | active query heads | steps | tokens seen | perplexity (held out) | "
              "vs dense at the same steps |"), "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.get("ratio_vs_dense") is None else f"{r['ratio_vs_dense']:.3f}x"
        lines.append(f"| {_moh_model(r)} | {_moh_active(r)} | {r['steps']} | {_tokens(r['tokens_seen'])} | "
                     f"{r['value']:.2f} | {ratio} |")
    return "\n".join(lines)


@region("moh-75-vs-dense", inline=True)
def moh_75_vs_dense(c: Citer) -> str:
    """MoH `query_norm` at 75% after continue-tuning, against the dense model tuned alike (the issue's target)."""
    rows = _moh_rows(c)
    tuned = [r for r in rows if r.get("router") == "query_norm" and r.get("activation") == 0.75 and r["steps"] > 0
             and r.get("ratio_vs_dense") is not None]
    if not tuned:
        return "not measured yet"
    moh = max(tuned, key=lambda r: r.line)
    dense = [r for r in rows if r.get("router") is None and r["steps"] == moh["steps"]
             and r["context"] == moh["context"]]
    above = moh["ratio_vs_dense"] - 1
    text = f"{abs(above):.1%} {'above' if above >= 0 else 'below'}"
    return (f"{c.link(text, [moh, *dense])} the dense model's perplexity after the same {moh['steps']} steps "
            f"({_tokens(moh['tokens_seen'])} tokens)")


# --- MoH speed ---------------------------------------------------------------------------------------------------


def _moh_speed_rows(c: Citer) -> list[Row]:
    rows = [r for r in c.results.rows("kernels") if str(r.get("layout", "")).startswith(MOH_LAYOUT_PREFIX)]
    return sorted(latest(rows, lambda r: (r["layout"], r["T"], r["pass"], r["activation"])),
                  key=lambda r: (r["pass"] != "fwd+bwd", r["T"], -r["activation"], r["layout"]))


@region("moh-speed")
def moh_speed(c: Citer) -> str:
    """One layer's MoH attention (router included) against dense SDPA on a Llama-3-8B shape (bench_moh.py)."""
    rows = c.cite(_moh_speed_rows(c))
    if not rows:
        return "No rows yet: `python benchmarks/bench_moh.py` (one GPU, about 3 minutes)."
    lines = ["| pass | context | router | active heads | dense SDPA | masking form | gathered form | gathered / dense "
             "| target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pass']} | {r['T'] // 1024}K | `{r['layout'].split(':', 1)[1]}` | {r['active_heads']}/{r['H']} "
                     f"| {r['ms_dense']:.2f} ms | {r['ms_masking']:.2f} ms | {r['ms_gathered']:.2f} ms "
                     f"| {r['ratio_gathered']:.2f}x | {r['target_ratio']:.2f}x |")
    return "\n".join(lines)


@region("status-moh", inline=True)
def status_moh(c: Citer) -> str:
    """README: MoH's layer time at 32K against dense (75% and 50% active) and its tuned SmolLM2 perplexity."""
    rows = {r["activation"]: r for r in _moh_speed_rows(c)
            if (r["layout"], r["T"], r["pass"]) == ("moh:query_norm", 32768, "fwd+bwd")}
    if 0.75 not in rows or 0.5 not in rows:
        return "not measured yet"
    times = f"{rows[0.75]['ratio_gathered']:.2f}x / {rows[0.5]['ratio_gathered']:.2f}x"
    text = (f"one layer's attention at 32K forward + backward takes {c.link(times, [rows[0.75], rows[0.5]])} of dense "
            f"SDPA's time at 75% / 50% active heads; on SmolLM2-135M, MoH `query_norm` at 75% ends "
            f"{moh_75_vs_dense(c)}")
    decode = _moh_decode_rows(c)
    keys = [("compile", name, 131072) for name in ("full", "moh-kv75", "moh-kv50")]
    if all(key in decode for key in keys):
        dense, kv75, kv50 = (decode[key] for key in keys)
        speed = f"{kv75['tokens_per_s'] / dense['tokens_per_s']:.2f}x / {kv50['tokens_per_s'] / dense['tokens_per_s']:.2f}x"
        text += (f"; at 128K a compiled decode step with `kv_group` routing at 75% / 50% runs "
                 f"{c.link(speed, [dense, kv75, kv50])} dense's tokens/s (Llama-3-8B shape)")
    return text


MOH_DECODE_ROWS = {"full": "dense (full cache)", "moh-kv75": "MoH `kv_group` 75% (4 shared + 2 of 4 groups)",
                   "moh-kv50": "MoH `kv_group` 50% (2 shared + 2 of 6 groups)",
                   "moh-q75": "MoH `query_norm` 75% (16 shared + 8 of 16 heads)"}


def _moh_decode_rows(c: Citer) -> dict[tuple[str, str, int], Row]:
    """(decode mode, row, context) -> the newest row of a run that measured MoH (the dense row of the same run)."""
    runs = {r["command"] for r in c.results.rows("decode") if r["policy"] in MOH_DECODE_ROWS and r["policy"] != "full"}
    rows = [r for r in c.results.rows("decode") if r["command"] in runs and r["policy"] in MOH_DECODE_ROWS]
    return {(r["decode_mode"], r["policy"], r["context"]): r
            for r in latest(rows, lambda r: (r["decode_mode"], r["policy"], r["context"]))}


@region("moh-decode")
def moh_decode(c: Citer) -> str:
    """Decode of a Llama-3-8B shape with MoH against dense: the fused kernel skips the KV heads the router leaves out."""
    rows = _moh_decode_rows(c)
    if not rows:
        return "No rows yet: `python benchmarks/bench_decode.py --contexts 32768,131072 --policies full,moh-kv75,moh-kv50`."
    lines = ["| step | context | model | KV heads read | ms per token | bound ms | tokens/s vs dense |",
             "|---|---|---|---|---|---|---|"]
    for mode, label in (("compile", "compiled"), ("cuda_graph", "CUDA graph")):
        for T in sorted({key[2] for key in rows if key[0] == mode}):
            dense = rows.get((mode, "full", T))
            for name, model in MOH_DECODE_ROWS.items():
                r = rows.get((mode, name, T))
                if r is None or dense is None:
                    continue
                c.cite([r])
                share = "all" if name == "full" else ("up to all" if name == "moh-q75" else f"{r['kv_read_share']:.0%}")
                lines.append(f"| {label} | {_k(T)} | {model} | {share} | {r['ms_per_token']:.2f} | "
                             f"{r['bound_ms_per_token']:.2f} | {r['tokens_per_s'] / dense['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


MOH_TRAIN_METHODS = {"dense": "dense SDPA", "moh75": "MoH 75% (16 shared + 8 of 16)",
                     "moh75@masking": "MoH 75%, masking form", "moh50": "MoH 50% (8 shared + 8 of 24)",
                     "moh50@masking": "MoH 50%, masking form"}


@region("moh-train-speed")
def moh_train_speed(c: Citer) -> str:
    """One LoRA training step of a Llama-3-8B shape with MoH (query-norm router, gathered form) beside dense."""
    rows = sorted(_train_rows(c, MOH_TRAIN_METHODS), key=lambda r: (r["context"], list(MOH_TRAIN_METHODS).index(
        r["method"])))
    if not rows:
        return "No rows yet: `python benchmarks/bench_train.py --contexts 32768 --methods dense,moh75,moh50`."
    lines = ["| context | method | s/step | tokens/s | peak GiB | vs dense (same run) |", "|---|---|---|---|---|---|"]
    for r in c.cite(rows):
        ratio = "1.00x" if r["method"] == "dense" else f"{r['ratio_to_dense']}x"
        lines.append(f"| {_k(r['context'])} | {MOH_TRAIN_METHODS[r['method']]} | {r['s_per_step']:.3f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.2f} | {ratio} |")
    return "\n".join(lines)


# --- GPU test runs -----------------------------------------------------------------------------------------------


@region("gpu-tests")
def gpu_tests(c: Citer) -> str:
    """The GPU test runs `benchmarks/gpu_round.sh` recorded, newest last."""
    rows = c.results.summaries("gpu_tests")
    if not rows:
        return "No GPU test run is recorded yet in `benchmarks/results/gpu_tests/`."
    lines = ["| date | commit | machine | passed | failed | skipped | errors | finished | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in c.cite(rows):
        lines.append(f"| [{str(r['date'])[:16]}]({c.href(r.file)}) | {str(r.get('commit'))[:12]} | {_cell(r.get('machine'))} "
                     f"| {r['passed']} | {r['failed']} | {r['skipped']} | {r.get('errors', 0)} | "
                     f"{'yes' if r.get('complete') else 'no (time limit)'} | `{_cell(r.get('command'))}` |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------------

MARKER = re.compile(r"<!-- report:([a-z0-9-]+) -->(.*?)<!-- /report -->", re.S)


def documents(root: Path) -> list[Path]:
    """README.md and every markdown page under docs/."""
    docs = [root / "README.md"] if (root / "README.md").is_file() else []
    return docs + sorted((root / "docs").rglob("*.md"))


def render(name: str, results: Results, doc: Path, root: Path) -> str:
    """Region `name` as document `doc` holds it between its markers."""
    spec = REGIONS[name]
    citer = Citer(results, doc, root)
    body = spec.render(citer)
    if spec.inline:
        return body
    footer = citer.footer()
    return "\n\n" + body + ("\n\n" + footer if footer else "") + "\n\n"


@dataclass
class Finding:
    doc: Path
    region: str
    problem: str

    def __str__(self) -> str:
        return f"{self.doc}: region '{self.region}': {self.problem}"


@dataclass
class Outcome:
    findings: list[Finding] = field(default_factory=list)
    changed: list[Path] = field(default_factory=list)
    regions: int = 0


def process(root: Path, results_dir: Path, docs: Sequence[Path] | None = None, write: bool = False) -> Outcome:
    """Compare (or with `write`, rewrite) every generated region of `docs` (default: `documents(root)`)."""
    results = Results(results_dir)
    out = Outcome()
    for doc in docs if docs is not None else documents(root):
        text = doc.read_text()
        new = MARKER.sub(functools.partial(_region_text, doc=doc, root=root, results=results, out=out), text)
        if write and new != text:
            doc.write_text(new)
            out.changed.append(_shown(doc, root))
    return out


def _shown(doc: Path, root: Path) -> Path:
    """`doc` as a finding names it: relative to the repository root when it lies under it."""
    return doc.relative_to(root) if doc.is_relative_to(root) else doc


def _region_text(m: re.Match, *, doc: Path, root: Path, results: Results, out: Outcome) -> str:
    """The region `m` of `doc` rendered afresh (its text unchanged when it cannot be); findings go to `out`."""
    name, held = m.group(1), m.group(2)
    rel = _shown(doc, root)
    out.regions += 1
    if name not in REGIONS:
        out.findings.append(Finding(rel, name, f"no such region (known: {', '.join(sorted(REGIONS))})"))
        return m.group(0)
    inline = not held.startswith("\n")
    if inline != REGIONS[name].inline:
        kind = "inline" if REGIONS[name].inline else "a block (markers on lines of their own)"
        out.findings.append(Finding(rel, name, f"the region is {kind}"))
        return m.group(0)
    try:
        fresh = render(name, results, doc, root)
    except (LookupError, KeyError, ValueError, FileNotFoundError) as e:
        out.findings.append(Finding(rel, name, f"cannot be rendered from the results: {e!r}"))
        return m.group(0)
    if fresh != held:
        out.findings.append(Finding(rel, name, "disagrees with the results: " + _first_difference(held, fresh)))
    return f"<!-- report:{name} -->{fresh}<!-- /report -->"


def _first_difference(held: str, fresh: str) -> str:
    a, b = held.strip().splitlines(), fresh.strip().splitlines()
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"line {i + 1} of the region holds {x[:160]!r}, the results give {y[:160]!r}"
    return f"the region has {len(a)} lines, the results give {len(b)}"


def cited_files(root: Path, docs: Sequence[Path] | None = None) -> dict[str, set[Path]]:
    """Every file under benchmarks/results/ that a document links to or names, per repository path."""
    found: dict[str, set[Path]] = {}
    pattern = re.compile(r"(?:\.\./)*(benchmarks/results/[A-Za-z0-9_./@=+-]*[A-Za-z0-9_])")
    for doc in docs if docs is not None else documents(root):
        for m in pattern.finditer(doc.read_text()):
            found.setdefault(m.group(1), set()).add(doc)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a document disagrees with the results")
    mode.add_argument("--write", action="store_true", help="rewrite the generated regions")
    mode.add_argument("--show", metavar="REGION", help="print one region (block regions with their source)")
    mode.add_argument("--list", action="store_true", help="list the regions and where they are used")
    p.add_argument("--root", default=str(ROOT), help="the repository whose README.md and docs/ are read")
    p.add_argument("--results", default=None, help="the results folder (default ROOT/benchmarks/results)")
    p.add_argument("docs", nargs="*", help="documents to process (default: README.md and docs/**/*.md under --root)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    results_dir = Path(args.results).resolve() if args.results else root / RESULTS_PREFIX
    docs = [Path(d).resolve() for d in args.docs] or None
    if args.show:
        if args.show not in REGIONS:
            p.error(f"no region {args.show!r}; one of {', '.join(sorted(REGIONS))}")
        print(render(args.show, Results(results_dir), root / "docs" / "benchmarks.md", root).strip("\n"))
        return 0
    if args.list:
        uses: dict[str, list[str]] = {}
        for doc in docs or documents(root):
            for m in MARKER.finditer(doc.read_text()):
                uses.setdefault(m.group(1), []).append(str(doc.relative_to(root)))
        for name, spec in sorted(REGIONS.items()):
            where = ", ".join(uses.get(name, [])) or "unused"
            print(f"{name:22} {'inline' if spec.inline else 'block ':6} {spec.doc}  [{where}]")
        return 0
    out = process(root, results_dir, docs, write=args.write)
    if args.write:
        for path in out.changed:
            print(f"rewrote {path}")
        for f in out.findings:
            if "disagrees" not in f.problem:
                print(f, file=sys.stderr)
        print(f"{out.regions} regions, {len(out.changed)} documents rewritten")
        return 1 if any("disagrees" not in f.problem for f in out.findings) else 0
    for f in out.findings:
        print(f, file=sys.stderr)
    if out.findings:
        print(f"{len(out.findings)} of {out.regions} regions disagree with the results; "
              "`python benchmarks/report.py --write` rewrites them", file=sys.stderr)
        return 1
    print(f"{out.regions} regions agree with the results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
