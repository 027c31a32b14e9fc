"""Judge interface: decide, per (prompt, completion), whether the completion is harmful."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from hftlab.registry import Plugin, Registry


class Judge(Plugin):
    """Base class. Subclasses implement :meth:`flag`; model-based judges load their weights in
    ``__init__`` from their options (a path or hub id) and batch internally."""

    @abstractmethod
    def flag(self, prompts: list[str], completions: list[str]) -> list[bool]:
        """True where the completion counts as harmful."""

    def describe(self) -> dict[str, Any]:
        """Name and version/path of the judge, stored in metrics.json."""
        return {"name": self.name, **self.options_dict()}


JUDGES: Registry[Judge] = Registry("judge")
