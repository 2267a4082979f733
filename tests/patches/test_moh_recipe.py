"""`method: moh` through the recipe path on the tiny Llama of conftest: the learned routers train with the
adapter (LoRA's language-model loss plus the balance loss), are saved with it and come back on resume, and the
export writes the moh attention (tests/patches/test_moh_export.py loads it back); the shipped recipes resolve."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from headwise.recipe.loader import load_recipe
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def test_learned_routers_train_save_resume_and_export(tmp_path, tiny_model_dir):
    from headwise.patches.base import method_for
    from headwise.publish.export import export_run
    from headwise.train.trainer import build_training_model, train

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", max_steps=2, save_steps=2, learning_rate=1e-2)
    recipe["method"] = {"name": "moh", "router": "learned", "activation": 0.75, "shared": 0.5}
    loaded = load_recipe(write_recipe(tmp_path, recipe))
    model = train(loaded).model
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "moh_router" in n and p.requires_grad}
    assert len(routers) == 2 * 3  # W_s, W_r, W_h per layer, trained
    assert all(p.abs().sum() > 0 for p in routers.values())  # moved off their zero initialisation
    with safe_open(str(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors"), framework="pt") as st:
        saved = [k for k in st.keys() if "moh_router" in k]
    assert len(saved) == 6
    fresh = build_training_model(loaded.recipe, method_for(loaded.recipe.method))
    fresh.load_adapter(str(tmp_path / "run" / "checkpoint-2"), "default", is_trainable=True)
    restored = {n: p for n, p in fresh.named_parameters() if "moh_router" in n and p.requires_grad}
    for name, value in routers.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0)
    export = export_run(tmp_path / "run")
    attention = json.loads((export / "headwise_inference.json").read_text())["attention"]
    assert (attention["name"], attention["router"]) == ("moh", "learned")

    # what the run wrote about its routers: per logged step and layer, the share of tokens choosing each of the 2
    # routed heads (k = 1 of them per token, so the shares sum to 1) and the balance loss; the heatmap at the end
    rows = [json.loads(line) for line in (tmp_path / "run" / "moh" / "usage.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert sorted(row["usage"]) == ["0", "1"] and sorted(row["balance"]) == ["0", "1"]
        for shares in row["usage"].values():
            assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
        for value in row["balance"].values():
            assert 0.0 < value <= 2.0  # R * sum_i P_i f_i with R = 2, sum_i f_i = 1 and P_i <= 1
    assert (tmp_path / "run" / "moh_head_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,heads,kv_heads,overrides,expected", [
    ("moh-smollm2", 9, 3, [], (1, 4, 5, 3)),  # SmolLM2-135M: 7 of 9 heads active
    ("moh-llama3-8b", 32, 8, [], (1, 16, 16, 8)),  # MoH-LLaMA3: 16 shared + 8 of 16 routed
    ("moh-llama3-8b", 32, 8, ["method.router=kv_group"], (4, 4, 4, 2)),  # 4 shared groups + 2 of 4
])
def test_the_shipped_recipes_split_the_heads_as_they_say(name, heads, kv_heads, overrides, expected):
    from headwise.patches.moh import head_split

    split = head_split(load_recipe(name, overrides).recipe.method, heads, kv_heads)
    assert (split.group, split.n_shared, split.n_routed, split.k) == expected


def test_a_packed_sample_routes_and_attends_each_document_alone():
    """Packed training samples (position ids restarting at every document, no attention mask: what the packing
    builder makes) go through transformers' packed-sequence mask into SDPA: each document's logits equal its own
    forward, so no token attends across documents."""
    import copy

    from headwise.patches.base import method_for
    from headwise.patches.moh import MoHMethod
    from model_families import family_model

    model = family_model("llama", dtype=torch.float64)
    method_for(MoHMethod(router="query_norm", activation=0.75, shared=0.25)).prepare_model(model)
    model.train()
    docs = [torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 11, 6)]
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(docs, dim=1), position_ids=positions, use_cache=False).logits
        alone = torch.cat([copy.deepcopy(model)(input_ids=d, use_cache=False).logits for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)
