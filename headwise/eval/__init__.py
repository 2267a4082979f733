"""The evaluation wing: `headwise eval` (perplexity, passkey retrieval) and its plots."""

from headwise.errors import HeadwiseError


class EvalError(HeadwiseError):
    """An evaluation cannot run as asked; the message names the option and the fix."""
