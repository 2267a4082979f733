"""`headwise.load`: open any headwise export (or a plain model) ready to generate with its KV policy.

An export folder's `headwise_inference.json` says whether it holds an adapter (then the base model
is loaded, the recipe's RoPE parameters are applied, the method's extra modules are re-attached and
the adapter is loaded on top), merged weights (loaded directly) or no weights (`base`: the unchanged
base model, e.g. a DuoAttention export), which attention runs at inference (a `moh` export: the MoH patch,
applied before the adapter loads, see `headwise.inference.method_attention`) and which KV-cache policy
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from headwise.errors import HeadwiseError
from headwise.inference.cache import check_policy, make_cache
from headwise.inference.config import (  # noqa: F401 (KVPolicy re-exported)
    ADAPTER_WEIGHTS_NAME,
    INFERENCE_CONFIG_NAME,
    FullPolicy,
    InferenceConfig,
    KVPolicy,
    adapter_problem,
    check_weight_files,
    parse_kv_policy,
)
from headwise.inference.method_attention import apply_attention, check_adapter_routers, load_merged_routers
from headwise.inference.prefill import DUO_PREFILL_CHUNK, cache_kwarg, prefill_in_chunks
from headwise.inference.static_decode import StaticDecoder
from headwise.models import (
    NO_HUB_KERNELS,
    default_attention,
    load_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_source,
)
from headwise.recipe.schema import ModelSection
from headwise.train.run_dir import RECIPE_FILE, read_run_recipe

# What `load(dtype=...)` accepts, as `--dtype` of the CLI: `auto` is bfloat16 on a GPU that has it, else float32.
DTYPES = ("auto", "float32", "bfloat16", "float16")
# What `load(attn_implementation=...)` accepts, as `--attn-implementation` of the CLI (None: the family's default).
ATTENTION_IMPLEMENTATIONS = (None, "sdpa", "eager")


def check_prompts(prompt: Any) -> list[str]:
    """The prompts of a `generate` call as a list; an empty or whitespace-only prompt is a `HeadwiseError`.

    The model needs at least one token to continue from: an empty prompt would otherwise fail deep inside the
    attention forward with a reshape error.
    """
    if isinstance(prompt, str):
        prompts, names = [prompt], ["prompt"]
    elif isinstance(prompt, (list, tuple)) and prompt:
        prompts, names = list(prompt), [f"prompt[{i}]" for i in range(len(prompt))]
    elif isinstance(prompt, (list, tuple)):
        raise HeadwiseError("prompt is an empty list: give a prompt string or a non-empty list of them")
    else:
        raise HeadwiseError(f"prompt is {type(prompt).__name__}, not a string: give a string or a list of strings")
    for name, text in zip(names, prompts):
        if not isinstance(text, str):
            raise HeadwiseError(f"{name} is {type(text).__name__}, not a string: give the text to continue")
        if not text.strip():
            raise HeadwiseError(f"{name} is {'empty' if not text else 'only whitespace'}: give the text to continue")
    return prompts


def check_max_new_tokens(max_new_tokens: Any) -> int:
    """`max_new_tokens` if it is a whole number >= 1, else a `HeadwiseError` with the accepted range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HeadwiseError(f"max_new_tokens {max_new_tokens!r}: give a whole number of tokens to generate, 1 or more")
    return max_new_tokens


