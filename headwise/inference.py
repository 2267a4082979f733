"""`headwise.load`: open any headwise export (or a plain model) ready to generate with its KV policy.

An export folder's `headwise_inference.json` says whether it holds an adapter (then the base model
is loaded, the recipe's RoPE parameters are applied, the method's extra modules are re-attached and
the adapter is loaded on top), merged weights (loaded directly) or no weights (`base`: the unchanged
base model, e.g. a DuoAttention export), which attention runs at inference and which KV-cache policy
generation uses (a `duo` policy prefills in chunks, see `prefill_in_chunks`). Any KV policy also
applies to a plain model:

    loaded = headwise.load("smollm2-135m", policy="h2o:heavy_ratio=0.1,recent_ratio=0.1")
    loaded.generate("...")                 # transformers' generate with the policy's cache
    loaded.generate("...", static=True)    # static-shape greedy decoding (CUDA graph on GPU)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headwise.inference_config import INFERENCE_CONFIG_NAME, InferenceConfig, KVPolicy  # noqa: F401 (re-exported)
from headwise.model_loading import resolve_dtype, resolve_model_source


# Prompt tokens per prefill forward for `duo` policies (`LoadedModel.generate`): streaming heads hold at most
# sink + recent + DUO_PREFILL_CHUNK tokens during prefill, and a streaming query sees at most recent + chunk
# recent tokens (training: recent). 256 keeps that window within 2x DuoAttention's recent of 256; on a GPU at
# long context a larger chunk (e.g. 4096) trades that fidelity for fewer forwards: pass `prefill_chunk=`.
DUO_PREFILL_CHUNK = 256


@torch.inference_mode()
def prefill_in_chunks(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int) -> int:
    """Run the prompt through `model` into `cache`, `chunk` tokens per forward, all but its last chunk.

    Chunks start at the prompt's beginning; the first one also takes all left padding (a headwise cache
    only accepts padding in its first forward). The last chunk (1 to `chunk` tokens) is left to `generate`,
    which runs it as one forward and continues from there, so a prompt that fits in one chunk is prefilled
    exactly as without chunking. Returns the number of tokens prefilled here.
    """
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    from headwise.static_decode import cache_kwarg, prompt_positions

    T = input_ids.shape[1]
    n_pad = int((attention_mask == 0).sum(dim=1).max())
    bounds = [min(T, n_pad + chunk)]
    while bounds[-1] < T:
        bounds.append(min(T, bounds[-1] + chunk))
    cache_kw = cache_kwarg(model)
    position_ids = prompt_positions(attention_mask)  # as generate computes them
    start = 0
    for stop in bounds[:-1]:
        model(input_ids=input_ids[:, start:stop], attention_mask=attention_mask[:, :stop],
              position_ids=position_ids[:, start:stop], use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        start = stop
    return start


@dataclass
class LoadedModel:
    """A model, its tokenizer, the export's inference config (None for a plain model) and the KV policy."""

    model: Any
    tokenizer: Any
    config: InferenceConfig | None
    policy: Any

    def make_cache(self):
        """A fresh KV cache for one `generate` call, built from the policy (None: transformers' default)."""
        from headwise.kv_cache import make_cache

        return make_cache(self.model, self.policy)

    @torch.inference_mode()
    def generate(
        self, prompt: str | list[str], *, max_new_tokens: int = 32, static: bool = False, compile: bool = False,
        **kwargs,
    ) -> str | list[str]:
        """Greedy by default; returns only the generated continuation(s).

        Several prompts run as one left-padded batch (every policy supports it). `static=True` decodes
        greedily with static shapes (`headwise.static_decode`; a CUDA graph per step on GPU).
        `compile=True` (implies `static`) also fuses the step with torch.compile before capturing it: the
        fastest decode (within 2x of the HBM bound on an H200, BENCHMARKS.md) at the price of a compilation
        of about a minute per prompt shape on a Llama-3-8B, so worth it for long generations.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        if static or compile:
            if kwargs:
                raise TypeError(f"static decoding is greedy and takes no generation options (got {', '.join(kwargs)})")
            from headwise.static_decode import StaticDecoder

            decoder = StaticDecoder(self.model, self.policy, max_new_tokens=max_new_tokens,
                                    mode="compile" if compile else "auto")
            tokens = decoder.generate(enc["input_ids"], enc["attention_mask"])
            texts = [self._until_eos(row) for row in tokens.tolist()]
        else:
            out = self.generate_ids(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, **kwargs)
            texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return texts[0] if single else texts

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     max_new_tokens: int = 32, prefill_chunk: int | None = None, **kwargs) -> torch.Tensor:
        """transformers' `generate` with the policy's cache; returns prompt + new tokens `(B, T + n)`.

        `duo` policies prefill in chunks of `prefill_chunk` tokens (default `DUO_PREFILL_CHUNK`; 0 turns
        chunking off): streaming heads then never hold more than `sink + recent + chunk` tokens, and a
        streaming head's query sees its sink + recent window plus the earlier tokens of its own chunk, as in
        DuoAttention's chunked prefill. The question at the end of a prompt is thus answered from the
        compressed cache (DuoAttention's "decoding simulation" serves the same purpose).
        """
        kwargs.setdefault("do_sample", False)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = self.make_cache()
        if cache is not None:
            from headwise.static_decode import cache_kwarg

            if self.policy.type == "duo":
                chunk = DUO_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
                if chunk:
                    prefill_in_chunks(self.model, cache, input_ids, attention_mask, chunk)
            kwargs[cache_kwarg(self.model)] = cache
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad, **kwargs)

    def _until_eos(self, ids: list[int]) -> str:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config is not None else None
        eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)


def _load_export(path: Path, config: InferenceConfig, dtype: str, device: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    torch_dtype = resolve_dtype(dtype)
    if config.weights == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    else:  # adapter, or base (the unchanged base model: DuoAttention exports)
        base = config.base_model
        src = resolve_model_source(base.name, base.gguf_file, base.revision)
        kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        if src.revision:
            kw["revision"] = src.revision
        model_config = AutoConfig.from_pretrained(src.path, **kw)
        if config.rope_parameters:
            model_config.rope_parameters = dict(config.rope_parameters)
        if config.max_position_embeddings:
            model_config.max_position_embeddings = config.max_position_embeddings
        model = AutoModelForCausalLM.from_pretrained(src.path, config=model_config, dtype=torch_dtype, **kw)
        if config.weights == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path))
    if device:
        model.to(device)
    model.eval()
    model.config.use_cache = True
    return model, tokenizer


def load(
    path_or_id: str | Path,
    *,
    policy: KVPolicy | dict | str | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> LoadedModel:
    """Load a headwise export folder, or any causal LM (Hub id, local path, alias) with a KV policy.

    `policy` overrides the export's KV policy; it works for any causal LM (H2O on a plain model). It
    may be a policy model, a dict (`{"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}`), a JSON
    string or a shorthand (`h2o:heavy_ratio=0.1,recent_ratio=0.1`); errors name the field.
    `device` defaults to `cuda` when a GPU is visible (where `dtype="auto"` picks bfloat16), else the CPU.
    """
    from headwise.inference_config import parse_kv_policy

    if device is None and torch.cuda.is_available():
        device = "cuda"
    path = Path(path_or_id)
    policy_obj = parse_kv_policy(policy) if policy is not None else None
    if (path / INFERENCE_CONFIG_NAME).is_file():
        config = InferenceConfig.read(path)
        model, tokenizer = _load_export(path, config, dtype, device)
        return _with_policy(model, tokenizer, config, policy_obj or config.kv_policy)
    if path.is_dir() and any(path.glob("adapter_config.json")):
        raise FileNotFoundError(f"{path} has an adapter but no {INFERENCE_CONFIG_NAME}; export it with `headwise export RUN_DIR`")
    from headwise.model_loading import load_model, load_tokenizer
    from headwise.recipe import ModelSection

    section = ModelSection(name=str(path_or_id), dtype=dtype)
    model = load_model(section, training=False)
    if device:
        model.to(device)
    model.eval()
    from headwise.inference_config import FullPolicy

    return _with_policy(model, load_tokenizer(section), None, policy_obj or FullPolicy())


def _with_policy(model, tokenizer, config, policy) -> LoadedModel:
    """Check the policy against the model now (Duo mask shape, attention layer types), not at generate."""
    if policy.type != "full":
        from headwise.kv_cache import check_policy

        check_policy(model, policy)
    return LoadedModel(model, tokenizer, config, policy)
