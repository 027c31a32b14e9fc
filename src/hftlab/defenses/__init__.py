"""Defenses, one file each, registered by name. Importing this package registers them all."""

import importlib
import pkgutil

from hftlab.defenses.base import ALIGNMENT, DEFENSES, FINETUNE, POST_FINETUNE, Defense

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ALIGNMENT", "DEFENSES", "FINETUNE", "POST_FINETUNE", "Defense"]
