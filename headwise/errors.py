"""The base of every user-facing headwise error: the CLI prints these as one line (no traceback)."""


class HeadwiseError(ValueError):
    """Bad input (recipe, file, model, option). The message names the field or file and the fix."""