def check_device(device: str | None) -> str | None:
    """`device` if torch knows it and it is present here, else a `HeadwiseError` naming what to use instead."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise HeadwiseError(f"device {device!r} is not a device name: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise HeadwiseError(f"device {device!r}: no CUDA GPU is visible to this torch ({torch.__version__}); "
                                "use cpu, or leave the device out")
        if parsed.index is not None and parsed.index >= count:
            raise HeadwiseError(f"device {device!r}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise HeadwiseError(f"device {device!r}: MPS is not available here; use cpu, or leave the device out")
    return device


@dataclass
class LoadedModel:
    """A model, its tokenizer, the export's inference config (None for a plain model) and the KV policy."""

    model: Any
    tokenizer: Any
    config: InferenceConfig | None
    policy: Any

    def make_cache(self):
        """A fresh KV cache for one `generate` call, built from the policy (None: transformers' default)."""
        return make_cache(self.model, self.policy)

    @torch.inference_mode()
    def generate(
        self, prompt: str | list[str], *, max_new_tokens: int = 32, static: bool = False, compile: bool = False,
        **kwargs,
    ) -> str | list[str]:
        """Greedy by default; returns only the generated continuation(s).

        Several prompts run as one left-padded batch (every policy supports it). `static=True` decodes
        greedily with static shapes (`headwise.inference.static_decode`; a CUDA graph per step on GPU).
        `compile=True` (implies `static`) also fuses the step with torch.compile before capturing it: the
        fastest decode (within 2x of the HBM bound on an H200, docs/benchmarks.md) at the price of a compilation
        of about a minute per prompt shape on a Llama-3-8B, so worth it for long generations.
        """
        single = isinstance(prompt, str)
        prompts = check_prompts(prompt)
        check_max_new_tokens(max_new_tokens)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        empty = [i for i, n in enumerate(enc["attention_mask"].sum(dim=1).tolist()) if n == 0]
        if empty:  # e.g. text the tokenizer drops entirely; the model needs a token to continue from
            name = "prompt" if single else f"prompt[{empty[0]}]"
            raise HeadwiseError(f"{name} {prompts[empty[0]]!r} gives no tokens with this tokenizer: give other text")
        if static or compile:
            if kwargs:
                raise TypeError(f"static decoding is greedy and takes no generation options (got {', '.join(kwargs)})")
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
        check_max_new_tokens(max_new_tokens)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise HeadwiseError(
                f"input_ids of shape {tuple(input_ids.shape)}: give (batch, tokens) with at least one token")
        kwargs.setdefault("do_sample", False)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = self.make_cache()
        if cache is not None:
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


