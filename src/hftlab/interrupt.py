"""The one line an interrupted command (Ctrl-C) prints: the step it stopped in, what stays
saved (the training checkpoint the stage wrote last, the finished stages or runs) and the
command that resumes. A training stage notes its checkpoint folder here when it starts
(:func:`note_checkpoint`); the message reads the step saved there from disk, so a Ctrl-C that
falls within a save reports whichever checkpoint is committed."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from hftlab.checkpoint import checkpoint_step
from hftlab.progress import current

__all__ = ["SavedCheckpoint", "interrupted_message", "note_checkpoint"]


@dataclass(frozen=True)
class SavedCheckpoint:
    stage: str
    step: int  # the optimizer steps it holds
    folder: Path  # the stage's checkpoint folder (latest.json names the step)


_folders: list[tuple[str, Path]] = []  # the checkpoint folder of the latest stage that trained


def note_checkpoint(stage: str, folder: Path) -> None:
    _folders[:] = [(stage, folder)]


def last_checkpoint() -> SavedCheckpoint | None:
    """The checkpoint committed in the latest training stage's folder, if there is one (a
    finished stage deletes its checkpoints: then the stage's own result is what is saved)."""
    if not _folders:
        return None
    stage, folder = _folders[0]
    step = checkpoint_step(folder)
    return None if step is None else SavedCheckpoint(stage, step, folder)


def interrupted_message(argv: list[str]) -> str:
    """``hftlab: interrupted during alignment (16 rows) at step 40/180; saved: checkpoint at
    step 20 in runs/x/align/checkpoint, finished stages; resume: hftlab run cfg.yaml``."""
    where = ""
    step = current()
    if step is not None:
        where = f" during {step.desc} at {step.unit} {step.n}/{step.total}"
    finished = "finished runs and stages" if argv[:1] == ["sweep"] else "finished stages"
    saved = last_checkpoint()
    kept = (f"checkpoint at step {saved.step} in {saved.folder}, {finished}"
            if saved is not None else finished)
    return f"hftlab: interrupted{where}; saved: {kept}; resume: {shlex.join(['hftlab', *argv])}"
