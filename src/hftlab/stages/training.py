"""What the two training stages (align, finetune) share: one trainer run with the stage's
settings, the run's defense and a view of the run's data for its hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hftlab.data.records import Example
from hftlab.mechanisms import MechanismTracker
from hftlab.stages import CHECKPOINTS, Stage
from hftlab.train import RunView, SFTTrainer, TrainResult

if TYPE_CHECKING:
    from hftlab.config import TrainConfig
    from hftlab.context import RunContext
    from hftlab.defenses.base import Defense


def run_view(ctx: RunContext, stage: Stage, alignment: list[Example],
             provider_harmful: list[Example]) -> RunView:
    """What a training stage's defense hooks may read of the run."""
    return RunView(alignment=alignment, provider_harmful=provider_harmful,
                   tokenize=ctx.tokenize, folder=ctx.stage_dir(stage), is_main=ctx.is_main)


def make_trainer(ctx: RunContext, model: torch.nn.Module, train_cfg: TrainConfig, stage: Stage,
                 defense: Defense, seed: int, view: RunView,
                 checkpoints: str = CHECKPOINTS) -> SFTTrainer:
    """A trainer for ``stage`` that checkpoints into the stage folder's ``checkpoints``."""
    return SFTTrainer(
        model, train_cfg, ctx.accelerator, ctx.tokenizer.pad_token_id, stage.hook, defense,
        seed, precision=ctx.finetune_precision if stage == Stage.FINETUNE else ctx.precision,
        run=view,
        checkpoint_dir=ctx.stage_dir(stage) / checkpoints,
        checkpoint_every=ctx.config.checkpoint_every,
        checkpoint_minutes=ctx.config.checkpoint_minutes,
    )


def train_stage(
    ctx: RunContext,
    model: torch.nn.Module,
    examples: list[Example],
    stage: Stage,
    seed: int,
    view: RunView,
    tracker: MechanismTracker | None = None,
) -> tuple[SFTTrainer, TrainResult]:
    """Train ``model`` on ``examples`` with the stage's settings and the run's defense; the
    tracker (if any) records a point before the first step, every k steps and at the end."""
    train_cfg = ctx.config.alignment.train if stage == Stage.ALIGN else ctx.finetune_train
    items = ctx.tokenize(examples, train_cfg.max_length)
    trainer = make_trainer(ctx, model, train_cfg, stage, ctx.defense, seed, view)
    if tracker is not None:
        tracker.record(trainer, None)
    result = trainer.train(items, on_step=ctx.tracker.step_callback(stage, tracker))
    if tracker is not None:
        tracker.finish(trainer)
    return trainer, result
