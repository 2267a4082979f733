"""Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, how CI tests them).

Kept apart from the kernels so the dispatch can ask without importing Triton.
"""

from __future__ import annotations

import os


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
