"""The pipeline's stages, one module each (data, align, finetune, repair, eval), and the names
they share. This module imports nothing of the run (no context, no models), so the trainer and
the defenses can name stages without an import cycle.

A stage's folder in a run and the name its defense hooks receive differ for one stage only
(folder ``align``, hook ``alignment``): :class:`Stage` is the one place that maps them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from hftlab.utils import stable_hash


class Stage(StrEnum):
    """A pipeline stage; its value is its folder in the run directory (on disk, unchanged)."""

    DATA = "data"
    ALIGN = "align"
    FINETUNE = "finetune"
    REPAIR = "post_finetune"
    EVAL = "eval"

    @property
    def hook(self) -> str:
        """The name a defense's hooks receive for this stage (their ``stage`` argument, the
        trainer's ``stage``, checkpoints' ``stage`` field)."""
        return _HOOK_NAMES.get(self, self.value)

    @classmethod
    def of_hook(cls, name: str) -> Stage:
        """The stage whose hooks receive ``name`` (``"alignment"`` → :attr:`ALIGN`)."""
        for stage in cls:
            if stage.hook == name:
                return stage
        raise ValueError(f"no pipeline stage has the hook name {name!r}")


_HOOK_NAMES = {Stage.ALIGN: "alignment"}

STAGES: tuple[Stage, ...] = tuple(Stage)  # in the order they run
MARKER = "stage.json"  # a finished stage's record, written last into its folder
CHECKPOINTS = "checkpoint"  # a training stage's resumable state (config checkpoint_every)
USER_DATA = "user_data.jsonl"  # the data stage's output: the rows the fine-tuning trains on


def versioned_key(fields: dict[str, Any], version: int) -> str:
    """A cache key: 16 hex digits of the hash of ``fields``. Version 1 is the layout every key
    had before keys were versioned and is hashed without a version field, so the caches made
    then stay valid; a bumped version enters the hash (and misses the old entries)."""
    if version != 1:
        fields = {**fields, "key_version": version}
    return stable_hash(fields)[:16]
