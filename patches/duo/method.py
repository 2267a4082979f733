"""The pipeline hooks of `method: duo`: model checks, gates and the attention patch, haystack data, the
distillation loss, the gate callback, and the export of the head pattern and its KV policy."""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any

import torch
from headwise.data_builders.passkey import build_duo_training_set
from headwise.patches.base import ATTENTION_FEATURES, HeadwiseError, Method, register_method
from headwise.patches.duo.attention import ATTENTION_NAME, _reset_per_forward, register
from headwise.patches.duo.callback import _gate_callback
from headwise.patches.duo.config import DuoMethod
from headwise.patches.duo.gates import (
    GATE_MODULE,
    DuoGate,
    DuoState,
    gate_modules,
)
from headwise.patches.duo.pattern_files import (
    GATE_LOG,
    PATTERN_DIR,
    averaged_gates,
    duo_policy,
    gates_from_weights,
    write_pattern_dir,
)
from headwise.patches.duo.training_data import right_pad_collator
from headwise.patches.model_attention import attention_facts, attention_modules, refuse_unsupported_attention
from headwise.patches.training_attention import check_patchable, install_training_attention

WAY_OUT = "train it with `method: full` (the model's own attention) or use a model without it"


def _trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder trunk (without lm_head) of a causal LM, PEFT- or DDP-wrapped or not."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if inner is None or inner is base:
        raise HeadwiseError(f"method duo: cannot find the decoder trunk of {type(base).__name__}")
    return inner


@register_method
class DuoAttention(Method):
    """Hooks of `method: duo` (see the module docstring)."""

    config_class = DuoMethod
    # the gates act after the projections; both terms are the layer's own attention (`attend`)
    attention_features = ATTENTION_FEATURES
    config: DuoMethod

    def __init__(self, config: DuoMethod) -> None:
        super().__init__(config)
        self.state = DuoState(config)

    def check_model_config(self, model_config: Any, model: torch.nn.Module | None = None) -> None:
        refuse_unsupported_attention(attention_facts(model_config, model), "method duo", WAY_OUT,
                                     **dict.fromkeys(self.attention_features, True))

    def prepare_model(self, model: torch.nn.Module) -> None:
        self.check_model_config(model.config, model)  # the Python path checks as the recipe path does
        check_patchable(model, "duo")
        register()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        mods = attention_modules(model)
        if not mods:
            raise HeadwiseError(f"method duo: {type(model).__name__} has no attention modules (modules with a layer_idx and an o_proj)")
        for m in mods:
            if not hasattr(m, GATE_MODULE):
                device = m.o_proj.weight.device
                m.add_module(GATE_MODULE, DuoGate(n_kv, self.config.initial_gate, device=device))
            m.headwise_duo = self.state  # plain attribute (not a module): shared switch and teacher outputs
        install_training_attention(model, ATTENTION_NAME, on_forward=_reset_per_forward(self.state))

    def modules_to_save(self) -> list[str]:
        return [GATE_MODULE]

    def training_data(self, recipe, tokenizer):
        h = self.config.haystack
        ctx = recipe.model.context_length
        if ctx is not None and h.max_tokens > ctx:
            raise HeadwiseError(f"method.haystack.max_tokens ({h.max_tokens}) exceeds model.context_length ({ctx})")
        ds = build_duo_training_set(
            tokenizer, h.num_samples, min_tokens=h.min_tokens, max_tokens=h.max_tokens, n_keys=h.n_keys,
            seed=recipe.training.seed, key_format=h.key_format, words_per_key=h.words_per_key, filler=h.filler,
            label_span=h.label_span,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return ds, right_pad_collator(pad)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]):
        """Distillation MSE over the labelled positions + gate_lambda * mean |gate| (replaces the LM loss)."""
        trunk = _trunk(model)
        trunk.config._attn_implementation = ATTENTION_NAME  # the trunk call skips the model's pre-hook
        kw = {"input_ids": inputs["input_ids"], "use_cache": False}
        if inputs.get("attention_mask") is not None:
            kw["attention_mask"] = inputs["attention_mask"]
        if inputs.get("position_ids") is not None:
            kw["position_ids"] = inputs["position_ids"]
        st = self.state
        st.stash.clear()
        st.mode, st.use_stash = "teacher", False
        try:
            with torch.no_grad():
                teacher = trunk(**kw).last_hidden_state
        finally:
            st.mode = "student"
        st.use_stash = True  # kept on for the backward pass (activation checkpointing re-runs the forward)
        student = trunk(**kw).last_hidden_state
        labels = inputs.get("labels")
        per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (B, T)
        if labels is not None and bool((labels != -100).any()):
            distill = per_token[labels != -100].mean()
        elif inputs.get("attention_mask") is not None:
            distill = per_token[inputs["attention_mask"].bool()].mean()
        else:
            distill = per_token.mean()
        gates = torch.cat([g.gate for g in gate_modules(model)])
        reg = gates.abs().mean()
        loss = distill + self.config.gate_lambda * reg.to(distill.device)
        st.last = {"distill_loss": float(distill.detach()), "reg_loss": float(reg.detach())}
        return loss, {"last_hidden_state": student}

    def callbacks(self, run_dir: str) -> list[Any]:
        return [_gate_callback(run_dir, weakref.ref(self.state), self.config.average_last)]

    # ---- export

    def export_weights(self) -> str | None:
        return "base"  # the model is the unchanged base model; only the head pattern is new

    def exported_kv_policy(self) -> str | None:
        return "duo"

    def export_artifacts(self, weights_dir: Path, out_dir: Path):
        """Write the DuoAttention pattern folder; return the `duo` KV policy for headwise_inference.json
        (at `method.streaming_fraction`, or `method.threshold`: `headwise export RUN method.threshold=0.5`)."""
        cfg = self.config
        extra = {"headwise_method": "duo", "reg_weight": cfg.gate_lambda}
        if cfg.average_last > 0:
            weights_dir = Path(weights_dir)
            step = re.fullmatch(r"checkpoint-(\d+)", weights_dir.name)
            shape = tuple(gates_from_weights(weights_dir).shape)  # the run's own grid: layers x KV heads
            gates = averaged_gates(weights_dir.parent / GATE_LOG, cfg.average_last, int(step.group(1)) if step else None,
                                   expected_shape=shape)
            extra["gates"] = f"mean over the last {cfg.average_last:g} of training (headwise method.average_last)"
        else:
            gates = gates_from_weights(weights_dir)
        write_pattern_dir(gates, Path(out_dir) / PATTERN_DIR, sink=cfg.sink, recent=cfg.recent, extra=extra)
        return duo_policy(gates, streaming_fraction=cfg.streaming_fraction, threshold=cfg.threshold, sink=cfg.sink,
                          recent=cfg.recent)
