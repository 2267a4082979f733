"""headwise.patches, the middle floor: the method contract (`base`) and one folder per method.

Each method folder holds its recipe config, its attention function (registered with the transformers
attention registry under one neutral name, with its mask function) and its pipeline hooks, and
registers itself with `register_method`; importing this package registers every method. This floor
imports `headwise.kernels` and `headwise.data_builders`, never the core.
"""

# Registration order is the order the recipe reference lists the methods in.
from headwise.patches import sinklora as sinklora  # noqa: F401, I001  (registers method `sinklora`)
from headwise.patches import duo as duo  # noqa: F401  (registers method `duo`)
from headwise.patches.base import METHODS, HeadwiseError, Method, Section, method_configs, method_for, register_method

__all__ = ["METHODS", "HeadwiseError", "Method", "Section", "method_configs", "method_for", "register_method"]
