"""MoH runs export and load back as the model they trained (issue 21, point 3).

`headwise export` of a moh run writes the `moh` attention entry (router, shares, and the head split they give on
the model: written here by hand), the learned routers travel (in the adapter, or beside merged weights in
`moh_routers.safetensors`), and `headwise.load` gives back the trained model: its logits equal the in-memory
model's, greedy decoding with the KV cache equals a greedy loop of full forwards without a cache, and it is MoH
(the same weights through plain SDPA give other logits); static decoding gives the same tokens, and at decode the
fused kernel skips the KV groups a kv_group router leaves out. What cannot run MoH's gates (eager attention), what
is not built for MoH (an evicting KV policy) and damaged exports are refused with a clear error, never run dense.

The tiny Llama of conftest (4 query heads over 2 KV heads, 2 layers), trained two steps, on the CPU in fp32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import headwise
from headwise.errors import HeadwiseError
from headwise.inference.static_decode import StaticDecoder
from headwise.recipe.loader import load_recipe
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

# The method blocks, and by hand the split each gives on 4 query heads over 2 KV heads:
# query_norm / learned at 0.75 and 0.5: round(4 * 0.5) = 2 shared heads, round(4 * 0.75) - 2 = 1 of the other 2;
# kv_group at 0.5 and 0: units are the 2 KV groups, none shared, round(2 * 0.5) = 1 of the 2 routed.
METHODS = {
    "query_norm": {"router": "query_norm", "activation": 0.75, "shared": 0.5},
    "learned": {"router": "learned", "activation": 0.75, "shared": 0.5},
    "kv_group": {"router": "kv_group", "activation": 0.5, "shared": 0.0},
}
HEADS = {
    "query_norm": {"query_heads": 4, "kv_heads": 2, "unit": "head", "shared": 2, "routed": 2, "active_routed": 1},
    "learned": {"query_heads": 4, "kv_heads": 2, "unit": "head", "shared": 2, "routed": 2, "active_routed": 1},
    "kv_group": {"query_heads": 4, "kv_heads": 2, "unit": "kv_group", "shared": 0, "routed": 2, "active_routed": 1},
}
ROUTERS_FILE = "moh_routers.safetensors"
ROUTER = "moh_router"
# A run without LoRA saves full weights (the routers among them) and exports merged weights only.
FULL_WEIGHTS = {"peft": {"type": "none", "trainable_modules": ["o_proj"]}, "export": {"format": "merged"}}


@dataclass
class Run:
    folder: Path  # the run folder (final adapter, recipe)
    model: torch.nn.Module  # the trained model in memory (PEFT-wrapped), eval mode


def _train(root: Path, model_dir: Path, router: str, lora: bool) -> Run:
    from headwise.train.trainer import train

    recipe = tiny_recipe(model_dir, root / "run", max_steps=2, save_steps=2, learning_rate=1e-2)
    recipe["method"] = {"name": "moh", **METHODS[router]}
    if not lora:
        recipe.update(FULL_WEIGHTS)
    model = train(load_recipe(write_recipe(root, recipe))).model.eval()
    if router == "learned" and lora:
        # Routers far from their zero start (two steps barely move them), so that routers reloaded wrong, or not
        # at all, change the outputs; the run's final adapter is saved again from the model, as the trainer does.
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ROUTER in name and p.requires_grad:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(str(root / "run" / "final"))
    return Run(root / "run", model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """`runs(router, lora)`: the tiny model trained with that method block, with LoRA or without (full weights),
    once per module."""
    trained: dict[tuple[str, bool], Run] = {}

    def get(router: str, lora: bool = True) -> Run:
        if (router, lora) not in trained:
            root = tmp_path_factory.mktemp(f"moh-{router}-{'lora' if lora else 'full'}")
            trained[router, lora] = _train(root, tiny_model_dir, router, lora)
        return trained[router, lora]

    return get


@pytest.fixture(scope="module")
def learned_exports(runs, tmp_path_factory) -> dict[str, Path]:
    """The learned run exported as an adapter and as merged weights (tests copy them before changing them)."""
    from headwise.publish.export import export_run

    root = tmp_path_factory.mktemp("moh-learned-exports")
    return {fmt: export_run(runs("learned").folder, out_dir=root / fmt, format=fmt) for fmt in ("adapter", "merged")}


def _copy(export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export, tmp_path / export.name))


def _prompt() -> torch.Tensor:
    return torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))


def _greedy_without_cache(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference decoding: each step a full forward over prompt + tokens so far, no cache, argmax."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


def _dense_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The same weights through the model's plain SDPA attention (no head gates)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    moh = base.config._attn_implementation
    base.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        base.config._attn_implementation = moh


def _routers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The router weights a model computes with, by module path in the base model (PEFT's wrapping left out)."""
    found = {}
    for name, p in model.named_parameters():
        if ROUTER not in name or ".original_module." in name:
            continue
        found[name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")] = p.detach()
    return found


@pytest.mark.parametrize("router,fmt,lora", [
    ("query_norm", "adapter", True), ("query_norm", "merged", True), ("learned", "adapter", True),
    ("learned", "merged", True), ("learned", "merged", False), ("kv_group", "adapter", True),
])
def test_the_export_loads_back_the_trained_moh_model(runs, tmp_path, router, fmt, lora):
    from headwise.publish.export import export_run

    run = runs(router, lora)
    out = export_run(run.folder, out_dir=tmp_path / "export", format=fmt)
    entry = json.loads((out / "headwise_inference.json").read_text())["attention"]
    assert entry == {"name": "moh", **METHODS[router], "heads": HEADS[router]}
    assert (out / ROUTERS_FILE).is_file() == (router == "learned" and fmt == "merged")

    loaded = headwise.load(out, dtype="float32", device="cpu")
    ids = _prompt()
    with torch.no_grad():
        want = run.model(input_ids=ids, use_cache=False).logits
        got = loaded.model(input_ids=ids, use_cache=False).logits
    # an adapter reloads the same weights and ops; merged weights hold LoRA folded in (fp32 rounding)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - _dense_logits(loaded.model, ids)).abs().max() > 1e-2  # MoH's gates, not the dense model
    if router == "learned":
        trained, reloaded = _routers(run.model), _routers(loaded.model)
        assert len(trained) == 2 * 3 and sorted(reloaded) == sorted(trained)  # W_s, W_r, W_h per layer
        assert all(value.abs().max() > 1e-3 for value in trained.values())  # off their zero start
        for name, value in trained.items():
            torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0)

    # generate() decodes with transformers' DynamicCache (keys longer than the query from the second token on)
    decoded = loaded.generate_ids(ids, max_new_tokens=8)
    assert decoded.shape == (2, ids.shape[1] + 8)
    assert torch.equal(decoded, _greedy_without_cache(run.model, ids, 8))
    # static decoding runs headwise's cache and attention, which apply MoH's gates too
    static = StaticDecoder(loaded.model, loaded.policy, max_new_tokens=8, mode="eager").generate(ids)
    assert torch.equal(static, decoded[:, ids.shape[1]:])


