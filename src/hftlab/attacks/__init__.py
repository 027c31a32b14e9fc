"""Attacks (data recipes), one file each, registered by name. Importing registers them all."""

import importlib
import pkgutil

from hftlab.attacks.base import ATTACKS, Attack, AttackInputs

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTACKS", "Attack", "AttackInputs"]