def _load_export(path: Path, config: InferenceConfig, dtype: str, device: str | None, attn_implementation: str | None):
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    torch_dtype = resolve_dtype(dtype)
    if config.weights == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, attn_implementation=attn_implementation,
                                                     **NO_HUB_KERNELS)
        apply_attention(model, config.attention, path / INFERENCE_CONFIG_NAME)
        load_merged_routers(model, path)
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
        if config.weights == "adapter":
            problem = adapter_problem(path, model_config)  # on the base model with the export's attention applied
            if problem:
                raise HeadwiseError(f"{problem}; re-export the run (`headwise export RUN_DIR --overwrite`)")
        model = AutoModelForCausalLM.from_pretrained(src.path, config=model_config, dtype=torch_dtype,
                                                     attn_implementation=attn_implementation, **NO_HUB_KERNELS, **kw)
        # before the adapter: the modules it fills (MoH's learned routers, in its modules_to_save) must be there
        apply_attention(model, config.attention, path / INFERENCE_CONFIG_NAME)
        if config.weights == "adapter":
            from peft import PeftModel  # heavy: only for exports that hold an adapter

            check_adapter_routers(model, path / ADAPTER_WEIGHTS_NAME)
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
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a headwise export folder, or any causal LM (Hub id, local path, alias) with a KV policy.

    `policy` overrides the export's KV policy; it works for any causal LM (H2O on a plain model). It
    may be a policy model, a dict (`{"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}`), a JSON
    string or a shorthand (`h2o:heavy_ratio=0.1,recent_ratio=0.1`); errors name the field.
    `device` defaults to `cuda` when a GPU is visible (where `dtype="auto"` picks bfloat16), else the CPU.
    `attn_implementation` (`sdpa`, `eager`) is the model's own attention; None: the family's default, SDPA where
    transformers implements it for the family, else eager (Gemma-2, whose logit softcap SDPA cannot apply).
    A bad argument (path, dtype, device, policy) or a damaged export (its inference config, a weights file cut
    short) is a `HeadwiseError` naming it, raised before any weights load.
    """
    if dtype not in DTYPES:
        raise HeadwiseError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise HeadwiseError(f"attn_implementation {attn_implementation!r} is not one of "
                            f"{', '.join(map(str, ATTENTION_IMPLEMENTATIONS))}")
    device = check_device(device)
    if device is None and torch.cuda.is_available():
        device = "cuda"
    check_model_path(path_or_id)
    path = Path(path_or_id)
    policy_obj = parse_kv_policy(policy) if policy is not None else None
    if (path / INFERENCE_CONFIG_NAME).is_file():
        config = InferenceConfig.read(path)
        check_weight_files(path)
        check_attention_options(config, policy_obj or config.kv_policy, attn_implementation, path)
        model, tokenizer = _load_export(path, config, dtype, device, attn_implementation)
        return _with_policy(model, tokenizer, config, policy_obj or config.kv_policy)
    _refuse_run_folder(path)
    if path.is_dir() and any(path.glob("adapter_config.json")):
        raise FileNotFoundError(f"{path} has an adapter but no {INFERENCE_CONFIG_NAME}; export it with `headwise export RUN_DIR`")
    section = ModelSection(name=str(path_or_id), dtype=dtype)
    section.attn_implementation = attn_implementation or default_attention(load_config(section))
    model = load_model(section, training=False)
    if device:
        model.to(device)
    model.eval()
    return _with_policy(model, load_tokenizer(section), None, policy_obj or FullPolicy())


def check_model_path(path_or_id: str | Path) -> None:
    """Refuse, before anything loads, what can be neither a model folder nor a model name.

    A Hub id (`owner/name`) or an alias does not exist on disk, so only what is written as a path (absolute, or
    starting with `.`) must exist; anything else is left to the model loader, which knows the aliases.
    """
    text = str(path_or_id)
    what = "give an export folder, a saved model folder, a Hub id (owner/name) or an alias (smollm2-135m)"
    if not text.strip():
        raise HeadwiseError(f"the model path is empty; {what}")
    path = Path(text)
    if path.is_file():
        raise HeadwiseError(f"{path} is a file, not a model folder; {what}")
    if not path.exists() and (path.is_absolute() or text.startswith(".")):
        raise HeadwiseError(f"{path} does not exist; {what}")


def check_attention_options(config: InferenceConfig, policy: Any, attn_implementation: str | None,
                            path: Path) -> None:
    """Refuse, before any weights load, what cannot run an export's own attention: a `moh` export gates each head's
    output per token inside its attention function, which the eager attention does not apply (it would generate
    with the dense model), and the evicting caches (streaming, h2o, duo) are not built for it: they choose the tokens
    they keep over every head, also the ones the router leaves out. The full policy, static decoding included,
    runs MoH's gates (`headwise.inference.attention`)."""
    if config.attention.name != "moh":
        return
    if policy.type != "full":
        raise HeadwiseError(f"kv_policy {policy.type} on the moh export {path}: the evicting caches choose the tokens "
                            "they keep over every head, also the ones MoH's router leaves out, and are not built for "
                            "moh; load it with policy full (the export's own)")
    if attn_implementation == "eager":
        raise HeadwiseError(f"attn_implementation eager on the moh export {path}: MoH runs its own attention (SDPA, "
                            "then the router's per-token gates); leave attn_implementation out or give sdpa")


def _refuse_run_folder(path: Path) -> None:
    """A training run folder holds checkpoints, not a loadable model: name its export (or how to make one)."""
    if not (path.is_dir() and (path / RECIPE_FILE).is_file()):
        return
    try:
        export = read_run_recipe(path).export_dir(path)
    except HeadwiseError:
        export = path / "export"
    if (export / INFERENCE_CONFIG_NAME).is_file():
        raise HeadwiseError(f"{path} is a training run folder, not an export: load its export {export} "
                            f"(e.g. `headwise generate {export} PROMPT`)")
    raise HeadwiseError(f"{path} is a training run folder without an export: run `headwise export {path}` first, "
                        f"then load {export}")


def _with_policy(model, tokenizer, config, policy) -> LoadedModel:
    """Check the policy against the model now (Duo mask shape, attention layer types), not at generate."""
    if policy.type != "full":
        check_policy(model, policy)
    return LoadedModel(model, tokenizer, config, policy)
