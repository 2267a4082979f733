"""MoH (Mixture-of-Head attention, issue 21) against references written here from the research dossier
(../shared/research/moh_s2.md §1.3 and §1.5), not from headwise's code.

The references, per token, for Hq query heads and Hkv KV heads (G = Hq // Hkv query heads per KV group):

- `query_norm` (released MoH-LLaMA3): the first round(Hq * shared) heads are shared (gate 1); each routed head's
  logit is its query's L2 norm over the std (unbiased) of those norms across the routed heads; probs = softmax;
  the top-k are chosen, k = round(Hq * activation) - n_shared; a routed gate is the 0/1 choice in the forward
  with a straight-through gradient to probs from the chosen units (an unchosen head's output is never computed).
- `kv_group` (headwise's own): the same on whole KV groups (a group's norm is that of its G query vectors
  concatenated); every query head of a group carries the group's gate.
- `learned` (paper, released ViT/DiT code): p_r = softmax(W_r x), chosen = top-k(p_r), routed gate
  k * p_r * chosen / sum(p_r * chosen), shared gate n_shared * softmax(W_s x), both groups scaled by
  2 * softmax(W_h x).
- the balance loss (released code): E * sum_i P_i f_i over the E routed units, P_i the mean router probability and
  f_i the fraction of tokens choosing unit i.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headwise.patches.model_attention import attention_modules
from headwise.patches.moh import MoH, MoHMethod, balance_loss, moh_gates
from model_families import TINY, family_model

B, HQ, T, D = 2, 8, 5, 16
REFERENCE = "headwise_moh_test_reference"


# ------------------------------------------------------------------------------------------------ the references


def _split(units: int, activation: float, shared: float) -> tuple[int, int]:
    """(shared units, routed units chosen per token) out of `units` heads or KV groups."""
    n_shared = round(units * shared)
    return n_shared, round(units * activation) - n_shared


def _top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs.topk(k, dim=-1).indices, True)


def _norm_routing(unit_norms: torch.Tensor, n_shared: int, k: int):
    """unit_norms (B, units, T) -> (unit gates (B, T, units), probs, chosen), the query-norm rule on any unit."""
    routed = unit_norms[:, n_shared:].transpose(1, 2)  # (B, T, n_routed)
    probs = torch.softmax(routed / routed.std(dim=-1, keepdim=True), dim=-1)
    chosen = _top_k_mask(probs, k)
    # forward: exactly 0/1; d gate / d probs = 1 on the chosen units, 0 on the others (their outputs are not computed)
    routed_gates = torch.where(chosen, 1 + (probs - probs.detach()), torch.zeros_like(probs))
    shared_gates = torch.ones(*routed_gates.shape[:2], n_shared, dtype=probs.dtype)
    return torch.cat([shared_gates, routed_gates], dim=-1), probs, chosen


def _wide(x: torch.Tensor) -> torch.Tensor:
    """The router's precision: fp32, or the input's when wider (an fp64 model routes in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def reference_query_norm(query: torch.Tensor, activation: float, shared: float):
    n_shared, k = _split(query.shape[1], activation, shared)
    norms = _wide(query).pow(2).sum(-1).sqrt()  # (B, Hq, T)
    return _norm_routing(norms, n_shared, k)


def reference_kv_group(query: torch.Tensor, n_kv: int, activation: float, shared: float):
    b, hq, t, d = query.shape
    g = hq // n_kv
    n_shared, k = _split(n_kv, activation, shared)
    # query head h belongs to KV group h // G (transformers' repeat_kv)
    group_norms = _wide(query).reshape(b, n_kv, g, t, d).pow(2).sum(dim=(2, 4)).sqrt()  # (B, Hkv, T)
    group_gates, probs, chosen = _norm_routing(group_norms, n_shared, k)
    return group_gates.repeat_interleave(g, dim=-1), probs, chosen


def reference_learned(router_logits, hq: int, activation: float, shared: float):
    shared_logits, routed_logits, balance_logits = (_wide(x) for x in router_logits)
    n_shared, k = _split(hq, activation, shared)
    p_r = torch.softmax(routed_logits, dim=-1)
    chosen = _top_k_mask(p_r, k)
    kept = p_r * chosen
    routed = k * kept / kept.sum(dim=-1, keepdim=True)
    shared_w = n_shared * torch.softmax(shared_logits, dim=-1)
    alpha = 2 * torch.softmax(balance_logits, dim=-1)
    return torch.cat([alpha[..., :1] * shared_w, alpha[..., 1:] * routed], dim=-1), p_r, chosen


def reference_balance(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    units = probs.shape[-1]
    mean_prob = probs.reshape(-1, units).mean(dim=0)
    chosen_fraction = chosen.float().reshape(-1, units).mean(dim=0)
    return units * (mean_prob * chosen_fraction).sum()


# ----------------------------------------------------------------------------------------------- unit tests

# (router, Hkv, shared): Hq = 8 throughout, activation 0.75. kv_group at shared 0.25 routes 2 of 3 groups; at 0.5
# it routes 1 of 2, where the norm-over-spread logits of two units are always +-1/sqrt(2) (the unbiased std of two
# values is |a - b| / sqrt(2)), so its probabilities are constant and carry no gradient (no gradient case uses it).
CASES = [("query_norm", 2, 0.5), ("query_norm", 4, 0.5), ("query_norm", 4, 0.25), ("kv_group", 4, 0.25),
         ("kv_group", 4, 0.5), ("learned", 2, 0.5), ("learned", 4, 0.25)]
GRADIENT_CASES = [case for case in CASES if case != ("kv_group", 4, 0.5)]


def _units(router: str, hkv: int) -> int:
    return hkv if router == "kv_group" else HQ


def _inputs(router: str, hkv: int, shared: float, seed: int = 0, requires_grad: bool = False):
    """Random post-RoPE queries and, for `learned`, random router logits (shared, routed, balance)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, HQ, T, D, generator=gen).requires_grad_(requires_grad)
    if router != "learned":
        return query, None
    n_shared, _ = _split(HQ, 0.75, shared)
    logits = tuple(torch.randn(B, T, n, generator=gen).requires_grad_(requires_grad)
                   for n in (n_shared, HQ - n_shared, 2))
    return query, logits


def _reference(router: str, query, logits, hkv: int, shared: float, activation: float = 0.75):
    if router == "query_norm":
        return reference_query_norm(query, activation, shared)
    if router == "kv_group":
        return reference_kv_group(query, hkv, activation, shared)
    return reference_learned(logits, query.shape[1], activation, shared)


def _cfg(router: str, **kw) -> MoHMethod:
    return MoHMethod(name="moh", router=router, **{"activation": 0.75, "shared": 0.5, "balance_weight": 0.01, **kw})


def test_config_defaults_are_the_released_split():
    """Issue 21: 75% active by default (half shared, a quarter routed), balance weight 0.01."""
    cfg = MoHMethod(name="moh")
    assert (cfg.activation, cfg.shared, cfg.balance_weight) == (0.75, 0.5, 0.01)


@pytest.mark.parametrize("router,hkv,shared", CASES)
def test_gates_match_the_reference(router, hkv, shared):
    query, logits = _inputs(router, hkv, shared)
    gates, probs, chosen = moh_gates(_cfg(router, shared=shared), query, router_logits=logits, n_kv_heads=hkv)
    want_gates, want_probs, want_chosen = _reference(router, query, logits, hkv, shared)

    units = _units(router, hkv)
    n_shared, k = _split(units, 0.75, shared)
    assert gates.shape == (B, T, HQ) and gates.dtype == torch.float32
    assert probs.shape == chosen.shape == (B, T, units - n_shared)
    assert chosen.dtype == torch.bool
    torch.testing.assert_close(probs, want_probs, rtol=0, atol=1e-6)
    assert torch.equal(chosen, want_chosen)
    assert bool((chosen.sum(dim=-1) == k).all()), chosen.sum(dim=-1)
    assert 0 < chosen.float().mean() < 1  # the case routes
    # the chosen units are the top-k of the returned probs
    assert bool((probs.masked_fill(~chosen, 2).amin(-1) >= probs.masked_fill(chosen, -1).amax(-1)).all())
    if router == "learned":
        # float32 rounding of the weights (the products may be taken in another order)
        torch.testing.assert_close(gates, want_gates, rtol=1e-6, atol=1e-7)
        routed_gates = gates[..., n_shared:]
        assert bool((routed_gates[~chosen] == 0).all())
    else:
        # binary in the forward: shared heads exactly 1, routed heads exactly their 0/1 choice
        assert torch.equal(gates.detach(), want_gates.detach()), (gates - want_gates).abs().max()
        shared_heads = n_shared * (HQ // units)
        assert bool((gates[..., :shared_heads] == 1).all())
        assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
        if router == "kv_group":  # every query head of a group carries the group's gate
            per_group = gates.reshape(B, T, hkv, HQ // hkv)
            assert bool((per_group == per_group[..., :1]).all())


@pytest.mark.parametrize("router,hkv,shared", GRADIENT_CASES)
def test_straight_through_gradient_matches_the_reference(router, hkv, shared):
    """d sum(gates * w) reaches the queries (query_norm, kv_group) or the router logits (learned), and equals
    autograd through the reference's own straight-through form."""
    weights = torch.randn(B, T, HQ, generator=torch.Generator().manual_seed(7))
    query, logits = _inputs(router, hkv, shared, requires_grad=True)
    gates, _, _ = moh_gates(_cfg(router, shared=shared), query, router_logits=logits, n_kv_heads=hkv)
    leaves = [query] if logits is None else list(logits)
    got = torch.autograd.grad((gates * weights).sum(), leaves, allow_unused=True)

    ref_query, ref_logits = _inputs(router, hkv, shared, requires_grad=True)
    want_gates, _, _ = _reference(router, ref_query, ref_logits, hkv, shared)
    ref_leaves = [ref_query] if ref_logits is None else list(ref_logits)
    want = torch.autograd.grad((want_gates * weights).sum(), ref_leaves)

    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None, f"no gradient reaches input {i}"
        assert w.abs().max() > 1e-3  # a real gradient, far above rounding
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    if router != "learned":
        # shared heads (or groups) take no part in the routing: no gradient to their queries
        shared_heads = _split(_units(router, hkv), 0.75, shared)[0] * (HQ // _units(router, hkv))
        assert bool((got[0][:, :shared_heads] == 0).all())


def _zero_logits(activation: float, shared: float = 0.5):
    n_shared, _ = _split(HQ, activation, shared)
    return (torch.zeros(B, T, n_shared), torch.zeros(B, T, HQ - n_shared), torch.zeros(B, T, 2))


def test_learned_router_at_zero_logits_keeps_the_dense_scale():
    """The initial (all-zero) routers: every active head weighs exactly 1, every other routed head 0."""
    query = torch.randn(B, HQ, T, D, generator=torch.Generator().manual_seed(0))
    gates, probs, chosen = moh_gates(_cfg("learned"), query, router_logits=_zero_logits(0.75))
    n_shared, k = _split(HQ, 0.75, 0.5)
    assert bool((chosen.sum(-1) == k).all())
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / (HQ - n_shared)), rtol=0, atol=1e-7)
    assert bool((gates[..., :n_shared] == 1).all())
    assert torch.equal(gates[..., n_shared:], chosen.float())


def test_learned_router_with_every_head_active_is_the_dense_sum():
    query = torch.randn(B, HQ, T, D, generator=torch.Generator().manual_seed(0))
    gates, _, chosen = moh_gates(_cfg("learned", activation=1.0), query, router_logits=_zero_logits(1.0))
    assert bool(chosen.all())
    assert torch.equal(gates, torch.ones(B, T, HQ))


def test_balance_loss_by_hand():
    """2 tokens, 4 routed units, k = 2.
    probs  [.40 .30 .20 .10] chosen {0, 1};  [.50 .30 .15 .05] chosen {0, 1}
    P = [.45 .30 .175 .075], f = [1 1 0 0], sum P f = .75, loss = 4 * .75 = 3.0;
    d loss / d probs[t, i] = E * f_i / tokens = 2 f_i = [2 2 0 0] for both tokens."""
    probs = torch.tensor([[[0.40, 0.30, 0.20, 0.10], [0.50, 0.30, 0.15, 0.05]]], requires_grad=True)  # (1, 2, 4)
    chosen = torch.tensor([[[True, True, False, False], [True, True, False, False]]])
    loss = balance_loss(probs, chosen)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.detach(), torch.tensor(3.0), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(grad, torch.tensor([[[2.0, 2.0, 0.0, 0.0]] * 2]), rtol=1e-6, atol=0)
    # the same tokens as a batch of two one-token samples: the mean runs over every token
    torch.testing.assert_close(balance_loss(probs.detach().reshape(2, 1, 4), chosen.reshape(2, 1, 4)),
                               torch.tensor(3.0), rtol=1e-6, atol=0)


def test_balance_loss_balanced_routing_is_k():
    """Uniform probs (1/4) and each unit chosen by half the tokens: E * sum_i (1/E)(k/E) = k = 2."""
    probs = torch.full((1, 2, 4), 0.25)
    chosen = torch.tensor([[[True, True, False, False], [False, False, True, True]]])
    torch.testing.assert_close(balance_loss(probs, chosen), torch.tensor(2.0), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------- end to end (Llama)


def _causal_attention(q, k, v, scaling):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D): plain causal softmax attention in the query's dtype."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _reference_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Stock causal attention with each head's output times the reference gates of this layer's queries; the
    layer's (gates, probs, chosen) are kept on the module for the balance-loss reference."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _causal_attention(query, key, value, scaling)
    gates, probs, chosen = module.moh_reference(query)
    module.moh_reference_record = (gates, probs, chosen)
    out = out * gates.to(out.dtype).transpose(1, 2).unsqueeze(-1)  # (B, T, Hq) -> (B, Hq, T, 1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def _ids(model, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def _forward_backward(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype).to(logits.device)
    (logits * weights).sum().backward()
    return logits.detach()


def _patched(stock, cfg):
    model = copy.deepcopy(stock)
    MoH(cfg).prepare_model(model)
    return model


def _routed_llama() -> torch.nn.Module:
    """The tiny Llama of tests/model_families.py with 8 query heads and 4 KV heads (head dim 8), fp64: at 75% its
    routers choose among 3 or more units (with 2, as on the 4-head model, the query-norm softmax is constant)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "num_attention_heads": 8, "num_key_value_heads": 4})
    config.initializer_range = 0.2
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


def _reference_model(stock, router: str, activation: float, shared: float):
    reference = copy.deepcopy(stock)
    reference.config._attn_implementation = REFERENCE
    n_kv = stock.config.num_key_value_heads
    for m in attention_modules(reference):
        if router == "query_norm":
            m.moh_reference = lambda q: reference_query_norm(q, activation, shared)
        else:
            m.moh_reference = lambda q: reference_kv_group(q, n_kv, activation, shared)
    return reference


FP64 = {"rtol": 1e-9, "atol": 1e-9}
# (router, shared) at activation 0.75 on the 8-head model: query_norm 4 shared heads + 2 of 4; kv_group 1 shared
# group + 2 of 3
ROUTED = [("query_norm", 0.5), ("kv_group", 0.25)]


@pytest.mark.parametrize("router", ["query_norm", "kv_group", "learned"])
def test_every_head_active_is_the_stock_model(router):
    """activation 1.0: every gate is 1 (the learned routers start at zero), so train and eval logits are the
    stock model's (on the 4-head family model, kv_group has a single routed group: one unit, always chosen)."""
    stock = family_model("llama", dtype=torch.float64)
    ids = _ids(stock)
    model = _patched(stock, _cfg(router, activation=1.0))
    with torch.no_grad():
        want = stock(input_ids=ids).logits
        model.train()
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, want, **FP64)
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, want, **FP64)


