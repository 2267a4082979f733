"""A model's own attention is read once (`attention_facts`); every method composes with the features it declares
(`Method.attention_features`), and every method and KV policy that does not implement a feature refuses the model (one message: model type, feature, way out) on the Python path and
the recipe path alike, before anything is patched, trained or written.

The expected facts below are written from the configs these tests build (window sizes, layer patterns, softcap
values), not from the reader under test.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from headwise.errors import HeadwiseError
from headwise.patches.base import Method, method_for, register_method
from headwise.patches.duo.config import DuoMethod
from headwise.patches.model_attention import LayerRules, attention_facts, attention_modules
from headwise.patches.sinklora.config import SinkLoRAMethod
from headwise.patches.sinklora.method import SinkLoRA
from model_families import EXACT, FAMILIES, TINY, family_config, family_model

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_facts_read_from_the_config_and_from_the_modules(family):
    _, _, windows, softcap, sinks, projections = FAMILIES[family]
    for facts in (attention_facts(family_config(family)), attention_facts(family_config(family), family_model(family))):
        assert facts.windows == windows
        assert facts.softcap == softcap
        assert facts.learned_sinks is sinks
        assert facts.projections == projections
        assert (facts.num_heads, facts.num_kv_heads, facts.num_layers) == (4, 2, 2)
        assert (facts.unsupported() == []) is (family in EXACT)


def test_a_plain_window_applies_to_every_layer_unless_switched_off():
    """Mistral's `sliding_window` alone windows every layer; Qwen2's `use_sliding_window: false` turns it off."""
    assert attention_facts(transformers.MistralConfig(**TINY, sliding_window=8)).windows == (8, 8)
    qwen = transformers.Qwen2Config(**TINY, sliding_window=8, use_sliding_window=False)
    assert attention_facts(qwen).windows == (None, None)


METHODS = {"sinklora": SinkLoRAMethod(), "duo": DuoMethod()}
FEATURE_WORDS = {"mistral-window": "sliding-window attention (16 tokens on every layer)",
                 "qwen2-window": "sliding-window attention (16 tokens on layer 1)",
                 "gemma2": "attention logit soft-capping (50)", "gemma3": "sliding-window attention",
                 "gpt_oss": "learned attention-sink logits"}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_methods_patch_every_family(method, family):
    """SinkLoRA and Duo compose with every feature of the families here (the battery checks the numbers): both
    paths accept the model and each attention module carries its layer's rules as the family's config states
    them."""
    hooks = method_for(METHODS[method])
    model = family_model(family)
    hooks.check_model_config(model.config)
    hooks.prepare_model(model)
    assert model.config._attn_implementation == f"headwise_{method}"
    _, _, windows, softcap, sinks, _ = FAMILIES[family]
    for m in attention_modules(model):
        assert m.headwise_layer_rules == LayerRules(windows[m.layer_idx], softcap, sinks)


class WindowlessSinkLoRA(SinkLoRA):
    """SinkLoRA as a method that implements none of a model's extra rules would declare it (not registered)."""

    attention_features = ("fused_projections",)


@pytest.mark.parametrize("family", sorted(FEATURE_WORDS))
def test_a_method_refuses_what_it_does_not_declare_before_patching(family):
    """The Python path (`prepare_model`, what a user calls without a recipe) and the recipe path's config check
    give the same answer; a refused model is left as it was (its attention implementation unchanged)."""
    hooks = WindowlessSinkLoRA(SinkLoRAMethod())
    model = family_model(family)
    before = model.config._attn_implementation
    for check in (lambda: hooks.check_model_config(model.config), lambda: hooks.prepare_model(model)):
        with pytest.raises(HeadwiseError) as refused:
            check()
        message = str(refused.value)
        assert message.startswith(f"method sinklora: {model.config.model_type} uses ")
        assert FEATURE_WORDS[family] in message and "method: full" in message
    assert model.config._attn_implementation == before


def test_a_method_must_declare_its_attention_features():
    """Registering a method that inherits `full`'s "every feature" by omission fails at import time."""
    class Undeclared(Method):
        config_class = SinkLoRAMethod

    with pytest.raises(TypeError, match="must declare attention_features"):
        register_method(Undeclared)

    class Misspelt(Method):
        config_class = SinkLoRAMethod
        attention_features = ("sliding_windows",)

    with pytest.raises(TypeError, match="unknown"):
        register_method(Misspelt)


