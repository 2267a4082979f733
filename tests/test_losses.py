"""The logit-free LM loss equals the model's own loss, in value and in gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.losses import chunked_lm_loss, resolve_fused_loss
from headwise.errors import HeadwiseError


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double()


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_loss_matches_model_loss_and_grads(chunk):
    model = _model()
    ids = torch.randint(0, 300, (2, 37))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions (e.g. document starts, prompts)
    labels[1, 20] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight])

    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long))
    assert out.logits.shape[1] == 0  # no full-sequence logits were made
    loss = chunked_lm_loss(out.hidden_states[-1], model.lm_head, labels, chunk_size=chunk)
    grads = torch.autograd.grad(loss, [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight])
    # transformers computes its loss in fp32 (it upcasts logits with .float()), ours keeps fp64 here.
    torch.testing.assert_close(loss.float(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-5, atol=1e-7)


def test_chunked_loss_with_num_items_in_batch_is_a_sum_over_that_count():
    model = _model()
    ids = torch.randint(0, 300, (1, 16))
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long))
    mean = chunked_lm_loss(out.hidden_states[-1], model.lm_head, ids, chunk_size=5)
    scaled = chunked_lm_loss(out.hidden_states[-1], model.lm_head, ids, chunk_size=5, num_items_in_batch=30)
    torch.testing.assert_close(scaled, mean * 15 / 30)  # 15 predicted tokens


def test_fused_loss_selection():
    assert resolve_fused_loss("off", "cpu") is None
    assert resolve_fused_loss("auto", "cpu") is chunked_lm_loss
    assert resolve_fused_loss("auto", "cuda") is chunked_lm_loss  # liger stays opt-in
    with pytest.raises(HeadwiseError, match="needs a CUDA GPU"):
        resolve_fused_loss("liger", "cpu")


def test_trainer_with_chunked_loss_logs_the_same_losses(tmp_path, tiny_model_dir):
    """Through the real Trainer path (labels popped, num_items_in_batch scaling, accumulation)."""
    import json

    from headwise.recipe_loader import load_recipe
    from headwise.training import train
    from tests.conftest import tiny_recipe, write_recipe

    losses = {}
    for mode in ("off", "chunked"):
        data = tiny_recipe(tiny_model_dir, tmp_path / mode, max_steps=3, gradient_accumulation_steps=2,
                           fused_cross_entropy=mode, gradient_checkpointing=False)
        train(load_recipe(write_recipe(tmp_path, data, f"{mode}.yaml")))
        history = json.loads((tmp_path / mode / "run_summary.json").read_text())["log_history"]
        losses[mode] = [h["loss"] for h in history if "loss" in h]
    assert len(losses["off"]) == 3
    assert losses["chunked"] == pytest.approx(losses["off"], rel=1e-4)


def test_chunked_loss_casts_fp32_hidden_states_to_a_bf16_head():
    """Mixed precision without DeepSpeed: the trained final norm (LoRA+) is fp32, the tied head bf16, and the
    loss runs outside the forward's autocast. The hidden states go to the head's dtype (this raised before)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    loss = chunked_lm_loss(hidden, head, labels, chunk_size=4)
    expected = torch.nn.functional.cross_entropy(head(hidden.to(torch.bfloat16))[:, :-1].float().reshape(-1, 40),
                                                 labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32 and hidden.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs CUDA and liger-kernel")
def test_liger_loss_matches_chunked_loss_on_gpu():
    """Liger's fused linear cross-entropy (gradient computed in the forward) against our chunked loss."""
    from headwise.losses import liger_lm_loss

    model = _model().float().cuda()
    ids = torch.randint(0, 300, (2, 301), device="cuda")
    labels = ids.clone()
    labels[0, :9] = -100
    losses, grads = [], []
    for fn in (chunked_lm_loss, liger_lm_loss):
        out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long, device="cuda"))
        loss = fn(out.hidden_states[-1], model.lm_head, labels)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [model.model.layers[0].self_attn.q_proj.weight, model.model.norm.weight]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
