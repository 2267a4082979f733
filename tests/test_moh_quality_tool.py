"""benchmarks/moh_smollm2.py's pure parts and the report regions that show its rows.

The head splits are checked against the counts worked out by hand from MoH's rounding (shares of 9 query heads
over 3 KV heads); the list-of-rows training data against what `datasets` itself hands the Trainer; the regions
against synthetic rows whose ratios the test computes from their perplexities.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import moh_smollm2 as tool  # noqa: E402
import report  # noqa: E402

N_HEADS, N_KV_HEADS = 9, 3  # SmolLM2-135M


@pytest.mark.parametrize("key, unit, shared, routed, active_routed, active_heads", [
    ("dense", "head", 9, 0, 0, 9),
    # round(9 * 0.5) = 4 shared (half to even), round(9 * 0.75) = 7 active: 3 of the other 5
    ("query_norm-75", "head", 4, 5, 3, 7),
    ("learned-75", "head", 4, 5, 3, 7),
    # round(9 * 0.25) = 2 shared, round(9 * 0.5) = 4 active (half to even): 2 of the other 7
    ("query_norm-50", "head", 2, 7, 2, 4),
    # 3 groups of 3 heads: round(3 * 0.33) = 1 shared group, round(3 * 0.67) = 2 active: 1 of the other 2
    ("kv_group-67", "kv_group", 1, 2, 1, 6),
])
def test_head_split_of_each_model_on_smollm2(key, unit, shared, routed, active_routed, active_heads):
    fields = tool.split_fields(tool.VARIANTS[key], N_HEADS, N_KV_HEADS)
    assert fields["heads"] == {"query_heads": 9, "kv_heads": 3, "unit": unit, "shared": shared, "routed": routed,
                               "active_routed": active_routed}
    assert fields["active_heads"] == active_heads
    assert fields["active_share"] == pytest.approx(active_heads / 9, abs=1e-4)


def test_every_moh_model_routes_something_on_smollm2():
    """MoH refuses a split that routes nothing (it would only drop heads): no model of the tool may have one."""
    for variant in tool.VARIANTS.values():
        if variant.router is not None:
            heads = tool.split_fields(variant, N_HEADS, N_KV_HEADS)["heads"]
            assert 0 < heads["active_routed"] < heads["routed"], variant.key


def test_rows_without_datasets_are_the_rows_datasets_gives():
    """The list handed to the Trainer where `datasets` is missing holds, row by row, what `datasets.Dataset` yields
    for the same packed columns, and the collator makes the same batch of both."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("datasets")
    from headwise.data_builders import PackedCollator
    from headwise.data_builders.packing import _to_dataset

    columns = {"input_ids": np.arange(12, dtype=np.int64).reshape(3, 4) + 50000,
               "labels": np.array([[-100, 1, 2, 3], [-100, 5, -100, 7], [-100, 9, 10, 11]], dtype=np.int64),
               "position_ids": np.array([[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3]], dtype=np.int64)}
    reference = _to_dataset(columns)
    rows = tool.packed_rows(columns)
    assert len(rows) == len(reference) == 3
    assert rows == [dict(reference[i]) for i in range(3)]
    a, b = PackedCollator()(rows[:2]), PackedCollator()([reference[0], reference[1]])
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _settings(**kw) -> tool.Settings:
    base = {"context": 2048, "stride": 1024, "max_windows": None, "steps": 120, "batch": 4, "learning_rate": 2e-4,
            "seed": 42, "device": "cuda", "dtype": "auto", "tiny": False, "without_datasets": True}
    return tool.Settings(**{**base, **kw})


def _row(key: str, steps: int, ppl: float, dense: float | None, settings: tool.Settings, **extra) -> dict:
    train = None if steps == 0 else {"batch": settings.batch, "learning_rate": settings.learning_rate,
                                     "seed": settings.seed}
    m = tool.Measured(tool.VARIANTS[key], steps, ppl, 100_000, 98, 3.0, "bfloat16", train)
    row = tool.make_row(m, settings, tool.split_fields(tool.VARIANTS[key], N_HEADS, N_KV_HEADS), dense,
                        "python benchmarks/moh_smollm2.py", "NVIDIA H200", "1x NVIDIA H200")
    return {**row, **extra}


