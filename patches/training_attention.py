"""What every training-time attention patch shares (SinkLoRA, DuoAttention, ...).

A training patch registers one attention function under a neutral name, paired with transformers'
flash-style mask function (None, or a `(B, T)` padding mask: never a T x T tensor at long context;
without a registered mask function transformers silently drops padding masks). The model runs the
patch's attention in training and its own attention in eval mode, switched by a forward pre-hook on the
model, so `model.eval()` / `generate` are exactly the stock model.

A patch's layout composes with the layer's own attention (DESIGN.md, "Layout semantics"): `attend` runs it
intersected with the layer's sliding window, on soft-capped scores and with the layer's learned sink logits,
as `install_training_attention` read them from the model (`AttentionFacts`). Every call checks that what
transformers hands the attention function (`sliding_window`, `softcap`, `s_aux`) is what was read.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
from headwise.kernels import LayoutSpec, attention_with_learned_sinks, sparse_attention
from headwise.kernels.tensor_memo import LastTensorMemo
from headwise.patches.base import HeadwiseError
from headwise.patches.model_attention import LayerRules, attention_facts, attention_modules

RULES_ATTRIBUTE = "headwise_layer_rules"  # the LayerRules of an attention module

# The padding mask each layer gets, checked once per mask tensor (reading it on the host syncs the GPU).
_PADDING_CHECKED = LastTensorMemo()


def register_training_attention(name: str, fn: Callable) -> None:
    """Register `fn` and the flash-style mask function under `name`. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, flash_attention_mask)


