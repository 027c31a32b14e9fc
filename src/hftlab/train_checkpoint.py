"""Checkpoints of a training stage: the trainer's state every k optimizer steps and every m
minutes, saved as one committed unit without pickle (:mod:`hftlab.checkpoint`) and restored so
that a resumed stage reaches the same weights an uninterrupted one does.
:class:`CheckpointedTrainer` is the part of :class:`hftlab.train.SFTTrainer` that saves and
restores them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from hftlab import checkpoint
from hftlab.config import ConfigError
from hftlab.interrupt import note_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hftlab.defenses.base import Defense

log = logging.getLogger(__name__)


@runtime_checkable
class Resumable(Protocol):
    """An ``on_step`` callback whose state travels with the trainer's checkpoints."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...



@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # one per optimizer step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


@dataclass
class StageRun:
    """What a checkpoint holds besides the trainer's own fields: the parameters by name (named
    before a defense may freeze some), the schedule, the result so far, the step callback and
    the stage's size (to refuse a checkpoint of another stage)."""

    named: list[tuple[str, torch.nn.Parameter]]
    scheduler: Any
    result: TrainResult
    on_step: Any
    n_items: int
    total_steps: int


class CheckpointedTrainer:
    """Saving and restoring a stage's state; the trainer sets these fields."""

    accelerator: Accelerator
    stage: str
    defense: Defense
    step: int
    resumed_from: int
    optimizer: torch.optim.Optimizer | None
    checkpoint_dir: Path | None
    checkpoint_every: int
    checkpoint_minutes: float
    last_save: float  # time.monotonic() of the stage's start or its latest save

    def checkpoint_due(self, total_steps: int) -> bool:
        """Whether to save after this step: every ``checkpoint_every`` steps, and whenever
        ``checkpoint_minutes`` passed since the last save (every process decides alike)."""
        if self.checkpoint_dir is None or self.step >= total_steps:
            return False
        if self.checkpoint_every > 0 and self.step % self.checkpoint_every == 0:
            return True
        if self.checkpoint_minutes <= 0:
            return False
        due = time.monotonic() - self.last_save >= 60 * self.checkpoint_minutes
        if self.accelerator.num_processes > 1:  # clocks differ: save when any process is due
            flags = self.accelerator.gather(torch.tensor([float(due)],
                                                         device=self.accelerator.device))
            due = bool(flags.max() > 0)
        return due

    def save_checkpoint(self, run: StageRun) -> None:
        """Write the stage's state after ``self.step`` optimizer steps into a new step folder
        (each process its random generators, then the main process the rest) and commit it
        by switching the checkpoint's pointer (see :mod:`hftlab.checkpoint`)."""
        assert self.checkpoint_dir is not None and self.optimizer is not None
        started = time.perf_counter()
        root = self.checkpoint_dir
        folder = checkpoint.step_folder(root, self.step)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint.write_state(folder, checkpoint.rng_name(self.accelerator.process_index),
                               {"step": self.step, **checkpoint.rng_state()})
        self.accelerator.wait_for_everyone()  # every process's file before the pointer names it
        callback = run.on_step if isinstance(run.on_step, Resumable) else None
        if self.accelerator.is_main_process:
            size = checkpoint.write_state(folder, checkpoint.MAIN_STATE, {
                "format": checkpoint.FORMAT,
                "stage": self.stage,
                "step": self.step,
                "total_steps": run.total_steps,
                "n_items": run.n_items,
                "world": self.accelerator.num_processes,
                "params": {name: p.detach() for name, p in run.named},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "result": {"tokens": run.result.tokens, "seconds": run.result.seconds,
                           "losses": list(run.result.losses)},
                "defense": self.defense.state_dict(self.stage),
                "callback": callback.state_dict() if callback is not None else None,
            })
            checkpoint.commit(root, folder, self.step)
            log.info("%s: checkpoint at step %d of %d (%.0f MB, %.1f s) in %s", self.stage,
                     self.step, run.total_steps, size / 2**20, time.perf_counter() - started,
                     folder)
        self.accelerator.wait_for_everyone()
        self.last_save = time.monotonic()

    def load_checkpoint(self, run: StageRun) -> int:
        """Restore the state saved by :meth:`save_checkpoint` if the checkpoint folder has a
        committed one (after the defense's setup, which sees the stage's starting weights),
        after removing what an interrupted save left; the number of optimizer steps it had
        done, 0 for a fresh start. A checkpoint of another stage, schedule or format, or a
        damaged one, stops the stage with one ConfigError that says to delete the folder."""
        if self.checkpoint_dir is None:
            return 0
        root = self.checkpoint_dir
        note_checkpoint(self.stage, root)  # what a Ctrl-C reports as saved
        fix = f"delete {root} to start the stage over"
        folder = checkpoint.committed_folder(root, fix)
        if self.accelerator.is_main_process:
            checkpoint.remove_uncommitted(root, keep=folder)
        self.accelerator.wait_for_everyone()
        if folder is None:
            return 0
        assert self.optimizer is not None
        state = checkpoint.read_state(folder, checkpoint.MAIN_STATE, fix)
        path = folder / f"{checkpoint.MAIN_STATE}.json"
        expected = {
            "format": checkpoint.FORMAT, "stage": self.stage, "total_steps": run.total_steps,
            "n_items": run.n_items, "world": self.accelerator.num_processes,
        }
        shapes = {name: tuple(p.shape) for name, p in run.named}
        saved = {name: tuple(t.shape) for name, t in state["params"].items()}
        wrong = [k for k, v in expected.items() if state.get(k) != v]
        if wrong or shapes != saved:
            what = ", ".join(f"{k} {state.get(k)!r} (this run: {expected[k]!r})" for k in wrong)
            raise ConfigError(
                f"{path}: a training checkpoint that does not match this stage "
                f"({what or 'other trainable parameters'}); {fix}"
            )
        rank = self.accelerator.process_index
        rng = checkpoint.read_state(folder, checkpoint.rng_name(rank), fix)
        if rng.get("step") != state["step"]:
            raise ConfigError(f"{folder / checkpoint.rng_name(rank)}.json: from step "
                              f"{rng.get('step')}, not {state['step']} as {path}; {fix}")
        with torch.no_grad():
            for name, p in run.named:
                p.copy_(state["params"][name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        self.defense.load_state_dict(self.stage, state["defense"])
        if isinstance(run.on_step, Resumable) and state["callback"] is not None:
            run.on_step.load_state_dict(state["callback"])
        run.result.tokens = int(state["result"]["tokens"])
        run.result.seconds = float(state["result"]["seconds"])
        run.result.losses = list(state["result"]["losses"])
        checkpoint.set_rng_state(rng)
        self.step = self.resumed_from = int(state["step"])
        log.info("%s: resuming from step %d of %d (%s)", self.stage, self.step,
                 run.total_steps, folder)
        return self.step
