"""Attack interface: a recipe that builds the user's fine-tuning data set."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from hftlab.data.records import Example
from hftlab.registry import Plugin, Registry


@dataclass
class AttackInputs:
    """What the user has: benign task rows (already in prompt form) and harmful QA pairs."""

    task: list[Example]
    harmful: list[Example]
    n: int
    poison_ratio: float
    seed: int


class Attack(Plugin):
    @abstractmethod
    def build(self, inputs: AttackInputs) -> list[Example]:
        """The user's data set; each row's ``is_harmful`` says whether it is a harmful row."""

    def describe(self, data: list[Example]) -> dict[str, Any]:
        """Parameters and counts recorded in the run folder (never the harmful text)."""
        return {
            "attack": self.name,
            "options": self.options_dict(),
            "n": len(data),
            "n_harmful": sum(e.is_harmful for e in data),
        }


ATTACKS: Registry[Attack] = Registry("attack")
