"""Restructuring must not change behaviour: every shipped recipe resolves (`headwise recipe show`) and exports
(`headwise_inference.json`) to exactly the bytes recorded in `tests/golden/`.

The golden files were written by the code *before* the package was reorganised into floors and wings
(commit "golden snapshots", the tree at 44cfd9b..a549796 plus no code change), by running this module with
`HEADWISE_WRITE_GOLDEN=1`. They are the independent reference here: the code under test is the reorganised
one. Regenerate them only for a deliberate change of a recipe or of the file format, and say so in the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
WRITE = os.environ.get("HEADWISE_WRITE_GOLDEN") == "1"
SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
# Exports need the model's config: the SmolLM2 recipes run offline (embedded model); the 8B ones would download.
# MoH's export has no golden file from the code before the reorganisation (it came later): its
# headwise_inference.json is checked against a hand-written entry in tests/patches/test_moh_export.py.
EXPORTABLE = [n for n in SHIPPED if "llama3" not in n and not n.startswith("moh")]
# Extra KV policies through the recipe path (export.kv_policy overrides), so every policy type is serialised.
POLICY_VARIANTS = {
    "streaming": ["export.kv_policy.type=streaming", "export.kv_policy.sink=4", "export.kv_policy.recent=60"],
    "h2o": ["export.kv_policy.type=h2o", "export.kv_policy.heavy_ratio=0.25", "export.kv_policy.recent_ratio=0.25"],
}


def assert_matches_golden(name: str, text: str) -> None:
    """`text` equals the golden file `name` (with HEADWISE_WRITE_GOLDEN=1: writes it instead, once, from the
    reference code)."""
    path = GOLDEN / name
    if WRITE:
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"{path} is missing; it is written once from the reference code (see the module docstring)"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from the recorded behaviour"


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_show_unchanged(name, capsys, monkeypatch):
    """`headwise recipe show NAME`, through the CLI's entry point (in this process: the golden files hold its
    stdout), from the repository root."""
    from headwise.cli import main

    monkeypatch.chdir(REPO)
    assert main(["recipe", "show", name]) == 0
    assert_matches_golden(f"show_{name}.yaml", capsys.readouterr().out.replace(str(REPO), "<repo>"))


def _duo_gates_dir(tmp_path: Path, layers: int, kv_heads: int) -> Path:
    """A weights folder holding Duo gates with distinct values (a fixed, seed-free grid)."""
    from safetensors.torch import save_file

    grid = torch.arange(layers * kv_heads, dtype=torch.float32).reshape(layers, kv_heads)
    grid = (grid * 7919 % (layers * kv_heads)) / (layers * kv_heads)  # a permutation of i/n: no ties
    tensors = {f"base_model.model.model.layers.{i}.self_attn.duo_gate.gate": grid[i].clone() for i in range(layers)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def _inference_json(recipe, tmp_path: Path) -> str:
    from headwise.publish.export import build_inference_config
    from headwise.patches.base import method_for

    method = method_for(recipe.method)
    fmt = "base" if method.export_weights() == "base" else recipe.export.format
    policy = None
    if recipe.method.name == "duo":
        (tmp_path / "weights").mkdir()
        (tmp_path / "out").mkdir()
        weights = _duo_gates_dir(tmp_path / "weights", 30, 3)  # SmolLM2-135M: 30 layers, 3 KV heads
        policy = method.export_artifacts(weights, tmp_path / "out")
    config = build_inference_config(recipe, weights=fmt, kv_policy=policy)
    return config.save(tmp_path).read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_inference_config_unchanged(name, tmp_path):
    from headwise.recipe.loader import load_recipe

    recipe = load_recipe(name).recipe
    assert_matches_golden(f"inference_{name}.json", _inference_json(recipe, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(POLICY_VARIANTS))
def test_export_kv_policy_variants_unchanged(variant, tmp_path):
    from headwise.recipe.loader import load_recipe

    recipe = load_recipe("full-smollm2", POLICY_VARIANTS[variant]).recipe
    assert_matches_golden(f"inference_full-smollm2_{variant}.json", _inference_json(recipe, tmp_path))
