"""The logit-free LM loss equals the model's own loss, in value and in gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.train.losses import chunked_lm_loss, resolve_fused_loss
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

    from headwise.recipe.loader import load_recipe
    from headwise.train.trainer import train
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



class _WrappedHead(torch.nn.Linear):
    """Not a plain Linear (as a PEFT-wrapped head is not): the loss must go through the module call."""


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained-head", "frozen-head"])
def test_gradient_in_forward_equals_the_checkpointed_path(frozen_head):
    """A plain Linear head gets its gradients in the forward (the head is never called again in the
    backward); a wrapped head goes through checkpointed module calls. Both equal F.cross_entropy on the
    full logits, in the loss and in the gradients of the hidden states, the weight and the bias."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 50, bias=True).double()
    wrapped = _WrappedHead(24, 50, bias=True).double()
    wrapped.load_state_dict(plain.state_dict())
    labels = torch.randint(0, 50, (3, 17))
    labels[1, 4:9] = -100
    hidden = torch.randn(3, 17, 24, dtype=torch.float64)
    results = []
    for head in (None, plain, wrapped):
        h = hidden.clone().requires_grad_(True)
        params = [] if frozen_head else [(head or plain).weight, (head or plain).bias]
        for prm in (plain.weight, plain.bias, wrapped.weight, wrapped.bias):
            prm.requires_grad_(not frozen_head)
        calls = []
        hook = (head or plain).register_forward_hook(lambda *a: calls.append(1))
        if head is None:  # the reference: full logits, one cross-entropy
            logits = plain(h)[:, :-1].reshape(-1, 50)
            loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            loss = chunked_lm_loss(h, head, labels, chunk_size=5)
        grads = torch.autograd.grad(loss, [h, *params])
        hook.remove()
        results.append((loss, grads, len(calls)))
    (ref_loss, ref_grads, _), (fused_loss, fused_grads, fused_calls), (ckpt_loss, ckpt_grads, ckpt_calls) = results
    assert fused_calls == 0  # the fused path uses the weight directly, with no second pass over the logits
    # 51 positions in chunks of 5 = 11 chunks; skipped: 20-24 (row 1's masked labels, shifted by one) and
    # 50 (the last row's final position predicts nothing): 9 chunks, each run twice (forward, recompute)
    assert ckpt_calls == 2 * 9
    for loss, grads in ((fused_loss, fused_grads), (ckpt_loss, ckpt_grads)):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_cls", [torch.nn.Linear, _WrappedHead], ids=["trained-plain-head", "wrapped-head"])
def test_zero3_trained_or_wrapped_heads_take_the_reentrant_checkpoint(head_cls):
    """Under ZeRO-3 (parameters carry DeepSpeed's `ds_id`) a trained or PEFT-wrapped head goes through
    reentrant checkpointed module calls (tests/test_deepspeed.py runs them for real): the head is
    called again in the backward, and loss and gradients equal the full-logit cross-entropy."""
    torch.manual_seed(0)
    head = head_cls(8, 20, bias=False).double()
    head.weight.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    hidden = torch.randn(1, 9, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 20, (1, 9))
    calls = []
    hook = head.register_forward_hook(lambda *a: calls.append(1))
    loss = chunked_lm_loss(hidden, head, labels, chunk_size=4)
    loss.backward()  # (the reentrant form refuses torch.autograd.grad)
    hook.remove()
    assert len(calls) == 2 * 2  # 8 positions with a label in chunks of 4, each recomputed once
    grads = [hidden.grad, head.weight.grad]
    ref = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 20), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, torch.autograd.grad(ref, [hidden, head.weight])):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)



def test_liger_loss_hands_wrapped_or_partitioned_heads_to_the_chunked_loss():
    """Liger takes one weight tensor; a PEFT-wrapped or ZeRO-3 head goes to the chunked loss (no Liger
    import, so this runs on CPU) and gives its result."""
    from headwise.train.losses import liger_lm_loss

    torch.manual_seed(0)
    wrapped = _WrappedHead(8, 20, bias=False).double()
    partitioned = torch.nn.Linear(8, 20, bias=False).double()
    partitioned.weight.ds_id = 0
    hidden = torch.randn(2, 7, 8, dtype=torch.float64)
    labels = torch.randint(0, 20, (2, 7))
    for head in (wrapped, partitioned):
        torch.testing.assert_close(liger_lm_loss(hidden, head, labels), chunked_lm_loss(hidden, head, labels))

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs CUDA and liger-kernel")
def test_liger_loss_matches_chunked_loss_on_gpu():
    """Liger's fused linear cross-entropy (gradient computed in the forward) against our chunked loss."""
    from headwise.train.losses import liger_lm_loss

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
