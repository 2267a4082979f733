"""The support table's rows (benchmarks/results/support.jsonl, rendered into docs/kernels.md) are the battery's
current verdicts: a change of what a method or policy accepts without re-running the battery into the results
fails here. Regenerate with `HEADWISE_BATTERY_RESULTS=benchmarks/results/support.jsonl python -m pytest
tests/battery` (rows are written only when the whole battery passes)."""

from __future__ import annotations

import json
from pathlib import Path

from headwise.inference.cache import CACHE_FEATURES
from headwise.patches import METHODS
from headwise.patches.model_attention import attention_facts
from model_families import FAMILIES, OWN_REFUSALS, family_model

ROWS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "support.jsonl"
POLICIES = ("full", "streaming", "duo")  # the policies tests/battery/test_policy_battery.py runs


def _latest() -> dict[tuple[str, str], dict]:
    latest = {}
    for line in ROWS.read_text().splitlines():
        row = json.loads(line)
        latest[(row["family"], row["consumer"])] = row
    return latest


def test_every_case_has_its_current_verdict():
    rows = _latest()
    for family in FAMILIES:
        model = family_model(family)
        facts = attention_facts(model.config, model)
        # a method declares what it composes with (Method.attention_features), the caches too (CACHE_FEATURES)
        expected = {}
        for name, method in METHODS.items():
            dropped = facts.unsupported(**dict.fromkeys(method.attention_features, True))
            own = OWN_REFUSALS.get(name, {}).get(family)
            expected[f"method {name}"] = (not dropped and not own, dropped or [own])
        dropped = facts.unsupported(**CACHE_FEATURES)
        expected |= {f"kv_policy {p}": (p == "full" or not dropped, dropped) for p in POLICIES}
        for consumer, (matches, dropped) in expected.items():
            row = rows.get((family, consumer))
            assert row is not None, f"no support row for {family} x {consumer}: re-run the battery into {ROWS.name}"
            assert row["verdict"] == ("matches" if matches else "refused"), (family, consumer)
            assert row["reason"] == ("" if matches else "; ".join(dropped)), (family, consumer)
