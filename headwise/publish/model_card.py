"""The model card (`README.md`) of an export: Hub metadata front matter + a body people can act on.

Metadata: base_model, library_name (`peft` for adapters, `transformers` for merged weights), tags,
datasets, pipeline_tag. Body: what was trained and how (the recipe), the training summary, any
evaluation results found beside the run, and how to load the folder with plain transformers/peft
and with headwise. No token or local secret ever goes in here: the card is built from the recipe
and the run summary only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from headwise.inference.config import InferenceConfig
from headwise.models import resolve_model_source

logger = logging.getLogger(__name__)

METHOD_BLURBS = {
    "full": "dense attention with LoRA (the baseline every head-wise method is compared against)",
    "duo": "DuoAttention: one learned gate per (layer, KV head) splits the heads into retrieval heads, which keep "
    "the whole KV cache, and streaming heads, which keep only sink + recent tokens; the model weights are "
    "unchanged, this folder holds the head pattern (`duo_attention/full_attention_heads.tsv`, DuoAttention's own "
    "format) and the `duo` KV policy",
}


def _loss_line(summary: dict[str, Any]) -> str:
    history = summary.get("log_history")
    losses = [h["loss"] for h in history if isinstance(h, dict) and isinstance(h.get("loss"), (int, float))] \
        if isinstance(history, list) else []
    if not losses:
        return ""
    return f"- training loss: {losses[0]:.3f} (first logged) -> {losses[-1]:.3f} (last logged)\n"


def _results_section(run_dir: Path | None) -> str:
    if run_dir is None:
        return "No evaluation has been run for this export yet (`headwise eval`)."
    rows, skipped = [], []
    for f in sorted(run_dir.glob("eval*/results.json")):
        try:
            results = json.loads(f.read_bytes().decode("utf-8"))
            if not isinstance(results, dict):
                raise ValueError(f"it holds a {type(results).__name__}, not a JSON object")
        except (OSError, ValueError) as e:  # ValueError covers UnicodeDecodeError and JSONDecodeError
            logger.warning("skipping %s: it is not readable (%s); the model card leaves its results out", f,
                           str(e).splitlines()[0])
            skipped.append(f"{f.parent.name}/{f.name}")
            continue
        rows.extend(f"| {f.parent.name} | {k} | {v} |" for k, v in results.items())
    note = (f"\n\n{', '.join(skipped)} could not be read when this card was written; its results are left out."
            if skipped else "")
    if not rows:
        return "No evaluation has been run for this export yet (`headwise eval`)." + note
    return "| evaluation | metric | value |\n|---|---|---|\n" + "\n".join(rows) + note


def _data_line(recipe) -> str:
    hay = getattr(recipe.method, "haystack", None)
    if hay is not None:  # DuoAttention trains on its own passkey haystacks, not on `data:`
        return (f"multi-passkey haystacks ({hay.num_samples} samples, {hay.min_tokens}-{hay.max_tokens} tokens, "
                f"{hay.n_keys} keys of {hay.key_format}, {hay.filler} filler), loss over `{hay.label_span}`")
    d = recipe.data
    return (f"`{d.builder}` ({d.dataset or ', '.join(d.files or []) or d.corpus}), {d.max_length} tokens per sample, "
            f"packing {'on' if d.packing else 'off'}")


def write_model_card(
    folder: Path, recipe, inference: InferenceConfig, summary: dict[str, Any] | None, *, run_dir: Path | None = None
) -> Path:
    """Write `README.md` into `folder`. `summary` is the run's training summary: {} when there is none, None when
    it could not be read (the card then says so instead of giving steps and losses)."""
    summary_note = ""
    if summary is None:
        summary = {}
        summary_note = "- the training summary (run_summary.json) could not be read when this card was written\n"
    src = resolve_model_source(recipe.model.name, recipe.model.gguf_file, recipe.model.revision)
    base_id = src.hub_id or recipe.model.name
    datasets = [recipe.data.dataset] if recipe.data.dataset else None
    data = ModelCardData(
        base_model=base_id,
        library_name="peft" if inference.weights == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=["headwise", recipe.method.name,
              "lora" if recipe.peft.type == "lora" else ("kv-cache-policy" if inference.weights == "base" else "full-finetune")],
        datasets=datasets,
    )
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json", exclude={"export": {"hub"}}), sort_keys=False)
    steps = summary.get("global_step", "?")
    gguf = f', gguf_file="{recipe.model.gguf_file or src.gguf_file}"' if src.gguf_file else ""
    if inference.weights == "adapter":
        plain = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_id}"{gguf if not src.hub_id else ""})\n'
            'model = PeftModel.from_pretrained(base, "<this repo or folder>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")'
        )
    elif inference.weights == "base":
        plain = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "# the weights are the unchanged base model; this folder adds the KV policy (headwise_inference.json)\n"
            f'model = AutoModelForCausalLM.from_pretrained("{base_id}"{gguf if not src.hub_id else ""})\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")'
        )
    else:
        plain = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("<this repo or folder>")\n'
            'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")'
        )
    rope_note = ""
    if inference.rope_parameters and inference.weights == "adapter":
        rope_note = (
            "\nThe model was trained with extended RoPE: set `config.rope_parameters = "
            f"{json.dumps(inference.rope_parameters)}` and `max_position_embeddings = {inference.max_position_embeddings}` "
            "on the base config before loading the adapter (`headwise.load` does this for you).\n"
        )
    body = f"""
# {base_id.rsplit('/', 1)[-1]} + {recipe.method.name} (headwise)

Fine-tuned from `{base_id}` with [headwise](https://pypi.org/project/headwise/): {METHOD_BLURBS.get(recipe.method.name, recipe.method.name)}.
{recipe.description}

## Training

- method: `{recipe.method.name}`; weights in this folder: **{inference.weights}**
- data: {_data_line(recipe)}
- steps: {steps}; world size {summary.get('world_size', 1)}
{_loss_line(summary)}{summary_note}- inference: attention `{inference.attention.name}`, KV policy `{inference.kv_policy.type}`

## Results

{_results_section(run_dir)}

## How to load

With plain transformers / peft:

```python
{plain}
```
{rope_note}
With headwise (applies the attention and KV policy of `headwise_inference.json`):

```python
import headwise
loaded = headwise.load("<this repo or folder>")
print(loaded.generate("The capital of France is", max_new_tokens=20))
```

## Recipe

```yaml
{recipe_yaml}```
"""
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)
    path = folder / "README.md"
    card.save(str(path))
    return path
