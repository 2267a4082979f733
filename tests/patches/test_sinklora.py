"""SF-Attn / S2-Attn as a transformers attention function, on real (tiny) Llama modules."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.errors import HeadwiseError
from headwise.patches.base import method_for
from headwise.patches.sinklora import SinkLoRAMethod, sinklora_attention


def _tiny(seed=0, heads=4, kv=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=128, max_position_embeddings=512, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).double()


def _patched(model, **cfg):
    method = method_for(SinkLoRAMethod(**cfg))
    method.prepare_model(model)
    return model


def _attn_inputs(T, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, hkv, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, hkv, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _dense_causal(q, k, v):
    rep = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    return out.transpose(1, 2)


def _module(model, **cfg):
    _patched(model, **cfg)
    module = model.model.layers[0].self_attn
    module.train()
    return module


@pytest.mark.parametrize("cfg", [dict(group_size=128, sinks=4), dict(group_size=64, sinks=0, shifted_heads="none")])
def test_group_covering_the_sequence_is_full_causal_attention(cfg):
    """G >= 2T covers every head (shifted heads start a new group at G/2); unshifted heads need G >= T."""
    T = 64 if cfg["group_size"] == 64 else 60
    q, k, v = _attn_inputs(T)
    out, _ = sinklora_attention(_module(_tiny(), **cfg), q, k, v, None, scaling=q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, _dense_causal(q, k, v), rtol=1e-6, atol=1e-6)  # the reference accumulates in fp32


def _dependency(module, T, query_pos):
    """Which key positions the output at `query_pos` depends on, per head (through v's gradient)."""
    q, k, v = _attn_inputs(T)
    out, _ = sinklora_attention(module, q, k, v, None, scaling=0.25)
    deps = []
    for h in range(out.shape[2]):
        (gv,) = torch.autograd.grad(out[0, query_pos, h].sum(), v, retain_graph=True)
        deps.append(gv[0, h // 2].abs().sum(-1) > 0)  # (T,) keys this head read (GQA: kv head h//2)
    return torch.stack(deps)


@pytest.mark.parametrize("sinks", [0, 4])
def test_sinks_visible_everywhere_and_no_future(sinks):
    T, G = 96, 32
    module = _module(_tiny(), group_size=G, sinks=sinks)
    for qpos in (0, 5, 31, 40, 63, 95):
        deps = _dependency(module, T, qpos)
        assert not deps[:, qpos + 1 :].any(), "a query saw a later token"
        for h in range(4):
            shifted = h >= 2
            group = (qpos + G // 2) // G if shifted else qpos // G
            members = [kk for kk in range(qpos + 1) if ((kk + G // 2) // G if shifted else kk // G) == group]
            expected = set(members) | set(range(min(sinks, qpos + 1)))
            assert set(torch.nonzero(deps[h]).flatten().tolist()) == expected, (h, qpos)


def test_packed_sequences_do_not_attend_across():
    module = _module(_tiny(), group_size=16, sinks=4)
    T = 48
    q, k, v = _attn_inputs(T)
    pos = torch.cat([torch.arange(20), torch.arange(28)]).unsqueeze(0)  # two documents
    packed, _ = sinklora_attention(module, q, k, v, None, scaling=0.25, position_ids=pos)
    first, _ = sinklora_attention(module, q[:, :, :20], k[:, :, :20], v[:, :, :20], None, scaling=0.25)
    torch.testing.assert_close(packed[:, :20], first)
    # The second document's sinks are its own first tokens (positions 20..23), not the sample's.
    second, _ = sinklora_attention(module, q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], None, scaling=0.25)
    torch.testing.assert_close(packed[:, 20:], second)


def test_packing_is_decided_once_per_forward(monkeypatch):
    """The one-or-several-sequences check syncs with the device: once per forward, not once per layer,
    and a new position_ids tensor (a new packed sample) is looked at again."""
    from headwise.patches.sinklora import attention as sinklora

    calls = []
    real = sinklora._boundaries_from_positions
    monkeypatch.setattr(sinklora, "_boundaries_from_positions", lambda *a: calls.append(1) or real(*a))
    model = _patched(_tiny(), group_size=16, sinks=4).train()
    ids = torch.randint(0, 128, (1, 48))
    one = torch.arange(48).unsqueeze(0)
    model(input_ids=ids, position_ids=one).logits.sum().backward()
    assert len(calls) == 1  # 2 layers, one decision
    two = torch.cat([torch.arange(20), torch.arange(28)]).unsqueeze(0)
    packed = model(input_ids=ids, position_ids=two).logits
    assert len(calls) == 2
    # and the packed answer is the one used: the second document's first logits match it run alone
    alone = model(input_ids=ids[:, 20:], position_ids=torch.arange(28).unsqueeze(0)).logits
    torch.testing.assert_close(packed[:, 20:], alone)


def test_eval_mode_is_the_models_own_sdpa():
    stock = _tiny(seed=3)
    patched = _patched(copy.deepcopy(stock), group_size=16, sinks=4)
    ids = torch.randint(0, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in eval is fine: it is SDPA
    stock.eval(), patched.eval()
    torch.testing.assert_close(patched(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits)
    patched.train()
    train_logits = patched(ids).logits
    stock.train()
    assert not torch.allclose(train_logits, stock(ids).logits)  # sparse in training (T=40 > G=16)
    out = patched.eval().generate(ids[:1, :10], max_new_tokens=5, do_sample=False)
    ref = stock.eval().generate(ids[:1, :10], max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


def test_gradients_reach_lora_embeddings_and_norms():
    from peft import LoraConfig, get_peft_model

    model = _tiny().float()
    method = method_for(SinkLoRAMethod(group_size=16, sinks=4))
    method.prepare_model(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                  modules_to_save=method.modules_to_save()))
    peft_model.train()
    # LoRA B starts at zero; nudge it so gradients flow into A as well.
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 128, (1, 48))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for kind in ("lora_A", "lora_B", "embed_tokens", "input_layernorm", "post_attention_layernorm", "model.norm"):
        hits = [g for n, g in grads.items() if kind in n]
        assert hits and all(g is not None and g.abs().sum() > 0 for g in hits), kind


def test_left_padded_training_batch_is_refused():
    module = _module(_tiny(), group_size=16)
    q, k, v = _attn_inputs(32)
    mask = torch.ones(1, 32, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(HeadwiseError, match="right padding or packed"):
        sinklora_attention(module, q, k, v, mask, scaling=0.25)


def test_padding_mask_changed_in_place_is_checked_again():
    """The padding check reads a mask once (every layer gets the same tensor; reading it syncs the
    GPU), but a mask changed in place to left padding is read again and refused."""
    module = _module(_tiny(), group_size=16)
    q, k, v = _attn_inputs(32)
    mask = torch.ones(1, 32, dtype=torch.long)
    mask[0, 28:] = 0  # right padding: accepted, twice
    for _ in range(2):
        sinklora_attention(module, q, k, v, mask, scaling=0.25)
    mask[0, :3] = 0
    with pytest.raises(HeadwiseError, match="right padding or packed"):
        sinklora_attention(module, q, k, v, mask, scaling=0.25)


def test_odd_group_size_is_a_recipe_error():
    with pytest.raises(ValueError, match="group_size must be even"):
        SinkLoRAMethod(group_size=33)
