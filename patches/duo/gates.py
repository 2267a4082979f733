"""The trainable gates: one fp32 value per (layer, KV head), attached under each attention module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from headwise.patches.base import HeadwiseError
from headwise.patches.duo.config import DuoMethod
from headwise.patches.model_attention import attention_modules

GATE_MODULE = "duo_gate"  # module name under each attention module (PEFT `trainable_modules` suffix)


class DuoGate(torch.nn.Module):
    """The gates of one attention layer: one fp32 value per KV head (1 = full attention, 0 = streaming)."""

    def __init__(self, num_kv_heads: int, initial: float = 1.0, device=None):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.full((num_kv_heads,), float(initial), dtype=torch.float32, device=device))

    def values(self) -> torch.Tensor:
        return self.gate.clamp(0.0, 1.0)

    @torch.no_grad()
    def project(self) -> None:
        self.gate.clamp_(0.0, 1.0)


@dataclass
class DuoState:
    """Shared by the attention modules of one model: the teacher/student switch and the teacher's outputs."""

    config: DuoMethod
    mode: str = "student"  # "teacher": plain full attention, outputs kept per layer; "student": gated
    use_stash: bool = False
    stash: dict[int, torch.Tensor] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)  # distill / reg of the last step, for logging


def gate_modules(model: torch.nn.Module) -> list[DuoGate]:
    return [getattr(m, GATE_MODULE) for m in attention_modules(model) if hasattr(m, GATE_MODULE)]


def collect_gates(model: torch.nn.Module) -> torch.Tensor:
    """Clamped gates as a `(layers, kv_heads)` fp32 CPU tensor."""
    gates = gate_modules(model)
    if not gates:
        raise HeadwiseError("the model has no DuoAttention gates (method duo's prepare_model attaches them)")
    return torch.stack([g.values().detach().float().cpu() for g in gates])
