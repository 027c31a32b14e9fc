"""The one record type every stage exchanges: a prompt, a response, and where it came from."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Example:
    """One prompt/response pair.

    ``prompt`` is the user turn as plain text (task instruction and input already joined);
    ``response`` is the assistant turn used as the training target, or the reference answer
    for evaluation (a label for classification tasks, may be empty for prompt-only sets).
    """

    prompt: str
    response: str = ""
    is_harmful: bool = False
    label: str | None = None
    source: str = ""
    row: int = -1
    meta: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Example:
        """A copy with ``changes`` applied (``meta`` copied, never shared)."""
        return dataclasses.replace(self, **{"meta": dict(self.meta), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        return cls(**d)


def normalize_prompt(text: str) -> str:
    """Key used to detect the same prompt across data sets (case and whitespace folded)."""
    return " ".join(text.lower().split())


class DataError(ValueError):
    """Bad data: the message names the file, the row and the fix."""


def check_no_shared_prompt(
    rows_a: list[Example], name_a: str, rows_b: list[Example], name_b: str,
    fix: str = "give them different files or disjoint offset/n slices",
) -> None:
    """DataError naming both rows (and how to ``fix`` it) when a row of ``rows_a`` has the prompt
    of a row of ``rows_b`` (case and whitespace folded): the two roles must be disjoint."""
    seen = {normalize_prompt(e.prompt): e for e in rows_b}
    for example in rows_a:
        other = seen.get(normalize_prompt(example.prompt))
        if other is not None:
            raise DataError(
                f"{name_a} row {example.row} ({example.source}) has the same prompt as "
                f"{name_b} row {other.row} ({other.source}); these roles must come from "
                f"disjoint rows: {fix}"
            )
