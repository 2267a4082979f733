"""Tiny random-weight models of the transformers families headwise meets, and what their attention adds to plain
causal softmax attention (written from the configs built here, independent of headwise's reader)."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
WINDOW = 16  # the sliding window every windowed family gets here

# family -> (config class, extra config, expected windows per layer, softcap, learned sinks, projections)
FAMILIES = {
    "llama": ("LlamaConfig", {}, (None, None), None, False, "separate"),
    "qwen2": ("Qwen2Config", {}, (None, None), None, False, "separate"),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, (None, None), None, False, "separate"),
    "mistral": ("MistralConfig", {"sliding_window": None}, (None, None), None, False, "separate"),
    "mistral-window": ("MistralConfig", {"sliding_window": WINDOW}, (WINDOW, WINDOW), None, False, "separate"),
    "qwen2-window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
                     (None, WINDOW), None, False, "separate"),
    "gemma2": ("Gemma2Config", {"sliding_window": WINDOW, "head_dim": 16, "attn_logit_softcapping": 50.0,
                                "layer_types": ["sliding_attention", "full_attention"]}, (WINDOW, None), 50.0, False,
               "separate"),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": WINDOW, "head_dim": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}, (WINDOW, None), None,
               False, "separate"),
    "gpt_oss": ("GptOssConfig", {"sliding_window": WINDOW, "head_dim": 16, "num_local_experts": 2,
                                 "num_experts_per_tok": 1, "layer_types": ["sliding_attention", "full_attention"]},
                (WINDOW, None), None, True, "separate"),
    "phi3": ("Phi3Config", {"pad_token_id": 0}, (None, None), None, False, "fused"),
}
# Families that normalise each head's query (q_norm in their attention modules).
QUERY_NORM = ("qwen3", "gemma3")
# Refusals a method makes for its own reasons, per family: MoH's query-norm router ranks heads by a norm that a
# per-head q_norm fixes.
OWN_REFUSALS: dict[str, dict[str, str]] = {"moh": {family: "query normalisation (q_norm)" for family in QUERY_NORM}}
# Families whose attention is plain causal softmax attention (every method and policy must match the reference).
EXACT = ("llama", "mistral", "qwen2", "qwen3")


def family_config(family: str):
    cls_name, extra, *_ = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**TINY, **extra})


def family_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = family_config(family)
    config.initializer_range = 0.2  # weights large enough that attention patterns differ visibly between rules
    # A softcap needs the family's eager attention: transformers 5.17 still gives Gemma-2 SDPA by default, which
    # drops the cap (5.24 gives eager); headwise picks eager for it the same way (headwise.models).
    kw = {"attn_implementation": "eager"} if FAMILIES[family][3] else {}
    return transformers.AutoModelForCausalLM.from_config(config, **kw).to(dtype).eval()
