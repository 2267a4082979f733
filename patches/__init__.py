"""headwise.patches, the middle floor: the method contract (`base`) and one folder per method.

Each method folder holds its recipe config, its attention function (registered with the transformers
attention registry under one neutral name, with its mask function) and its pipeline hooks, and
registers itself with `register_method`. Importing this package imports every method folder, so a new
method is one folder and one `register_method` call. This floor imports `headwise.kernels` and
`headwise.data_builders`, never the core.
"""

import importlib
import pkgutil

from headwise.patches.base import METHODS, HeadwiseError, Method, Section, method_configs, method_for, register_method

# Every subpackage is a method folder; sorted, so the registry (and the recipe reference) has one order.
for _folder in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg):
    importlib.import_module(f"{__name__}.{_folder}")

__all__ = ["METHODS", "HeadwiseError", "Method", "Section", "method_configs", "method_for", "register_method"]
