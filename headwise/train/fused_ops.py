"""Liger-Kernel's fused RMSNorm, SwiGLU MLP and rotary embedding for training (`training.liger_kernels`).

A long-context LoRA step spends a large share of its time outside attention and outside the big
matmuls: transformers' RMSNorm, SiLU x up and rotary embedding are chains of pure-torch elementwise
ops, each reading and writing the whole (T, hidden) activation. With gradient checkpointing they run
three times per step (forward, recompute, backward). Liger-Kernel replaces each chain with one Triton
kernel. That speeds up every method and the dense baseline alike, so it changes what "attention made
free" can reach, not how attention methods compare. `benchmarks/bench_train.py --liger` measures it.

Liger's kernels are CUDA-only (they do not run under the Triton interpreter), so the option is
checked before any weights load: CUDA, liger-kernel installed, and a model type Liger supports.
The swap happens on the loaded model before the PEFT wrap. Weights and module names are unchanged,
so LoRA targets, trainable norms and the saved checkpoint are as without it.

Liger patches by rebinding the model family's module-level names (`LlamaRMSNorm`, `LlamaMLP`,
`apply_rotary_pos_emb`), which would give every model of that family built later in the process
Liger's CUDA-only ops, a CPU evaluation model included. `apply_liger_kernels` confines it: the
module-level classes are restored once this instance's modules are swapped, and the rotary function,
which the attention layers look up by module-level name at call time, becomes one that runs Liger's
kernel on CUDA tensors and the family's own function on any other device.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable

import torch

from headwise.errors import HeadwiseError

FIELD = "training.liger_kernels"
FUSED = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}


def _apply_fns() -> dict[str, Any]:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise HeadwiseError(f"{FIELD} needs liger-kernel: pip install 'headwise[liger]' (or set {FIELD}: false)") from None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def check_liger_kernels(model_type: str, device_type: str) -> None:
    """Raise a HeadwiseError naming the field unless Liger's fused ops can run for this model here."""
    if device_type != "cuda":
        raise HeadwiseError(f"{FIELD} needs a CUDA GPU (Liger's Triton kernels do not run on {device_type}); "
                            f"set {FIELD}: false")
    fns = _apply_fns()
    if model_type not in fns:
        raise HeadwiseError(f"{FIELD}: Liger-Kernel has no fused ops for model type {model_type!r} "
                            f"(it supports {', '.join(sorted(fns))}); set {FIELD}: false")


def apply_liger_kernels(model: torch.nn.Module) -> None:
    """Swap the model's RMSNorm, SwiGLU MLP and rotary embedding for Liger's fused kernels, in place.

    `model` is the loaded (not yet PEFT-wrapped) causal LM; call `check_liger_kernels` first."""
    fn = _apply_fns()[model.config.model_type]
    params = inspect.signature(fn).parameters
    modeling = sys.modules[type(model).__module__]
    before = dict(vars(modeling))
    fn(model=model, **{k: v for k, v in FUSED.items() if k in params})
    for name, value in before.items():
        patched = getattr(modeling, name)
        if patched is value:
            continue
        # a function, or (transformers >= 5.25, with the `kernels` package) a callable module that the Hub's kernels
        # can replace, such as `apply_rotary_pos_emb`: Liger's replacement then runs on CUDA tensors only
        if _is_function_like(value) and _is_function_like(patched):
            setattr(modeling, name, _on_cuda_only(patched, value))
        else:
            setattr(modeling, name, value)


def _is_function_like(value: Any) -> bool:
    return callable(value) and not inspect.isclass(value)


def _on_cuda_only(fused: Callable, original: Callable) -> Callable:
    """`fused` for CUDA tensors, `original` otherwise (decided by the first tensor argument)."""
    original = getattr(original, "__wrapped_original__", original)  # a second apply does not nest

    @functools.wraps(original, updated=())  # a callable module's __dict__ (its parameters) stays its own
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return (fused if first is not None and first.is_cuda else original)(*args, **kwargs)

    dispatch.__wrapped_original__ = original
    return dispatch