@pytest.mark.parametrize("router,shared", ROUTED)
def test_routed_model_matches_the_gated_reference(router, shared):
    """Train-mode logits and every weight's gradient (the straight-through path into q_proj included), and
    eval-mode logits, equal the stock causal attention with head outputs times the reference router's gates."""
    stock = _routed_llama()
    ids = _ids(stock)
    cfg = _cfg(router, shared=shared)
    model, reference = _patched(stock, cfg), _reference_model(stock, router, cfg.activation, cfg.shared)
    model.train()
    reference.train()
    got, want = _forward_backward(model, ids), _forward_backward(reference, ids)
    for m in attention_modules(reference):  # the case routes: every layer turns some routed head off
        assert bool((m.moh_reference_record[0] == 0).any())
    torch.testing.assert_close(got, want, **FP64)
    reference_params = dict(reference.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        want_grad = reference_params[name].grad
        torch.testing.assert_close(p.grad, want_grad, rtol=1e-8, atol=1e-10,
                                   msg=lambda text, name=name: f"{name}: {text}")
        compared += 1
    assert compared == len(reference_params)

    model.eval()
    reference.eval()
    with torch.no_grad():
        moh_logits = model(input_ids=ids).logits
        torch.testing.assert_close(moh_logits, reference(input_ids=ids).logits, **FP64)
        assert (moh_logits - stock(input_ids=ids).logits).abs().max() > 1e-3  # MoH at 75% is not the dense model


def _capture_hidden(module, args, kwargs):
    module.moh_reference_hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def test_learned_model_matches_the_reference_routers():
    """The learned routers are linear maps (no bias) of the attention block's input, the hidden state that feeds
    q/k/v. With random router weights (3 shared, 3 of 5 routed per token at shared 0.375: every router's shape
    differs, so each is found by its shape), train logits and the gradients of the model's weights and of the
    routers equal the stock attention weighted by the reference `learned` gates."""
    stock = _routed_llama()
    ids = _ids(stock)
    cfg = _cfg("learned", shared=0.375)
    model = _patched(stock, cfg)
    stock_names = {name for name, _ in stock.named_parameters()}
    n_shared, _ = _split(8, cfg.activation, cfg.shared)
    hidden = stock.config.hidden_size
    shapes = {"shared": (n_shared, hidden), "routed": (8 - n_shared, hidden), "balance": (2, hidden)}
    reference = copy.deepcopy(stock)
    reference.config._attn_implementation = REFERENCE
    routers = {}
    gen = torch.Generator().manual_seed(3)
    for m in attention_modules(reference):
        prefix = next(name for name, mod in reference.named_modules() if mod is m) + "."
        added = {name: p for name, p in model.named_parameters()
                 if name.startswith(prefix) and name not in stock_names}
        assert sorted(p.shape for p in added.values()) == sorted(shapes.values()), added.keys()
        weights = {}
        for role, shape in shapes.items():
            name, p = next((n, p) for n, p in added.items() if p.shape == shape)
            with torch.no_grad():
                p.copy_(0.3 * torch.randn(shape, generator=gen, dtype=p.dtype))
            weights[role] = p.detach().clone().requires_grad_(True)
            routers[name] = weights[role]
        m.register_forward_pre_hook(_capture_hidden, with_kwargs=True)
        m.moh_reference = lambda q, m=m, w=weights: reference_learned(
            tuple(m.moh_reference_hidden @ w[role].T for role in shapes), 8, cfg.activation, cfg.shared)
    model.train()
    reference.train()
    got, want = _forward_backward(model, ids), _forward_backward(reference, ids)
    torch.testing.assert_close(got, want, **FP64)
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        want_grad = reference_params[name].grad if name in reference_params else routers[name].grad
        assert want_grad.abs().max() > 1e-6, name
        torch.testing.assert_close(p.grad, want_grad, rtol=1e-8, atol=1e-10,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_extra_loss_is_the_weighted_mean_of_the_layer_balance_losses():
    """After a training forward, extra_loss = balance_weight * mean over layers of E * sum_i P_i f_i, with the
    reference's gradient into q_proj (through the router probabilities)."""
    stock = _routed_llama()
    ids = _ids(stock)
    cfg = _cfg("query_norm", balance_weight=0.01)
    hooks = MoH(cfg)
    model = copy.deepcopy(stock)
    hooks.prepare_model(model)
    reference = _reference_model(stock, "query_norm", cfg.activation, cfg.shared)
    model.train()
    reference.train()
    inputs = {"input_ids": ids}
    loss = hooks.extra_loss(model, inputs, model(**inputs, use_cache=False))
    reference(**inputs, use_cache=False)
    layers = [reference_balance(*m.moh_reference_record[1:]) for m in attention_modules(reference)]
    want = cfg.balance_weight * torch.stack(layers).mean()

    assert loss is not None and loss.dim() == 0
    torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-6, atol=0)
    loss.backward()
    want.backward()
    reference_params = dict(reference.named_parameters())
    q_proj = [(name, p) for name, p in model.named_parameters() if name.endswith("q_proj.weight")]
    assert len(q_proj) == stock.config.num_hidden_layers
    for name, p in q_proj:
        want_grad = reference_params[name].grad
        assert want_grad.abs().max() > 1e-6, f"{name}: the reference's balance gradient is only rounding"
        assert p.grad is not None, f"{name}: no balance-loss gradient"
        # the method may sum the layers in float32
        torch.testing.assert_close(p.grad, want_grad, rtol=1e-5, atol=1e-6 * want_grad.abs().max().item(),
                                   msg=lambda text, name=name: f"{name}: {text}")


def _gathered_calls(monkeypatch) -> list[int]:
    """Counts the gathered-query kernel's calls (the real kernel runs: a spy, not a stand-in)."""
    from headwise.kernels import gathered_query

    calls = []
    apply = gathered_query.GatheredQueryAttentionFunction.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(gathered_query.GatheredQueryAttentionFunction, "apply", counted)
    return calls


def _random_routers(model, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moh_router." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("router,shared", [*ROUTED, ("learned", 0.375)])
def test_gathered_path_equals_the_masking_path(router, shared, monkeypatch):
    """Issue 21's skipping path: with the gathered-query kernel (Triton's interpreter here, CUDA on a GPU machine)
    each routed head computes only its chosen rows, and the logits and every gradient (routers and the
    straight-through path into q_proj included) equal the masking form's, which computes every head; in train and
    eval mode, on 40 tokens (several row tiles per head). With a padding mask the gathered form does not apply and
    the masking form runs instead."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = _gathered_calls(monkeypatch)
    stock = _routed_llama().float().to(device)
    ids = torch.randint(0, stock.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4)).to(device)
    gathered = _patched(stock, _cfg(router, shared=shared, compute="gathered"))
    masking = _patched(stock, _cfg(router, shared=shared, compute="masking"))
    _random_routers(gathered)
    _random_routers(masking)
    for model in (gathered, masking):
        model.train()
    got = _forward_backward(gathered, ids)
    assert len(calls) == stock.config.num_hidden_layers, "the gathered kernel did not run in every layer"
    n_masking = len(calls)
    want = _forward_backward(masking, ids)
    assert len(calls) == n_masking, "compute: masking ran the gathered kernel"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    masking_params = dict(masking.named_parameters())
    for name, p in gathered.named_parameters():
        want_grad = masking_params[name].grad
        scale = want_grad.abs().max().item()
        assert scale > 0, name
        # fp32 rounding of sums taken in another order, relative to the gradient's size (up to ~300 here)
        torch.testing.assert_close(p.grad, want_grad, rtol=0, atol=1e-5 * scale,
                                   msg=lambda text, name=name: f"{name}: {text}")
    gathered.eval()
    masking.eval()
    with torch.no_grad():
        torch.testing.assert_close(gathered(input_ids=ids).logits, masking(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)
        before = len(calls)
        padded = torch.ones_like(ids)
        padded[0, :5] = 0
        torch.testing.assert_close(gathered(input_ids=ids, attention_mask=padded).logits,
                                   masking(input_ids=ids, attention_mask=padded).logits, rtol=1e-5, atol=1e-5)
        assert len(calls) == before, "the gathered kernel ran under a padding mask"


def test_checkpointing_recompute_records_each_layer_once():
    """With activation checkpointing the backward runs every layer again: the layer's balance loss and head usage
    are those of the training forward, counted once (the recompute's graph is not kept)."""
    stock = _routed_llama()
    hooks = MoH(_cfg("query_norm", shared=0.5))
    model = copy.deepcopy(stock)
    hooks.prepare_model(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = _ids(model)
    logits = model(input_ids=ids, use_cache=False).logits
    recorded = dict(hooks.state.balance)
    logits.sum().backward()
    assert hooks.state.balance == recorded  # the same tensor objects: the recompute recorded nothing
    assert hooks.state.tokens == {layer: ids.numel() for layer in range(model.config.num_hidden_layers)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 attention kernels on a GPU")
@pytest.mark.parametrize("router,activation,shared", [("kv_group", 0.67, 0.33), ("query_norm", 0.75, 0.5)])
def test_gathered_path_in_bf16_on_smollm2_shapes(router, activation, shared):
    """SmolLM2-135M's attention shape (9 query heads over 3 KV heads, head_dim 64) in bf16 on 2048 tokens: the
    gathered form's layer output is finite and equals the masking form's to bf16 rounding, both for shared heads
    that fill whole KV groups (kv_group: SDPA on a head slice with GQA) and for those that do not (query_norm)."""
    from headwise.patches.moh.attention import gathered_attention
    from headwise.patches.moh.config import head_split

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, t, d = 1, 9, 3, 2048, 64

    def leaf(heads):
        return torch.randn(b, t, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)

    q, k, v = leaf(hq), leaf(hkv), leaf(hkv)
    cfg = _cfg(router, activation=activation, shared=shared)
    split = head_split(cfg, hq, hkv)
    _, _, chosen = moh_gates(cfg, q, n_kv_heads=hkv)
    chosen_heads = torch.cat([chosen.new_ones(b, t, split.n_shared * split.group),
                              chosen.repeat_interleave(split.group, dim=-1)], dim=-1)
    got = gathered_attention(q, k, v, chosen_heads, split.n_shared * split.group, None).float()
    want = _causal_attention(q.float(), k.float(), v.float(), d ** -0.5).transpose(1, 2) * chosen_heads[..., None]
    assert torch.isfinite(got).all(), [int((~torch.isfinite(got[..., h, :])).sum()) for h in range(hq)]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("router,hkv", [("query_norm", HQ), ("kv_group", 4)])
def test_tied_query_norms_route_uniformly(router, hkv):
    """Routed units whose query norms tie exactly (bf16 queries make this common with two units: SmolLM2's kv_group
    split gave NaN perplexity) get equal probabilities and finite gates, not inf / inf."""
    query = torch.full((1, HQ, 3, 4), 20.0)  # every unit's norm ties, and is large enough (> 4) that norm / fp32's tiny overflows
    cfg = _cfg(router, shared=0.25, activation=0.75)
    gates, probs, chosen = moh_gates(cfg, query, n_kv_heads=hkv)
    assert torch.isfinite(gates).all() and torch.isfinite(probs).all()
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / probs.shape[-1]))
    assert bool((chosen.sum(-1) == _split(_units(router, hkv), 0.75, 0.25)[1]).all())
