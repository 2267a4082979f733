"""Every policy round-trips: headwise_inference.json next to a saved model -> headwise.load -> generate (and the CLI)."""

from __future__ import annotations

import pytest

import headwise
from headwise.cli import main
from headwise.inference.config import BaseModelRef, InferenceConfig, parse_kv_policy
from inference_helpers import tiny_model, word_tokenizer

PROMPTS = ["w5 w9 w17 w33 w8 w70 w12 w3 w44 w91 w23 w7 w61 w18 w27 w99 w5 w40 w11 w76",
           "w8 w13 w21 w34 w55 w89 w14 w10 w6"]
POLICIES = [
    {"type": "full"},
    {"type": "streaming", "sink": 2, "recent": 6},
    {"type": "h2o", "heavy_ratio": 0.25, "recent_ratio": 0.25},
    {"type": "duo", "retrieval_heads": [[1, 0], [0, 1]], "sink": 2, "recent": 4},
    {"type": "duo", "retrieval_heads": [[1, 0], [1, 1]], "sink": 2, "recent": 4,
     "retrieval_policy": {"type": "h2o", "heavy": 3, "recent": 3}},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    tiny_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def _export(model_dir, tmp_path, policy):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(model_dir, out)
    InferenceConfig(headwise_version=headwise.__version__, method="full", weights="merged",
                    base_model=BaseModelRef(name="tiny"), kv_policy=parse_kv_policy(policy)).save(out)
    return out


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["type"] + str(len(str(p))))
def test_policy_round_trips_through_an_export(model_dir, tmp_path, policy):
    loaded = headwise.load(_export(model_dir, tmp_path, policy), dtype="float32")
    assert loaded.policy == parse_kv_policy(policy)
    texts = loaded.generate(PROMPTS, max_new_tokens=8)
    assert len(texts) == 2 and all(len(t.split()) == 8 for t in texts)
    assert loaded.generate(PROMPTS, max_new_tokens=8, static=True) == texts
    # the same policy through a cache built by hand gives the same tokens (batch of one)
    enc = loaded.tokenizer(PROMPTS[0], return_tensors="pt")
    cache = loaded.make_cache()
    kw = {"past_key_values": cache} if cache is not None else {}
    ids = loaded.model.generate(**enc, max_new_tokens=8, do_sample=False, **kw)[0, enc["input_ids"].shape[1]:]
    assert loaded.tokenizer.decode(ids) == texts[0]


def test_policy_on_a_plain_model_folder(model_dir):
    """H2O on any HF model, not only exports; with a budget covering everything it equals full attention."""
    full = headwise.load(str(model_dir), dtype="float32")
    assert full.config is None and full.policy.type == "full"
    h2o = headwise.load(str(model_dir), dtype="float32", policy="h2o:heavy=64,recent=64")
    assert h2o.generate(PROMPTS, max_new_tokens=10) == full.generate(PROMPTS, max_new_tokens=10)
    small = headwise.load(str(model_dir), dtype="float32", policy={"type": "h2o", "heavy": 3, "recent": 3})
    assert len(small.generate(PROMPTS[0], max_new_tokens=6).split()) == 6


def test_cli_generate_with_a_policy(model_dir, capsys):
    assert main(["generate", str(model_dir), PROMPTS[0], "--max-new-tokens", "5", "--dtype", "float32",
                 "--policy", '{"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}']) == 0
    assert len(capsys.readouterr().out.split()) == 5
    assert main(["generate", str(model_dir), PROMPTS[0], "--max-new-tokens", "5", "--dtype", "float32",
                 "--policy", "streaming:sink=2,recent=4", "--static"]) == 0
    static = capsys.readouterr().out
    assert len(static.split()) == 5
    # --compile: the same greedy tokens from the torch.compile'd step
    assert main(["generate", str(model_dir), PROMPTS[0], "--max-new-tokens", "5", "--dtype", "float32",
                 "--policy", "streaming:sink=2,recent=4", "--compile"]) == 0
    assert capsys.readouterr().out == static


def test_cli_bad_policy_names_the_field(model_dir, capsys):
    assert main(["generate", str(model_dir), "w5", "--policy", "h2o:heavy_ratio=2,recent_ratio=0.1"]) == 2
    assert "--policy.heavy_ratio" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "w5", "--policy", '{"type": "duo", "retrieval_heads": [[1]]}']) == 2
    assert "kv_policy.retrieval_heads: 1 x 1" in capsys.readouterr().err
