"""The base of every user-facing headwise error: the CLI prints these as one line (no traceback).

Defined at the bottom floor (`headwise.patches.base`), so methods raise the same class the core does.
"""

from headwise.patches.base import HeadwiseError

__all__ = ["HeadwiseError"]