def test_decode_skips_the_kv_heads_the_router_leaves_out(runs, tmp_path, monkeypatch):
    """kv_group at 50% on 2 KV groups: each decode token uses one group. The fused decode kernel (Triton's
    interpreter here) gets the router's choice and reads no K/V of the other group; the tokens equal those of the
    greedy loop without a cache."""
    from headwise.kernels import decode_attention as kernel
    from headwise.publish.export import export_run

    run = runs("kv_group")
    loaded = headwise.load(export_run(run.folder, out_dir=tmp_path / "export"), dtype="float32", device="cpu")
    seen = []
    original = kernel.decode_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("head_active"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "decode_attention", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids = _prompt()
    static = StaticDecoder(loaded.model, loaded.policy, max_new_tokens=6, mode="eager").generate(ids)
    assert torch.equal(static, _greedy_without_cache(run.model, ids, 6)[:, ids.shape[1]:])
    # 5 decode steps (the first token comes from the prompt) x 2 layers, each with one of the 2 groups per row
    assert len(seen) == 10 and all(a is not None and a.shape == (2, 2) for a in seen)
    assert all(torch.equal(a.sum(dim=1), torch.ones(2, dtype=torch.long)) for a in seen)


def test_a_left_padded_batch_decodes_each_prompt_as_alone(learned_exports):
    """Padding reaches MoH's SDPA through transformers' mask, and each token's gates are its own: a batch of two
    prompts of different lengths generates what each prompt generates alone."""
    loaded = headwise.load(learned_exports["adapter"], dtype="float32", device="cpu")
    prompts = ["The quick brown fox jumps over the lazy dog and runs", "Once upon a time"]
    together = loaded.generate(prompts, max_new_tokens=8)
    assert together == [loaded.generate(p, max_new_tokens=8) for p in prompts]


def test_push_accepts_the_exports_and_uploads_the_routers(learned_exports):
    """`headwise push` checks an adapter against the base model with the export's attention applied (its router
    tensors are the adapter's, not foreign ones) and uploads a merged export's routers file."""
    from headwise.publish.hub import check_export_folder

    assert "adapter_model.safetensors" in check_export_folder(learned_exports["adapter"])
    assert ROUTERS_FILE in check_export_folder(learned_exports["merged"])


def test_a_merged_export_without_its_routers_file_is_refused(learned_exports, tmp_path):
    out = _copy(learned_exports["merged"], tmp_path)
    (out / ROUTERS_FILE).unlink()
    with pytest.raises(HeadwiseError, match=f"{ROUTERS_FILE} is missing: it holds this merged moh export's learned "
                                            "routers"):
        headwise.load(out, dtype="float32", device="cpu")


def test_a_cut_routers_file_is_refused(learned_exports, tmp_path):
    out = _copy(learned_exports["merged"], tmp_path)
    data = (out / ROUTERS_FILE).read_bytes()
    (out / ROUTERS_FILE).write_bytes(data[: len(data) - 40])
    with pytest.raises(HeadwiseError, match=f"{ROUTERS_FILE} is damaged or cut short"):
        headwise.load(out, dtype="float32", device="cpu")


def test_a_routers_file_that_does_not_fit_the_model_is_refused(learned_exports, tmp_path):
    out = _copy(learned_exports["merged"], tmp_path)
    routers = load_file(str(out / ROUTERS_FILE))
    assert len(routers) == 6 and all(k.startswith("model.layers.") and f".self_attn.{ROUTER}." in k for k in routers)
    dropped = dict(routers)
    dropped.pop("model.layers.1.self_attn.moh_router.balance.weight")
    save_file(dropped, str(out / ROUTERS_FILE))
    with pytest.raises(HeadwiseError, match="lacks 1 of the model's 6 learned router tensors, e.g. "
                                            r"model\.layers\.1\.self_attn\.moh_router\.balance\.weight"):
        headwise.load(out, dtype="float32", device="cpu")
    wrong = dict(routers)
    wrong["model.layers.0.self_attn.moh_router.routed.weight"] = torch.zeros(3, 64)
    save_file(wrong, str(out / ROUTERS_FILE))
    with pytest.raises(HeadwiseError, match=r"wrong shape, e\.g\. model\.layers\.0\.self_attn\.moh_router\.routed"
                                            r"\.weight \[3, 64\] \(expected \[2, 64\]\)"):
        headwise.load(out, dtype="float32", device="cpu")


def test_an_adapter_without_its_routers_is_refused(learned_exports, tmp_path):
    """PEFT would load an adapter lacking the routers and leave them at zero without a word."""
    out = _copy(learned_exports["adapter"], tmp_path)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    kept = {name: t for name, t in tensors.items() if ROUTER not in name}
    assert len(tensors) - len(kept) == 6
    save_file(kept, str(out / "adapter_model.safetensors"))
    with pytest.raises(HeadwiseError, match="lacks 6 of the model's 6 learned router tensors"):
        headwise.load(out, dtype="float32", device="cpu")


def _edit_inference_config(out: Path, change) -> None:
    path = out / "headwise_inference.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_a_head_split_that_does_not_fit_the_model_is_refused(learned_exports, tmp_path):
    out = _copy(learned_exports["adapter"], tmp_path)
    _edit_inference_config(out, lambda c: c["attention"]["heads"].update(shared=3, routed=1))
    with pytest.raises(HeadwiseError, match=r"attention\.heads does not fit LlamaForCausalLM \(llama\): shared 3 "
                                            r"\(this model: 2\), routed 1 \(this model: 2\)"):
        headwise.load(out, dtype="float32", device="cpu")


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(router="top_p"), r"attention\.router: Input should be 'query_norm', 'learned' or 'kv_group'"),
    (lambda a: a.update(activation=1.5), r"attention\.activation: Input should be less than or equal to 1"),
    (lambda a: a.update(shared=0.9), r"attention: shared \(0\.9\) exceeds activation \(0\.75\)"),
    (lambda a: a.pop("heads"), r"attention\.heads: Field required"),
    (lambda a: a.update(balance_weight=0.01), r"attention\.balance_weight: Extra inputs are not permitted"),
])
def test_a_bad_moh_entry_names_the_field(learned_exports, tmp_path, change, message):
    out = _copy(learned_exports["adapter"], tmp_path)
    _edit_inference_config(out, lambda c: change(c["attention"]))
    with pytest.raises(HeadwiseError, match=message):
        headwise.load(out, dtype="float32", device="cpu")


