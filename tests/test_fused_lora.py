"""The fused LoRA forward (one in-place GEMM adds the adapter) equals PEFT's own forward, in outputs and
in every gradient, and hands every case it does not cover back to PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.fused_lora import fuse_lora_forward


def _lora_model(dropout: float = 0.0, **lora_kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg).double()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **lora_kw))
    for n, p in model.named_parameters():  # B starts at zero; move it so the adapters contribute
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    return model


def _count_peft_calls(model) -> list:
    """Wrap each fused module's saved PEFT forward so calls that fall back to it are counted."""
    from headwise.fused_lora import _ORIGINAL

    calls = []
    for m in model.modules():
        if hasattr(m, _ORIGINAL):
            orig = getattr(m, _ORIGINAL)
            setattr(m, _ORIGINAL, lambda *a, _orig=orig, **k: (calls.append(1), _orig(*a, **k))[1])
    return calls


def _loss_and_grads(model, ids, checkpointing: bool = False):
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return loss, dict(zip([n for n, _ in named], grads))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_fused_forward_equals_peft(checkpointing):
    peft_model = _lora_model()
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_forward(fused) == 8  # q, k, v, o in 2 layers
    assert fuse_lora_forward(fused) == 0  # idempotent
    ids = torch.randint(0, 100, (2, 23))
    fallbacks = _count_peft_calls(fused)
    ref_loss, ref_grads = _loss_and_grads(peft_model, ids, checkpointing)
    loss, grads = _loss_and_grads(fused, ids, checkpointing)
    assert not fallbacks  # every call took the fused path
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12)


def test_uncovered_cases_run_peft_forward():
    """Dropout, a disabled adapter and a merged adapter are PEFT's business: same outputs as PEFT's."""
    ids = torch.randint(0, 100, (1, 11))
    with_dropout = _lora_model(dropout=0.5)
    fused = copy.deepcopy(with_dropout)
    fuse_lora_forward(fused)
    fallbacks = _count_peft_calls(fused)
    for m in (with_dropout, fused):
        m.eval()  # dropout off in eval, but the module is still a Dropout: the fused path must not care
    torch.testing.assert_close(fused(input_ids=ids).logits, with_dropout(input_ids=ids).logits)
    fused.train()
    torch.manual_seed(1)
    a = fused(input_ids=ids).logits
    torch.manual_seed(1)
    b = with_dropout.train()(input_ids=ids).logits
    torch.testing.assert_close(a, b)  # same dropout masks: PEFT's forward ran
    assert len(fallbacks) == 2 * 8  # both calls, every adapted projection

    model = _lora_model()
    fused = copy.deepcopy(model)
    fuse_lora_forward(fused)
    with fused.disable_adapter(), model.disable_adapter():
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits)
    fused.merge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits)
