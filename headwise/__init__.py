"""headwise: fine-tune Hugging Face causal LMs with head-wise efficient attention from YAML recipes.

    headwise train quickstart          # or: accelerate launch -m headwise train RECIPE
    headwise export runs/quickstart
    loaded = headwise.load("runs/quickstart/export"); loaded.generate("...")
"""

from headwise.version import __version__


def load(*args, **kwargs):
    """Load a headwise export (or any causal LM) with its KV policy; see `headwise.inference.load`."""
    # lazy: transformers and torch load on first use
    from headwise.inference.load import load as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "load"]