def test_what_would_run_the_dense_model_is_refused(learned_exports, tmp_path):
    """Eager runs the model's own attention (without MoH's gates) and the evicting caches are not built for MoH:
    each is refused with the way out rather than decoding with another model."""
    export = learned_exports["adapter"]
    with pytest.raises(HeadwiseError, match="kv_policy h2o on the moh export .*leaves out, and are not built for "
                                            "moh; load it with policy full"):
        headwise.load(export, dtype="float32", device="cpu", policy="h2o:heavy_ratio=0.1,recent_ratio=0.1")
    with pytest.raises(HeadwiseError, match="attn_implementation eager on the moh export"):
        headwise.load(export, dtype="float32", device="cpu", attn_implementation="eager")
    out = _copy(export, tmp_path)
    _edit_inference_config(out, lambda c: c.update(kv_policy={"type": "streaming", "sink": 4, "recent": 64}))
    with pytest.raises(HeadwiseError, match="kv_policy streaming on the moh export"):
        headwise.load(out, dtype="float32", device="cpu")


def test_a_moh_recipe_exporting_an_evicting_kv_policy_is_refused_before_training():
    with pytest.raises(HeadwiseError, match="export.kv_policy h2o with method moh: the evicting caches .*not built "
                                            "for moh; set export.kv_policy: full"):
        load_recipe("moh-smollm2", ["export.kv_policy.type=h2o", "export.kv_policy.heavy_ratio=0.1",
                                    "export.kv_policy.recent_ratio=0.1"])
