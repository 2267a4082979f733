"""A value computed from a tensor, remembered while the same tensor comes back unchanged.

Every layer of a forward (and of its recompute under gradient checkpointing) gets the same small
tensors: the packed sequences' boundaries, the position ids, the padding mask. Reading one on the host
synchronises the GPU, so the attention code reads each once per forward, not once per layer, through
a `LastTensorMemo`: the last tensor seen (by identity, held weakly) with its version counter, so a
tensor changed in place is read again.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

import torch


class LastTensorMemo:
    """Remembers ``compute()`` for the last (tensor, key) it was asked about."""

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref, tuple, Any] | None = None

    def get(self, tensor: torch.Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``'s value for ``tensor`` and ``key``: remembered from the previous call when
        that call had the same tensor object, unchanged since (its version counter), and the same key."""
        full_key = (tensor._version, key)
        if self._entry is not None and self._entry[0]() is tensor and self._entry[1] == full_key:
            return self._entry[2]
        value = compute()  # raises leave the previous entry as it was
        self._entry = (weakref.ref(tensor), full_key, value)
        return value