def test_a_model_whose_call_disagrees_with_its_config_is_refused():
    """The attention function compares what transformers hands it with the rules read at patch time: a layer
    called with a window its config did not state (a reader gap) is refused, not trained on something else."""
    model = family_model("mistral-window")
    method_for(SinkLoRAMethod(group_size=8)).prepare_model(model)
    model.config.sliding_window = 8  # Mistral passes config.sliding_window to its attention on every call
    model.train()
    with pytest.raises(HeadwiseError, match="called with sliding_window = 8, but the model's config says 16"):
        model(input_ids=torch.zeros(1, 16, dtype=torch.long), use_cache=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_policies_take_every_family_and_refuse_an_undeclared_feature(family, monkeypatch):
    """The headwise caches compose with a window, a softcap and learned sinks (the policy battery checks the
    numbers); a feature outside `CACHE_FEATURES` is refused when the cache is built, with the way out."""
    from headwise.inference import cache

    model = family_model(family)
    assert cache.make_cache(model, "streaming:sink=2,recent=8") is not None
    monkeypatch.setattr(cache, "CACHE_FEATURES", {"fused_projections": True})
    if family in EXACT or family == "phi3":
        assert cache.make_cache(model, "streaming:sink=2,recent=8") is not None
        return
    with pytest.raises(HeadwiseError) as refused:
        cache.make_cache(model, "streaming:sink=2,recent=8")
    assert str(refused.value).startswith(f"kv_policy: {model.config.model_type} uses ")
    assert "use kv_policy full" in str(refused.value)


@pytest.mark.slow
def test_the_recipe_path_trains_a_windowed_model_and_refuses_an_export_policy_before_the_run_folder(tmp_path,
                                                                                                     monkeypatch):
    """`headwise train` on a windowed Mistral trains SinkLoRA (its layout composes with the window). A run whose
    export would write a KV policy the caches cannot apply to the model is refused before the run folder exists:
    Duo (its export is a duo policy) and a recipe asking for a streaming export policy, shown here with the
    caches' declared features narrowed to what they had before the window composed (`CACHE_FEATURES`)."""
    from headwise.inference import cache
    from headwise.recipe.loader import load_recipe
    from headwise.train.trainer import train
    from tests.conftest import run_cli, write_recipe
    from tests.inference.inference_helpers import word_tokenizer

    data = {"builder": "corpus", "max_length": 32, "num_samples": 2, "limit_documents": 2}
    family_model("mistral-window").save_pretrained(tmp_path / "mistral")
    word_tokenizer().save_pretrained(tmp_path / "mistral")
    run = tmp_path / "sinklora"
    recipe = write_recipe(tmp_path, {"model": {"name": str(tmp_path / "mistral")},
                                     "method": {"name": "sinklora", "group_size": 8},
                                     "data": data, "training": {"output_dir": str(run), "max_steps": 1}})
    out = run_cli("train", str(recipe))
    assert out.returncode == 0, out.stderr
    monkeypatch.setattr(cache, "CACHE_FEATURES", {"fused_projections": True})
    refused = {"duo": ({"name": "duo"}, {}, "train it with another method"),
               "streaming": ({"name": "sinklora", "group_size": 8}, {"kv_policy": {"type": "streaming", "recent": 8}},
                             "export.kv_policy: full")}
    for name, (method, export, way_out) in refused.items():
        run = tmp_path / name
        recipe = write_recipe(tmp_path, {"model": {"name": str(tmp_path / "mistral")}, "method": method,
                                         "data": data, "export": export,
                                         "training": {"output_dir": str(run), "max_steps": 1}}, name=f"{name}.yaml")
        with pytest.raises(HeadwiseError, match=f"kv_policy {name}: mistral uses sliding-window attention") as e:
            train(load_recipe(recipe))
        assert way_out in str(e.value) and not run.exists()


@pytest.mark.slow
def test_a_family_without_sdpa_loads_with_its_own_attention(tmp_path):
    """`headwise.load` of a saved Gemma-2 (logit softcap, which SDPA cannot apply, so transformers refuses SDPA
    for it) opens with eager attention and computes what the stock model does, with or without a KV policy (a
    policy that keeps every token generates the stock model's tokens: its cache attention applies the softcap);
    asking for SDPA is refused by headwise on every transformers version (5.17 would accept it and drop the
    softcap)."""
    import headwise
    from tests.inference.inference_helpers import word_tokenizer

    model = family_model("gemma2")
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded = headwise.load(str(tmp_path), device="cpu")
    assert loaded.model.config._attn_implementation == "eager"
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, stock(input_ids=ids).logits)
    everything = headwise.load(str(tmp_path), device="cpu", policy="h2o:heavy=100,recent=100")
    want = stock.generate(ids, max_new_tokens=20, do_sample=False)  # 25 tokens: past the 16-token window
    assert torch.equal(everything.generate_ids(ids, max_new_tokens=20), want)
    with pytest.raises(HeadwiseError, match="soft-capping .*SDPA cannot apply.*attn_implementation: eager"):
        headwise.load(str(tmp_path), device="cpu", attn_implementation="sdpa")


