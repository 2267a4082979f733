"""The pipeline hooks of `method: moh`: model checks, routers, the attention patch, the balance loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from headwise.patches.base import HeadwiseError, Method, register_method
from headwise.patches.model_attention import attention_facts, attention_modules, refuse_unsupported_attention
from headwise.patches.moh.attention import (
    ATTENTION_NAME,
    ROUTER_MODULE,
    MoHState,
    capture_hidden,
    register,
)
from headwise.patches.moh.config import MoHMethod, head_split
from headwise.patches.moh.routers import MoHRouter
from headwise.patches.moh.usage import usage_callback
from headwise.patches.training_attention import check_patchable

WAY_OUT = "use a model without it, or method: full"
ROUTERS_FILE = "moh_routers.safetensors"  # a merged export's learned routers, keyed by module path
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's file name (the core's ADAPTER_WEIGHTS_NAME)
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of a wrapped model's module paths
# Families whose attention normalises each head's query (q_norm, RMSNorm over head_dim), known from the config
# alone; with the modules at hand, an attention module with a `q_norm` is the ground truth.
QUERY_NORM_FAMILIES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2")


@register_method
class MoH(Method):
    """Hooks of `method: moh` (see patches/moh/routers.py for the routers and which reading each follows)."""

    config_class = MoHMethod
    config: MoHMethod
    # transformers' mask carries a layer's sliding window into SDPA; SDPA cannot apply a softcap or learned sinks
    attention_features = ("sliding_window", "fused_projections")

    def __init__(self, config: MoHMethod) -> None:
        super().__init__(config)
        self.state = MoHState(config)

    def check_model_config(self, model_config: Any, model: torch.nn.Module | None = None) -> None:
        facts = attention_facts(model_config, model)
        refuse_unsupported_attention(facts, "method moh", WAY_OUT, **dict.fromkeys(self.attention_features, True))
        split = head_split(self.config, facts.num_heads, facts.num_kv_heads)
        if self.config.router != "learned" and _normalises_queries(facts.model_type, model):
            # RMSNorm gives every head's query the same norm up to its weight vector: ranking heads by query norm
            # then routes by rounding noise and a per-head constant, not by the token
            raise HeadwiseError(f"method moh: router {self.config.router} ranks heads by their query's norm, which "
                                f"{facts.model_type}'s per-head query normalisation (q_norm) fixes; use router: "
                                "learned")
        if self.config.router == "kv_group" and facts.num_kv_heads == facts.num_heads:
            raise HeadwiseError("method moh: router kv_group routes GQA groups, but "
                                f"{facts.model_type} has one query head per KV head; use router query_norm")
        if split.k == 0 and split.n_routed:
            raise HeadwiseError(f"method moh: activation {self.config.activation} with shared {self.config.shared} "
                                f"routes none of the {split.n_routed} routed "
                                f"{'KV groups' if split.group > 1 else 'heads'} of {facts.model_type} (it would only "
                                "drop them); raise activation or lower shared")
        if split.k > split.n_routed:
            raise HeadwiseError(f"method moh: activation {self.config.activation} needs {split.k} routed units of "
                                f"{split.n_routed}")

    def prepare_model(self, model: torch.nn.Module) -> None:
        self.check_model_config(model.config, model)  # the Python path checks as the recipe path does
        check_patchable(model, "moh")
        register()
        facts = attention_facts(model.config, model)
        split = head_split(self.config, facts.num_heads, facts.num_kv_heads)
        hidden = model.config.get_text_config().hidden_size
        for m in attention_modules(model):
            m.headwise_moh = self.state  # plain attribute: the config and the per-forward records
            if self.config.router == "learned":
                if not hasattr(m, ROUTER_MODULE):
                    m.add_module(ROUTER_MODULE, MoHRouter(hidden, split, device=m.o_proj.weight.device,
                                                                  dtype=m.o_proj.weight.dtype))
                m.register_forward_pre_hook(capture_hidden, with_kwargs=True)
        model.config._attn_implementation = ATTENTION_NAME  # in training and eval: a MoH model is a new model
        model.register_forward_pre_hook(lambda module, args: self.state.clear())

    def modules_to_save(self) -> list[str]:
        return [ROUTER_MODULE] if self.config.router == "learned" else []

    def extra_loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        """`balance_weight` times the mean over layers of each layer's balance loss (the released code's form)."""
        if not self.state.balance or not self.config.balance_weight:
            return None
        per_layer = torch.stack([loss.float() for loss in self.state.balance.values()])
        return self.config.balance_weight * per_layer.mean()

    def callbacks(self, run_dir: str) -> list[Any]:
        return [usage_callback(run_dir, self.state)]

    def inference_attention(self, model_config: Any | None = None) -> dict[str, Any]:
        """The `moh` attention entry of headwise_inference.json: the router and shares (`balance_weight` weighs a
        training loss only, `compute` picks between two forms with the same outputs: neither is written), and,
        given the model's config, the head split they imply for it (what `headwise.load` checks the model
        against)."""
        entry: dict[str, Any] = {"name": "moh", "router": self.config.router, "activation": self.config.activation,
                                 "shared": self.config.shared}
        if model_config is not None:
            facts = attention_facts(model_config)
            split = head_split(self.config, facts.num_heads, facts.num_kv_heads)
            entry["heads"] = {"query_heads": facts.num_heads, "kv_heads": facts.num_kv_heads,
                              "unit": "kv_group" if self.config.router == "kv_group" else "head",
                              "shared": split.n_shared, "routed": split.n_routed, "active_routed": split.k}
        return entry

    def export_artifacts(self, weights_dir: Any, out_dir: Any) -> None:
        """Make the learned routers travel with the export. An adapter export holds them (PEFT's modules_to_save):
        checked here. Merged weights cannot (the model's class has no router modules, so `from_pretrained` would
        drop them): they are written to `moh_routers.safetensors`, keyed by module path
        (`model.layers.0.self_attn.moh_router.routed.weight`), from the run's adapter or full weights. The KV
        policy stays the recipe's (None)."""
        if self.config.router != "learned":
            return
        out_dir = Path(out_dir)
        adapter = out_dir / ADAPTER_WEIGHTS_NAME
        if adapter.is_file():
            if not _router_tensors([adapter]):
                raise HeadwiseError(f"{adapter} holds no learned router ({ROUTER_MODULE}) weights: the run did not "
                                    "save them with its adapter; train again")
            return
        sources = sorted(Path(weights_dir).glob("*.safetensors"))
        routers = _router_tensors(sources)
        if not routers:
            raise HeadwiseError(f"{weights_dir} holds no learned router ({ROUTER_MODULE}) weights in "
                                f"{', '.join(p.name for p in sources) or 'any safetensors file'}: the merged export "
                                "would run routers at their zero initialisation; export another checkpoint or train "
                                "again")
        from safetensors.torch import save_file

        save_file(routers, str(out_dir / ROUTERS_FILE))


def _normalises_queries(model_type: str, model: torch.nn.Module | None) -> bool:
    if model is not None and attention_modules(model):
        return any(hasattr(m, "q_norm") for m in attention_modules(model))
    return model_type in QUERY_NORM_FAMILIES


def _router_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """The learned routers' tensors in safetensors `files` (a PEFT adapter's or a model's), keyed by their module
    path in the model (PEFT's `base_model.model.` prefix dropped)."""
    from safetensors import safe_open

    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if f".{ROUTER_MODULE}." in f".{name}":
                    tensors[name.removeprefix(PEFT_PREFIX)] = f.get_tensor(name).contiguous()
    return tensors
