"""The KV-policy schema: every policy validates, bad configs fail naming the field, recipes and files carry it."""

from __future__ import annotations

import json

import pytest

from headwise.errors import HeadwiseError
from headwise.inference.config import (
    DuoPolicy, FullPolicy, H2OPolicy, InferenceConfig, BaseModelRef, StreamingPolicy, parse_kv_policy,
)


@pytest.mark.parametrize("given, cls", [
    ({"type": "full"}, FullPolicy),
    ({"type": "streaming", "sink": 4, "recent": 64}, StreamingPolicy),
    ({"type": "streaming", "recent_ratio": 0.2}, StreamingPolicy),
    ({"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}, H2OPolicy),
    ({"type": "h2o", "heavy": 32, "recent": 32}, H2OPolicy),
    ({"type": "duo", "retrieval_heads": [[1, 0], [0, 1]]}, DuoPolicy),
    ({"type": "duo", "retrieval_heads": [[1, 0]], "retrieval_policy": {"type": "h2o", "heavy": 8, "recent": 8}}, DuoPolicy),
    ('{"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}', H2OPolicy),
    ("h2o:heavy_ratio=0.1,recent_ratio=0.1", H2OPolicy),
    ("streaming:sink=4,recent=1024", StreamingPolicy),
    ("full", FullPolicy),
])
def test_valid_policies_parse(given, cls):
    policy = parse_kv_policy(given)
    assert isinstance(policy, cls)
    # and survive a JSON round trip through the union
    assert parse_kv_policy(policy.model_dump(mode="json")) == policy


@pytest.mark.parametrize("given, field, words", [
    ({"type": "h2o", "heavy_ratio": 1.5, "recent_ratio": 0.1}, "kv_policy.heavy_ratio", "less than or equal to 1"),
    ({"type": "h2o", "heavy_ratio": 0.0, "recent_ratio": 0.1}, "kv_policy.heavy_ratio", "greater than 0"),
    ({"type": "h2o", "heavy": -3, "recent": 4}, "kv_policy.heavy", "greater than 0"),
    ({"type": "h2o", "heavy": 8, "recent_ratio": 0.1}, "kv_policy", "not both"),
    ({"type": "h2o", "heavy": 8}, "kv_policy", "recent is missing"),
    ({"type": "h2o"}, "kv_policy", "set the budget"),
    ({"type": "streaming", "recent": 0}, "kv_policy.recent", "greater than 0"),
    ({"type": "streaming", "sink": 4, "recent": 8, "window": 3}, "kv_policy.window", "Extra inputs"),
    ({"type": "duo", "retrieval_heads": [[1, 0], [1]]}, "kv_policy.retrieval_heads", "row 1 has 1 entries"),
    ({"type": "duo", "retrieval_heads": [[1, 2]]}, "kv_policy.retrieval_heads", "1 (retrieval) or 0"),
    ({"type": "duo", "retrieval_heads": [[1]], "retrieval_policy": {"type": "h2o", "heavy_ratio": 2, "recent_ratio": 0.1}},
     "kv_policy.retrieval_policy.heavy_ratio", "less than or equal to 1"),
    ({"type": "bogus"}, "kv_policy.type", "full, streaming, h2o, duo"),
    ("h2o:heavy_ratio", "kv_policy", "key=value"),
    ("{not json", "kv_policy", "not valid JSON"),
    # strict types: a bool or a string is not a token count, a string is not a ratio
    ({"type": "h2o", "heavy": True, "recent": 4}, "kv_policy.heavy", "valid integer"),
    ({"type": "h2o", "heavy": 4, "recent": "4"}, "kv_policy.recent", "valid integer"),
    ({"type": "streaming", "recent_ratio": "0.5"}, "kv_policy.recent_ratio", "valid number"),
    ({"type": "duo", "retrieval_heads": [[True, 0]]}, "kv_policy.retrieval_heads.0.0", "valid integer"),
])
def test_bad_policies_name_the_field(given, field, words):
    with pytest.raises(HeadwiseError) as e:
        parse_kv_policy(given)
    msg = str(e.value)
    assert msg.startswith(field + ":") or f"; {field}:" in msg, msg
    assert words in msg, msg


def test_inference_config_file_names_the_file_and_field(tmp_path):
    cfg = InferenceConfig(headwise_version="0", method="full", weights="merged", base_model=BaseModelRef(name="x"),
                          kv_policy=H2OPolicy(heavy_ratio=0.1, recent_ratio=0.1))
    cfg.save(tmp_path)
    assert InferenceConfig.read(tmp_path).kv_policy == cfg.kv_policy
    raw = json.loads((tmp_path / "headwise_inference.json").read_text())
    raw["kv_policy"]["heavy_ratio"] = 3
    (tmp_path / "headwise_inference.json").write_text(json.dumps(raw))
    with pytest.raises(HeadwiseError, match=r"headwise_inference.json: kv_policy.heavy_ratio: Input should be less"):
        InferenceConfig.read(tmp_path)


def test_recipe_export_section_takes_every_policy():
    from headwise.recipe.schema import ExportSection

    for policy in ({"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}, {"type": "streaming", "recent": 8},
                   {"type": "duo", "retrieval_heads": [[1, 0]]}):
        assert ExportSection.model_validate({"kv_policy": policy}).kv_policy.type == policy["type"]


def test_duo_mask_must_match_the_model(llama):
    from headwise.inference.cache import make_cache

    with pytest.raises(HeadwiseError, match=r"kv_policy.retrieval_heads: 3 x 2 .* 2 layers x 2 KV heads"):
        make_cache(llama, {"type": "duo", "retrieval_heads": [[1, 0], [1, 0], [0, 0]]})
