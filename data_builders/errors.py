"""The one exception type the data builders raise for user-fixable problems."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data a recipe points at (missing file, wrong format, missing field, ...).

    The message always names the offending file, field or row and says how to fix it, so the CLI can
    print it as is instead of a traceback.
    """
