"""The fused LoRA forward (one in-place GEMM adds the adapter) equals PEFT's own forward, in outputs and
in every gradient, and hands every case it does not cover back to PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.train.fused_lora import fuse_lora_forward


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
    from headwise.train.fused_lora import _ORIGINAL

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


@pytest.mark.parametrize("case", ["bf16-base-fp32-adapters", "fp32-model-under-bf16-autocast"])
def test_fused_forward_with_mixed_dtypes_matches_peft(case):
    """PEFT keeps adapters in fp32 on a bf16 base (and training may run under autocast): the fused path
    still runs (no fallback), in the base dtype. Against an fp64 run of PEFT's forward, its loss error
    is within 2x PEFT's own low-precision error (the flash-attention tolerance rule), and so is its
    gradient error over all adapters."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    base = LlamaForCausalLM(cfg)
    truth = copy.deepcopy(base).double()
    if case.startswith("bf16"):
        base = base.to(torch.bfloat16)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model, truth = get_peft_model(base, lora), get_peft_model(truth, copy.deepcopy(lora))
    torch.manual_seed(1)
    for (n, p), (_, t) in zip(model.named_parameters(), truth.named_parameters()):
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
        if "lora_" in n:
            t.data.copy_(p.data)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    fused = copy.deepcopy(model)
    fuse_lora_forward(fused)
    fallbacks = _count_peft_calls(fused)
    ids = torch.randint(0, 100, (2, 19))
    true_loss, true_grads = _loss_and_grads(truth, ids)
    results = []
    for m in (model, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast")):
            results.append(_loss_and_grads(m, ids))
    assert not fallbacks
    (peft_loss, peft_grads), (loss, grads) = results
    assert abs(loss.double() - true_loss) <= 2 * abs(peft_loss.double() - true_loss) + 1e-3
    assert all(grads[n].dtype == peft_grads[n].dtype for n in true_grads)
    # The adapter GEMMs round in bf16 where PEFT's fp32 branch does not: over all LoRA gradients the
    # error stays within 2x PEFT's, and no single one strays past 4x.
    err = {n: (grads[n].double() - t).norm() for n, t in true_grads.items()}
    ref_err = {n: (peft_grads[n].double() - t).norm() for n, t in true_grads.items()}
    assert sum(e**2 for e in err.values()) ** 0.5 <= 2 * sum(e**2 for e in ref_err.values()) ** 0.5
    for n in err:
        assert err[n] <= 4 * ref_err[n] + 1e-4 * true_grads[n].norm(), n
