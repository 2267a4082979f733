"""The pipeline hooks of `method: sinklora`: model checks, the attention patch, LoRA+ modules."""

from __future__ import annotations

from typing import Any

import torch

from headwise.patches.base import HeadwiseError, Method, register_method
from headwise.patches.sinklora.attention import ATTENTION_NAME, register
from headwise.patches.sinklora.config import SinkLoRAMethod
from headwise.patches.training_attention import check_patchable, install_training_attention


@register_method
class SinkLoRA(Method):
    """Hooks of `method: sinklora` (see the module docstring for the algorithm)."""

    name = "sinklora"
    config_class = SinkLoRAMethod
    config: SinkLoRAMethod

    def check_model_config(self, model_config: Any) -> None:
        model_type = getattr(model_config, "model_type", "?")
        if getattr(model_config, "use_sliding_window", False) and getattr(model_config, "sliding_window", None):
            raise HeadwiseError(f"method sinklora: {model_type} uses sliding-window attention layers, which SF-Attn would override; disable use_sliding_window")
        if getattr(model_config, "attn_logit_softcapping", None):
            raise HeadwiseError(f"method sinklora: {model_type} uses attention logit soft-capping, which the sparse kernels do not implement")
        if not getattr(model_config, "num_attention_heads", 0) or getattr(model_config, "num_attention_heads") < 2:
            raise HeadwiseError("method sinklora needs at least 2 attention heads (half of them are shifted)")

    def prepare_model(self, model: torch.nn.Module) -> None:
        check_patchable(model, "sinklora")
        register()
        # The config rides on each attention module (not on model.config, which is serialised).
        for m in model.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "q_proj"):
                m.headwise_sinklora = self.config
        install_training_attention(model, ATTENTION_NAME)

    def modules_to_save(self) -> list[str]:
        return ["embed_tokens", "norm"] if self.config.train_embeddings_and_norms else []