@pytest.mark.slow
def test_a_fused_qkv_family_trains_with_its_own_lora_targets(tmp_path):
    """SinkLoRA on a tiny Phi-3 through the recipe path with peft.target_modules left at its default: LoRA goes to
    `qkv_proj` and `o_proj` (the default names q_proj..., which Phi-3 does not have); an explicit list is kept."""
    from safetensors import safe_open

    from headwise.recipe.loader import load_recipe
    from headwise.train.trainer import train
    from tests.conftest import write_recipe
    from tests.inference.inference_helpers import word_tokenizer

    model_dir = tmp_path / "phi3"
    family_model("phi3").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    recipe = {"model": {"name": str(model_dir)}, "method": {"name": "sinklora", "group_size": 8},
              "data": {"builder": "corpus", "max_length": 32, "num_samples": 4, "limit_documents": 4},
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "save_steps": 1}}
    final = train(load_recipe(write_recipe(tmp_path, recipe))).final_dir
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as st:
        adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in st.keys() if ".lora_" in name}
    assert adapted == {"qkv_proj", "o_proj"}
    recipe["peft"] = {"target_modules": ["q_proj"]}
    recipe["training"]["output_dir"] = str(tmp_path / "run2")
    with pytest.raises(HeadwiseError, match=r"peft.target_modules: \['q_proj'\] match no module"):
        train(load_recipe(write_recipe(tmp_path, recipe, name="explicit.yaml")))


@pytest.mark.slow
def test_the_recipe_path_refuses_sdpa_for_a_softcap_model_before_the_run_folder(tmp_path):
    """`headwise train` of the full method on a Gemma-2 with the recipe's default attention (SDPA): refused with
    the way out (eager) before the run folder exists, on every transformers version."""
    from tests.conftest import run_cli, write_recipe

    model_dir = tmp_path / "gemma2"
    family_model("gemma2").save_pretrained(model_dir)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, {"model": {"name": str(model_dir)}, "data": {"max_length": 64},
                                     "training": {"output_dir": str(run), "max_steps": 1}})
    out = run_cli("train", str(recipe))
    assert out.returncode == 2, out.stderr
    assert "gemma2 uses attention logit soft-capping (50)" in out.stderr and "attn_implementation: eager" in out.stderr
    assert not run.exists()


def test_a_training_attention_called_directly_in_eval_refuses_what_sdpa_would_drop():
    """The eval branch of a training attention function is SDPA; a direct call that carries a softcap or learned
    sinks (bypassing the model's pre-hook, which switches eval to the model's own attention) is refused."""
    from headwise.patches.sinklora.attention import sinklora_attention

    model = family_model("gemma2")
    method_for(SinkLoRAMethod(group_size=8)).prepare_model(model)
    module = attention_modules(model)[0].eval()
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(HeadwiseError, match="softcap or learned sinks, which SDPA would drop"):
        sinklora_attention(module, q, k, k, None, scaling=0.25, softcap=50.0)
