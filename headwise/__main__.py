"""`python -m headwise` (and `accelerate launch -m headwise train RECIPE`)."""

import sys
from pathlib import Path

# From a headwise checkout, `-m` puts the working directory first on sys.path, where the top-level `kernels/`
# folder (the sources of headwise.kernels) would shadow the PyPI package `kernels`, which transformers (>= 5.25)
# imports; headwise's own modules come from the installed package.
_CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _CHECKOUT]

from headwise.cli import main  # noqa: E402

sys.exit(main())
