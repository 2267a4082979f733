"""`python -m headwise` (and `accelerate launch -m headwise train RECIPE`)."""

import sys

from headwise.cli import main

sys.exit(main())