def test_dense_perplexity_comes_from_rows_measured_alike():
    s = _settings()
    rows = [_row("dense", 120, 10.0, None, s),
            _row("dense", 120, 11.0, None, s),  # newer: wins
            _row("dense", 120, 99.0, None, _settings(tiny=True)),  # a smoke row
            _row("dense", 120, 98.0, None, _settings(context=1024, stride=512)),  # other windows
            _row("dense", 120, 97.0, None, _settings(batch=8)),  # tuned otherwise
            _row("query_norm-75", 120, 12.0, 11.0, s),  # not dense
            _row("dense", 0, 9.0, None, s)]
    assert tool.dense_ppl_from_rows(rows, s, 120) == 11.0
    assert tool.dense_ppl_from_rows(rows, s, 0) == 9.0
    assert tool.dense_ppl_from_rows(rows, s, 60) is None
    assert tool.dense_ppl_from_rows(rows, _settings(tiny=True), 120) == 99.0


def test_a_moh_row_states_its_ratio_to_dense_and_the_tokens_seen():
    s = _settings()
    row = _row("query_norm-75", 120, 12.6, 12.0, s)
    assert row["ratio_vs_dense"] == pytest.approx(1.05)
    assert row["dense_value"] == 12.0
    assert row["tokens_seen"] == 120 * 4 * 2048
    assert row["method"] == "moh" and row["metric"] == "ppl@2048" and not row["smoke"]
    assert _row("dense", 120, 12.0, None, s)["ratio_vs_dense"] is None
    assert json.loads(json.dumps(row)) == row  # one JSON line


def _render(tmp_path: Path, rows: list[dict], name: str) -> str:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    (results / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return report.render(name, report.Results(results), tmp_path / "docs" / "methods" / "moh.md", tmp_path)


def test_the_table_shows_the_latest_real_rows(tmp_path):
    s, smoke = _settings(), _settings(tiny=True)
    other = {"method": "full", "metric": "ppl@16384", "value": 5.0, "steps": 100, "context": 16384}
    rows = [other,
            _row("dense", 0, 10.0, None, s),
            _row("query_norm-75", 0, 60.0, 10.0, s),  # replaced by the next
            _row("query_norm-75", 0, 50.0, 10.0, s),
            _row("dense", 120, 8.0, None, s),
            _row("query_norm-75", 120, 8.4, 8.0, s),
            _row("query_norm-75", 120, 1.0, 1.0, smoke)]  # never shown
    text = _render(tmp_path, rows, "moh-smollm2-quality")
    body = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")
            and not line.startswith("| file") and ".jsonl" not in line]
    assert body == [
        "| dense | 9/9 | 0 | 0 | 10.00 | - |",
        "| MoH `query_norm` (0.75 / 0.5) | 7/9: 4 shared + 3 of 5 heads | 0 | 0 | 50.00 | 5.000x |",
        "| dense | 9/9 | 120 | 0.98M | 8.00 | - |",
        "| MoH `query_norm` (0.75 / 0.5) | 7/9: 4 shared + 3 of 5 heads | 120 | 0.98M | 8.40 | 1.050x |",
    ]
    assert "lines 2, 4-6 (4 rows)" in text  # the rows cited: not the replaced one, nor the smoke row


def test_the_headline_is_the_tuned_75_percent_against_dense(tmp_path):
    s = _settings()
    rows = [_row("dense", 120, 8.0, None, s), _row("query_norm-75", 120, 8.16, 8.0, s),
            _row("query_norm-50", 120, 9.6, 8.0, s)]
    text = _render(tmp_path, rows, "moh-75-vs-dense")
    assert text.startswith("[2.0% above](../../benchmarks/results/quality.jsonl#L1-L2 ")
    assert text.endswith("the dense model's perplexity after the same 120 steps (0.98M tokens)")
    below = _render(tmp_path, [_row("dense", 120, 8.0, None, s), _row("query_norm-75", 120, 7.6, 8.0, s)],
                    "moh-75-vs-dense")
    assert below.startswith("[5.0% below]")


def test_without_rows_the_regions_say_so(tmp_path):
    smoke_only = [_row("query_norm-75", 2, 1.0, 1.0, _settings(tiny=True))]
    assert _render(tmp_path, smoke_only, "moh-75-vs-dense") == "not measured yet"
    assert "No rows yet" in _render(tmp_path, smoke_only, "moh-smollm2-quality")
