"""Helpers for tests/inference: tiny random models (Llama, Qwen2, Qwen3, Mistral, Phi-3 with GQA) and a word-level tokenizer, all offline."""

from __future__ import annotations

import torch

VOCAB = 128


def tiny_model(arch: str = "llama", *, seed: int = 0, init: float = 0.2):
    """A 2-layer causal LM with 4 query heads over 2 KV heads, fp32, eval mode, SDPA attention.

    `init` (initializer_range) is larger than the default so attention is peaked: the H2O top-k then has
    clear winners and kept sets compare exactly between implementations.
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=1024, initializer_range=init, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, attn_implementation="sdpa")
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
           "phi3": (Phi3Config, Phi3ForCausalLM)}[arch]
    extra = {"sliding_window": None} if arch in ("mistral", "qwen2") else {"head_dim": 16} if arch == "qwen3" else {}
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common, **extra)).eval()
    model.generation_config.eos_token_id = None  # random weights: generate a fixed number of tokens
    return model


def word_tokenizer():
    """Words `w3` .. `w127` map to ids 3..127; `<pad>`=0, `<s>`=1, `</s>`=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)

