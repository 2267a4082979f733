"""The pipeline hooks of `method: sinklora`: model checks, the attention patch, LoRA+ modules."""

from __future__ import annotations

from typing import Any

import torch
from headwise.patches.base import ATTENTION_FEATURES, HeadwiseError, Method, register_method
from headwise.patches.sinklora.attention import ATTENTION_NAME, register
from headwise.patches.sinklora.config import SinkLoRAMethod
from headwise.patches.model_attention import attention_facts, attention_modules, refuse_unsupported_attention
from headwise.patches.training_attention import check_patchable, install_training_attention

WAY_OUT = "train it with `method: full` (the model's own attention) or use a model without it"


@register_method
class SinkLoRA(Method):
    """Hooks of `method: sinklora` (see the module docstring for the algorithm)."""

    config_class = SinkLoRAMethod
    # SF-Attn acts on q, k, v after the projections; window, softcap and sinks compose in `attend`
    attention_features = ATTENTION_FEATURES
    config: SinkLoRAMethod

    def check_model_config(self, model_config: Any, model: torch.nn.Module | None = None) -> None:
        refuse_unsupported_attention(attention_facts(model_config, model), "method sinklora", WAY_OUT,
                                     **dict.fromkeys(self.attention_features, True))
        if not getattr(model_config, "num_attention_heads", 0) or getattr(model_config, "num_attention_heads") < 2:
            raise HeadwiseError("method sinklora needs at least 2 attention heads (half of them are shifted)")

    def prepare_model(self, model: torch.nn.Module) -> None:
        self.check_model_config(model.config, model)  # the Python path checks as the recipe path does
        check_patchable(model, "sinklora")
        register()
        # The config rides on each attention module (not on model.config, which is serialised).
        for m in attention_modules(model):
            m.headwise_sinklora = self.config
        install_training_attention(model, ATTENTION_NAME)

    def modules_to_save(self) -> list[str]:
        return ["embed_tokens", "norm"] if self.config.train_embeddings_and_norms else []
