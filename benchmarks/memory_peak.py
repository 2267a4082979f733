"""Where in a CUDA step the peak of allocated memory falls, and which allocations are alive there.

`max_memory_allocated` says how high a step went, not why (SF-Attn peaks 2.2 MiB above dense at 64K:
which tensors are alive then?). `PeakTrace` records the caching allocator's history around a step,
`peak_report` replays it and groups the blocks alive at the peak by the code that allocated them.

Bytes are the trace's: the *requested* size of each allocation (what `memory_stats()["requested_bytes.*"]`
counts). `max_memory_allocated` counts allocator blocks (rounded up to 512 B, and a large block may keep
up to 1 MiB of unsplit remainder), so it can read a few MiB higher than this replay at the same instant.

    with PeakTrace() as trace:
        train_step(...)
        torch.cuda.synchronize()
    print(format_peak_report(peak_report(trace.snapshot)))
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from typing_extensions import Self

LIBRARY_DIRS = ("torch", "transformers", "peft")  # frames inside these are not "who allocated it"
FREES = ("free_requested", "free_completed")
BEFORE = "(allocated before recording)"
NO_FRAMES = "(no Python frames: C++ / autograd device thread)"


class PeakTrace:
    """Context manager: record CUDA allocator history on enter, keep `snapshot` (a dict) on exit.

    A no-op without CUDA (`snapshot` stays None), so a benchmark can wrap a step unconditionally.
    `stacks="python"` keeps recording cheap (no C++ unwinding); allocations made on the autograd
    engine's device thread outside any Python code then have no frames. `reset_peak` resets the
    peak statistics on enter, which also resets what a caller reads afterwards: off by default."""

    def __init__(self, max_entries: int = 1_000_000, stacks: str = "python", reset_peak: bool = False) -> None:
        self.max_entries, self.stacks, self.reset_peak = max_entries, stacks, reset_peak
        self.snapshot: dict[str, Any] | None = None
        self.max_allocated: int | None = None  # torch's own peaks on exit, for comparison with the replay
        self.max_requested: int | None = None

    def __enter__(self) -> Self:
        if torch.cuda.is_available():
            if self.reset_peak:
                torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks=self.stacks,
                                                     clear_history=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            try:
                self.snapshot = torch.cuda.memory._snapshot()
                self.max_allocated = torch.cuda.max_memory_allocated()
                self.max_requested = torch.cuda.memory_stats().get("requested_bytes.all.peak")
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)


def _where(frame: dict) -> str:
    """`path:line name`, the path cut after site-packages/ (or to its last 3 parts)."""
    name = frame["filename"]
    short = name.split("site-packages/")[-1] if "site-packages/" in name else "/".join(PurePath(name).parts[-3:])
    return f"{short}:{frame['line']} {frame['name']}"


def _outside(frames: list[dict], dirs: tuple[str, ...]) -> dict | None:
    """The first (innermost) frame whose path has none of `dirs` as a component."""
    return next((f for f in frames if not set(PurePath(f["filename"]).parts) & set(dirs)), None)


def _site(block: dict) -> tuple[str, str]:
    """(allocation site, innermost frame) of an alloc event or baseline block. Frames are innermost
    first, as torch records them; the site is the first frame outside LIBRARY_DIRS, else the first
    outside torch/ (library-only stacks, e.g. a checkpointed layer recomputed in backward), else the
    innermost. Baseline blocks all go to one BEFORE row: their frames, if any, are from another time."""
    frames = block.get("frames") or []
    if block.get("baseline"):
        return BEFORE, ""
    if not frames:
        return NO_FRAMES, ""
    site = _outside(frames, LIBRARY_DIRS) or _outside(frames, ("torch",)) or frames[0]
    return _where(site), _where(frames[0])


def _apply(event: dict, live: dict[int, dict], pending: set[int]) -> int | None:
    """Apply one trace event to `live` (addr -> alloc event); return the change in allocated bytes.

    A block stops counting at 'free_requested' (where the allocator lowers allocated_bytes);
    'free_completed' only ends that deferred free, unless its 'free_requested' was not recorded.
    Returns None for the free of a block not in `live`: one allocated before the trace began."""
    action, addr = event["action"], event.get("addr")
    if action == "alloc":
        old = live.get(addr)
        live[addr] = event
        return event["size"] - (old["size"] if old else 0)
    if action not in FREES:
        return 0  # segment_*, oom, snapshot: not allocations
    if action == "free_completed" and addr in pending:
        pending.discard(addr)
        return 0
    if action == "free_requested":
        pending.add(addr)
    old = live.pop(addr, None)
    return None if old is None else -old["size"]


def peak_report(snapshot: dict, top: int = 12, device: int | None = None) -> dict:
    """Replay one device's trace (default: the longest) from the blocks live when it began; report the peak.

    Baseline blocks (allocated before recording, or before the start of a wrapped ring buffer) are
    those freed in the trace with no alloc before, plus the 'active_allocated' blocks of the final
    `segments` that no traced alloc explains. Returns `baseline_bytes`, `peak_bytes` (absolute),
    `peak_above_baseline_bytes`, `end_bytes`, `peak_event` (index into the trace; -1: its start),
    `peak_alloc` (the alloc that set the peak) and `sites`: the `top` largest groups of blocks alive
    at the peak, by (site, innermost frame), each with `bytes` and `count`."""
    traces = snapshot["device_traces"]
    if device is None:
        device = max(range(len(traces)), key=lambda d: len(traces[d])) if traces else 0
    events = traces[device] if traces else []
    baseline: dict[int, dict] = {}
    live: dict[int, dict] = {}
    pending: set[int] = set()
    for e in events:  # pass 1: blocks freed without a recorded alloc
        if _apply(e, live, pending) is None:
            baseline.setdefault(e["addr"], {"size": e["size"], "baseline": True})
    for seg in snapshot.get("segments", []):
        addr = seg.get("address", 0)
        for b in seg["blocks"] if seg.get("device", device) == device else []:
            addr = b.get("address", addr)  # blocks tile their segment; older dumps omit the address
            if b["state"] == "active_allocated" and addr not in live and addr not in baseline:
                baseline[addr] = {"size": b.get("requested_size", b["size"]), "baseline": True}
            addr += b["size"]
    base = sum(b["size"] for b in baseline.values())
    live, pending, now, peak, peak_i = dict(baseline), set(), base, base, -1
    for i, e in enumerate(events):  # pass 2: the running total and its maximum
        now += _apply(e, live, pending) or 0
        if now > peak:
            peak, peak_i = now, i
    live, pending = dict(baseline), set()
    for e in events[:peak_i + 1]:  # pass 3: who is alive at the peak
        _apply(e, live, pending)
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for b in live.values():
        groups[_site(b)][0] += b["size"]
        groups[_site(b)][1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    at = events[peak_i] if peak_i >= 0 else None
    return {"device": device, "n_events": len(events), "baseline_bytes": base, "peak_bytes": peak,
            "peak_above_baseline_bytes": peak - base, "end_bytes": now, "peak_event": peak_i,
            "peak_alloc": None if at is None else {"size": at["size"], "site": _site(at)[0]},
            "live_blocks_at_peak": len(live),
            "sites": [{"site": s, "innermost": inner, "bytes": n, "count": c} for (s, inner), (n, c) in ranked]}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_peak_report(report: dict) -> str:
    """The report as a table: totals, then one row per site (MiB, 1 decimal)."""
    r, m = report, _mib
    lines = [(f"cuda:{r['device']}: peak {m(r['peak_bytes'])} MiB = baseline {m(r['baseline_bytes'])} + "
              f"{m(r['peak_above_baseline_bytes'])} MiB, at event {r['peak_event']} of {r['n_events']} "
              f"({r['live_blocks_at_peak']} blocks live); end {m(r['end_bytes'])} MiB")]
    if r["peak_alloc"]:
        lines.append(f"peak set by a {m(r['peak_alloc']['size'])} MiB alloc at {r['peak_alloc']['site']}")
    lines.append(f"{'MiB':>9} {'count':>6}  site  [innermost frame]")
    lines += [f"{m(s['bytes']):>9} {s['count']:>6}  {s['site']}" + (f"  [{s['innermost']}]" if s["innermost"] else "")
              for s in r["sites"]]
    return "\n".join(lines)
