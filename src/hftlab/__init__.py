"""hftlab: the harmful fine-tuning pipeline (align → attack → defend → evaluate → analyse).

The Python API (:mod:`hftlab.api`): ``hftlab.run``, ``hftlab.sweep``, ``hftlab.compare``, and
``hftlab.RunMetrics`` (what ``metrics.json`` holds). Each is imported on first use, so
``import hftlab`` loads neither torch nor the plug-ins."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # the package version (pyproject reads it from here)
__all__ = ["RunMetrics", "__version__", "compare", "run", "sweep"]

if TYPE_CHECKING:
    from hftlab.api import compare, run, sweep
    from hftlab.run_metrics import RunMetrics


def _api_function(name: str) -> property:
    def get(package: types.ModuleType) -> Any:
        return getattr(importlib.import_module("hftlab.api"), name)

    def keep(package: types.ModuleType, value: Any) -> None:
        package.__dict__[name] = value  # stored, never returned: the getter wins

    return property(get, keep)


class _Package(types.ModuleType):
    # hftlab/sweep.py and hftlab/compare.py share the functions' names, and importing a
    # submodule sets it as the package's attribute: a property keeps the functions in place
    # (the modules stay importable: ``from hftlab.sweep import load_sweep``)
    run = _api_function("run")
    sweep = _api_function("sweep")
    compare = _api_function("compare")


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "RunMetrics":
        return importlib.import_module("hftlab.run_metrics").RunMetrics
    raise AttributeError(f"module 'hftlab' has no attribute '{name}'")
