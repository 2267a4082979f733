"""LoRA's forward with the adapter's output added inside one GEMM (`fuse_lora_forward`).

PEFT's vanilla LoRA forward is ``result = base(x) + lora_B(lora_A(dropout(x))) * scaling``. Each adapted
projection therefore writes three more tensors of the projection's full output size: lora_B's output,
its product with ``scaling``, and the sum. The backward of the product is one more elementwise pass.
At long context these passes are memory-bound work the size of the activations. For a
Llama-3-8B-shaped q/k/v/o LoRA at 32K tokens, that is about 2.5 GiB of traffic per layer and per
forward (run twice under gradient checkpointing).

The fused forward computes the same sum with one in-place GEMM on the base output:
``result.addmm_(lora_A(x), (scaling * B).T)``. The scaling goes onto the tiny (out, r) B weight, and
the base output is read and written once. Its autograd graph is the GEMMs' own (addmm's gradient
with respect to the base output passes through, unscaled), so LoRA's gradients are those of PEFT's
formula.

Only the plain case is fused, and the check runs at every call: one active adapter, vanilla LoRA
(no DoRA or other variant, no LoRA bias), no dropout, and a plain `nn.Linear` base that is not
merged, not disabled and not a ZeRO-3 partition (whose B weight exists only inside its own forward).
Anything else runs PEFT's own forward unchanged.

Dtypes: with input, adapter and base of one dtype the sum is PEFT's up to the rounding of one fused
GEMM. PEFT keeps adapters in fp32 on a bf16/fp16 base (`autocast_adapter_dtype`). Its forward then
casts the whole (T, in) input to fp32 and adds an fp32 (T, out) branch, which costs more than the
base projection's own traffic. The fused path instead casts the adapter's small factors to the
input's and output's dtype, as autocast does. The adapter's GEMMs then run in bf16 with fp32
accumulation, and the fp32 parameters get fp32 gradients.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_ORIGINAL = "_headwise_peft_forward"


def _plain_adapter(module: torch.nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The adapter name when this call can take the fused path, else None."""
    if args or kwargs or module.disable_adapters or module.merged or type(module.base_layer) is not torch.nn.Linear:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    a, b = module.lora_A[name], module.lora_B[name]
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity) or b.bias is not None:
        return None
    if hasattr(b.weight, "ds_id") or not (x.is_floating_point() and a.weight.is_floating_point()):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x)
    a = self.lora_A[name].weight  # (r, in)
    # The adapter's small factors go to the input's and the output's dtype, not the (T, in) input to
    # theirs: PEFT keeps adapters in fp32 on a bf16 base and would cast the whole input up.
    low = torch.nn.functional.linear(x, a if a.dtype == x.dtype else a.to(x.dtype))  # (..., r)
    scaled_b = (self.lora_B[name].weight * self.scaling[name]).to(result.dtype)  # (out, r)
    result.view(-1, result.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]).to(result.dtype), scaled_b.t())
    return result


def fuse_lora_forward(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA `Linear` of `model` the fused forward; returns how many were patched.

    Idempotent; modules whose calls are not the plain case fall back to PEFT's forward per call."""
    from peft.tuners.lora import Linear as LoraLinear

    patched = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, _ORIGINAL):
            setattr(module, _ORIGINAL, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    return patched
