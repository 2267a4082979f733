"""benchmarks/memory_peak.py on hand-built allocator snapshots (the format of torch.cuda.memory._snapshot()).

Every expected figure below is worked out by hand from the synthetic events, in MiB."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_peak import BEFORE, NO_FRAMES, PeakTrace, format_peak_report, peak_report  # noqa: E402

MiB = 2**20
SP = "/usr/lib/python3.11/site-packages"
TORCH = {"filename": f"{SP}/torch/nn/functional.py", "line": 5, "name": "scaled_dot_product_attention"}
HF = {"filename": f"{SP}/transformers/models/llama/modeling_llama.py", "line": 300, "name": "forward"}
PEFT = {"filename": f"{SP}/peft/tuners/lora/layer.py", "line": 700, "name": "forward"}
ATTN = [TORCH, {"filename": "/work/main/kernels/shifted.py", "line": 42, "name": "sf_attn"}, HF]
MLP = [TORCH, PEFT, HF, {"filename": "/work/main/benchmarks/bench_train.py", "line": 120, "name": "train_step"}]
ATTN_SITE, MLP_SITE = "main/kernels/shifted.py:42 sf_attn", "main/benchmarks/bench_train.py:120 train_step"
INNER = "torch/nn/functional.py:5 scaled_dot_product_attention"


def alloc(addr, mib, frames):
    return {"action": "alloc", "addr": addr, "size": mib * MiB, "frames": frames, "stream": 0}


def free(addr, mib, completed=True):
    ev = [{"action": "free_requested", "addr": addr, "size": mib * MiB, "frames": [], "stream": 0}]
    return ev + ([{"action": "free_completed", "addr": addr, "size": mib * MiB, "frames": [], "stream": 0}] if completed else [])


def block(addr, mib, state="active_allocated", slack=0):
    return {"address": addr, "size": mib * MiB + slack, "requested_size": mib * MiB, "state": state, "frames": []}


def snapshot(events, blocks):
    return {"segments": [{"device": 0, "address": 0x1000, "total_size": 64 * MiB, "blocks": blocks}],
            "device_traces": [events]}


def step_snapshot():
    """Baseline: 0x1000 (10 MiB, live throughout) and 0x2000 (4 MiB, freed at event 3), 14 MiB.
    Running total after each event: 0 segment 14 | 1 +A8 22 | 2 +B2 24 | 3 -4 20 | 4 (completed) 20 |
    5 +C6 26 | 6 +D3 29 (peak) | 7 -A 21 | 8 | 9 +E5 at A's address 26 | 10 -B 24 | 11 | 12 +F1 25 (end)."""
    events = [{"action": "segment_alloc", "addr": 0x1000, "size": 64 * MiB, "frames": [], "stream": 0},
              alloc(0x3000, 8, ATTN), alloc(0x4000, 2, ATTN), *free(0x2000, 4),
              alloc(0x5000, 6, MLP), alloc(0x6000, 3, ATTN), *free(0x3000, 8),
              alloc(0x3000, 5, MLP), *free(0x4000, 2), alloc(0x7000, 1, [])]
    # end state: the baseline block carries 1 MiB of unsplit slack in `size`; the replay counts requested_size
    blocks = [block(0x1000, 10, slack=MiB), block(0x2000, 4, "inactive"), block(0x3000, 5), block(0x4000, 2, "inactive"),
              block(0x5000, 6), block(0x6000, 3), block(0x7000, 1)]
    return snapshot(events, blocks)


def test_peak_value_index_and_sites():
    r = peak_report(step_snapshot())
    assert r["baseline_bytes"] == 14 * MiB
    assert r["peak_bytes"] == 29 * MiB and r["peak_above_baseline_bytes"] == 15 * MiB
    assert r["peak_event"] == 6 and r["n_events"] == 13
    assert r["end_bytes"] == 25 * MiB
    assert r["peak_alloc"] == {"size": 3 * MiB, "site": ATTN_SITE}
    # alive at the peak: baseline 0x1000 (10), A 8 + B 2 + D 3 (attention, 13), C 6 (MLP); not 0x2000, E, F
    assert r["live_blocks_at_peak"] == 5
    assert [(s["site"], s["bytes"], s["count"]) for s in r["sites"]] == [
        (ATTN_SITE, 13 * MiB, 3), (BEFORE, 10 * MiB, 1), (MLP_SITE, 6 * MiB, 1)]
    assert r["sites"][0]["innermost"] == INNER


def test_top_keeps_the_largest_sites():
    r = peak_report(step_snapshot(), top=2)
    assert [s["bytes"] for s in r["sites"]] == [13 * MiB, 10 * MiB]


def test_peak_before_first_event_when_the_trace_only_frees():
    """Two blocks allocated before recording, one freed in the trace: the peak is the start (index -1)."""
    snap = snapshot([*free(0x2000, 4)], [block(0x1000, 10), block(0x2000, 4, "inactive")])
    r = peak_report(snap)
    assert r["baseline_bytes"] == r["peak_bytes"] == 14 * MiB and r["peak_above_baseline_bytes"] == 0
    assert r["peak_event"] == -1 and r["peak_alloc"] is None and r["end_bytes"] == 10 * MiB
    assert [(s["site"], s["bytes"], s["count"]) for s in r["sites"]] == [(BEFORE, 14 * MiB, 2)]


def test_deferred_free_library_only_stack_and_missing_frames():
    """X stops counting at its free_requested, though its free_completed comes after Z's alloc; Y's
    free_requested was not recorded (skip_actions), so its free_completed frees it.
    Totals: +X4 4 | +Y2 6 | -X 2 | +Z5 7 (peak, event 3) | (X completed) 7 | -Y 5 | +V1 6.
    (Counting frees at free_completed would put 11 MiB at event 3, X included.)"""
    hf_only = [TORCH, HF]
    events = [alloc(0x10, 4, ATTN), alloc(0x20, 2, hf_only), *free(0x10, 4, completed=False),
              alloc(0x30, 5, []), free(0x10, 4)[1], free(0x20, 2)[1], alloc(0x50, 1, MLP)]
    r = peak_report(snapshot(events, [block(0x30, 5), block(0x50, 1)]))
    assert r["baseline_bytes"] == 0 and r["peak_bytes"] == 7 * MiB and r["peak_event"] == 3
    assert r["end_bytes"] == 6 * MiB
    hf_site = "transformers/models/llama/modeling_llama.py:300 forward"
    assert [(s["site"], s["bytes"], s["count"]) for s in r["sites"]] == [(NO_FRAMES, 5 * MiB, 1), (hf_site, 2 * MiB, 1)]


def test_format_peak_report():
    text = format_peak_report(peak_report(step_snapshot()))
    assert "peak 29.0 MiB = baseline 14.0 + 15.0 MiB, at event 6 of 13" in text
    assert f"     13.0      3  {ATTN_SITE}  [{INNER}]" in text
    assert f"     10.0      1  {BEFORE}" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU no-op")
def test_peak_trace_is_a_no_op_without_cuda():
    with PeakTrace() as trace:
        torch.ones(4).sum()
    assert trace.snapshot is None