def check_patchable(model: torch.nn.Module, method: str) -> None:
    """Refuse models whose attention does not go through the transformers attention registry."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and not getattr(type(model), "_supports_attention_backend", False):
        raise HeadwiseError(
            f"method {method}: {type(model).__name__} does not dispatch attention through the transformers "
            "attention registry, so it cannot be patched; use a Llama/Qwen/Mistral-style model"
        )


def install_training_attention(
    model: torch.nn.Module, name: str, on_forward: Callable[[torch.nn.Module], None] | None = None
) -> str:
    """Run attention `name` in training and the model's own attention in eval; returns the eval one.

    `on_forward(model)` runs before every forward (e.g. to reset per-forward state).
    """
    eval_impl = model.config._attn_implementation or "sdpa"
    if eval_impl == name:
        eval_impl = "sdpa"
    facts = attention_facts(model.config, model)
    for m in attention_modules(model):
        setattr(m, RULES_ATTRIBUTE, facts.layer_rules(m.layer_idx))
    model.config._attn_implementation = name

    def hook(module: torch.nn.Module, args: Any, kwargs: Any = None):
        module.config._attn_implementation = name if module.training else eval_impl
        if on_forward is not None:
            on_forward(module)

    model.register_forward_pre_hook(hook)
    return eval_impl


TrainingForward = Callable[..., torch.Tensor]


def training_attention(method: str) -> Callable[[TrainingForward], Callable[..., tuple[torch.Tensor, None]]]:
    """Make a method's training computation a transformers attention function.

    The decorated `forward(module, query, key, value, scaling, **kwargs)` takes q `(B, Hq, T, D)` after RoPE and
    k/v `(B, Hkv, T, D)` (not repeated) and returns `(B, T, Hq, D)`. The attention function built around it has
    transformers' signature `(module, query, key, value, attention_mask, *, scaling, dropout, **kwargs)`,
    refuses what a training patch cannot take (`check_training_call`) and runs the model's own SDPA in eval
    mode (`eval_sdpa`). `attention_mask` is the flash-style mask: None, or a `(B, T)` padding mask.
    """

    def wrap(forward: TrainingForward) -> Callable[..., tuple[torch.Tensor, None]]:
        @functools.wraps(forward)
        def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
            if not module.training:
                return eval_sdpa(method, module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                 **kwargs)
            check_training_call(method, query, key, attention_mask, dropout)
            check_layer_rules(method, module, kwargs)
            return forward(module, query, key, value, scaling, **kwargs), None

        return attention

    return wrap


def eval_sdpa(method: str, module, query, key, value, attention_mask, *, scaling, dropout, **kwargs):
    """The eval-mode branch of a training attention function: the model's own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        raise HeadwiseError(
            f"{method} attention in eval mode got a padding mask: call the model through its own forward "
            "(headwise switches eval to SDPA with a forward pre-hook), not the attention function directly"
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise HeadwiseError(
            f"{method} attention in eval mode got a logit softcap or learned sinks, which SDPA would drop: call the "
            "model through its own forward (its pre-hook switches eval to the model's own attention)"
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def check_training_call(method: str, query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float) -> None:
    """Inputs a training attention function cannot take: a KV cache, attention dropout, left padding."""
    if key.shape[2] != query.shape[2]:
        raise HeadwiseError(f"{method} training attention got a KV cache (key length != query length); set use_cache=False")
    if dropout:
        raise HeadwiseError(f"{method} attention does not implement attention dropout ({dropout}); set attention_dropout: 0")
    if attention_mask is not None and attention_mask.dim() == 2:
        _PADDING_CHECKED.get(attention_mask, method, lambda: _refuse_left_padding(method, attention_mask))


def _refuse_left_padding(method: str, attention_mask: torch.Tensor) -> None:
    valid = attention_mask.bool()
    # Right padding is exact for the real tokens (causality hides the padding from them); left
    # padding would let real tokens attend to pads.
    if bool((valid[:, :1] == 0).any() & valid.any(dim=1).all()):
        raise HeadwiseError(f"{method} training needs right padding or packed samples; the batch is left-padded")


def check_layer_rules(method: str, module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """What the model hands its attention function agrees with the rules read at patch time: a model whose config
    reader missed a window, a softcap or sinks is refused here instead of trained on something else."""
    rules: LayerRules | None = getattr(module, RULES_ATTRIBUTE, None)
    if rules is None:
        raise HeadwiseError(f"{method} attention: layer {getattr(module, 'layer_idx', '?')} was not prepared by the "
                            "method's prepare_model")
    given = {"sliding_window": (kwargs.get("sliding_window"), rules.window),
             "softcap": (kwargs.get("softcap"), rules.softcap),
             "learned sinks (s_aux)": (kwargs.get("s_aux") is not None, rules.learned_sinks)}
    for what, (passed, read) in given.items():
        if passed not in (None, False) and passed != read:
            raise HeadwiseError(f"{method} attention: layer {module.layer_idx} is called with {what} = {passed}, but "
                                f"the model's config says {read}; refusing to train something else than the model")


def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: LayoutSpec,
           scaling: float | None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """A method's layout composed with the layer's own attention: q `(B, Hq, T, D)`, k/v `(B, Hkv, T, D)` ->
    `(B, T, Hq, D)`.

    The layer's sliding window intersects the layout (`LayoutSpec.window`), its softcap caps the scores
    (`LayoutSpec.softcap`), its learned sink logits (`module.sinks`) join every query's softmax denominator
    (`attention_with_learned_sinks`, with their gradient)."""
    rules: LayerRules = getattr(module, RULES_ATTRIBUTE)
    spec = compose_layer_rules(spec, rules)
    if not rules.learned_sinks:
        return sparse_attention(query, key, value, spec, scale=scaling, cu_seqlens=cu_seqlens)
    out, lse = sparse_attention(query, key, value, spec, scale=scaling, cu_seqlens=cu_seqlens, return_lse=True)
    return attention_with_learned_sinks(out, lse, module.sinks)


def compose_layer_rules(spec: LayoutSpec, rules: LayerRules) -> LayoutSpec:
    """`spec` with the layer's window (the tighter of two windows) and softcap added. Dense causal attention in a
    window is the `sliding_window` layout, which has faster exact forms (kernels/dispatch.py)."""
    if spec.kind == "dense" and rules.window is not None:
        spec = LayoutSpec("sliding_window", window=rules.window)
    changes: dict[str, Any] = {}
    if rules.window is not None:
        changes["window"] = min(spec.window, rules.window) if spec.window else rules.window
    if rules.softcap is not None:
        changes["softcap"] = float(rules.softcap)
    return dataclasses.replace(spec, **changes) if changes else spec
