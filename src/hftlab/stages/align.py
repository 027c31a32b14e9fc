"""The align stage: the provider's safety alignment on refusal data, cached outside the run by
:meth:`AlignInputs.key`. A defense that starts from the plain SFT alignment
(``alignment_start() == "sft"``: TAR) gets that first (:func:`sft_start`, the very entry a
``defense: sft`` run caches) and trains a fresh adapter on it, merged."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hftlab.cache import commit_entry, entry_lock, usable_entry
from hftlab.data.loaders import data_fingerprint
from hftlab.data.records import Example
from hftlab.defenses import ALIGNMENT, DEFENSES, Defense
from hftlab.devices import seed_everything
from hftlab.model import attach_trainable, load_trained, save_trained
from hftlab.stages import Stage, versioned_key
from hftlab.stages.training import make_trainer, run_view, train_stage
from hftlab.train import SFTTrainer, TrainResult
from hftlab.utils import read_json, write_json

if TYPE_CHECKING:
    from hftlab.config import TrainConfig
    from hftlab.context import RunContext

log = logging.getLogger(__name__)
KEY_VERSION = 1  # bump when what determines an aligned model changes


@dataclass(frozen=True)
class AlignInputs:
    """Everything that determines an aligned model."""

    model: dict[str, Any]  # the base model's identity (RunContext.model_key)
    enabled: bool
    alignment: list[Example]  # alignment rows after the defense's data hook
    train: TrainConfig
    precision: str
    seed: int
    defense: Any  # the defense's alignment cache key; None: the plain SFT start
    provider_harmful: list[Example]
    start: AlignInputs | None = None  # the plain SFT alignment it trains on (TAR)

    def key(self) -> str:
        fields: dict[str, Any] = {
            **self.model,
            "enabled": self.enabled,
            "data": data_fingerprint(self.alignment),
            "train": self.train,
            "precision": self.precision,
            "seed": self.seed,
            "defense": self.defense,
            "provider_harmful": data_fingerprint(self.provider_harmful) if self.defense else None,
        }
        # a defense trained on top of the SFT alignment (TAR) depends on that model too
        if self.start is not None:
            fields["starts_from"] = self.start.key()
        return versioned_key(fields, KEY_VERSION)


def align_inputs(ctx: RunContext, start: bool = False) -> AlignInputs:
    """The alignment's inputs. ``start``: those of the plain SFT alignment that a defense with
    ``alignment_start() == "sft"`` (TAR) trains on, exactly as a ``defense: sft`` run has them
    (``alignment.data`` as loaded, no defense); the defense's own inputs hold them."""
    cfg = ctx.config
    if start:
        alignment = ctx.load(cfg.alignment.data) if cfg.alignment.enabled else []
        provider_harmful: list[Example] = []
        defense = None
    else:
        alignment, provider_harmful = ctx.alignment_rows()
        defense = ctx.defense.cache_key(ALIGNMENT)
    sft_first = not start and cfg.alignment.enabled and ctx.defense.alignment_start() == "sft"
    return AlignInputs(
        model=ctx.model_key(), enabled=cfg.alignment.enabled, alignment=alignment,
        train=cfg.alignment.train, precision=ctx.precision, seed=ctx.alignment_seed,
        defense=defense, provider_harmful=provider_harmful,
        start=align_inputs(ctx, start=True) if sft_first else None,
    )


def stage_align(ctx: RunContext) -> dict[str, Any]:
    """Safety alignment, reused from the cache when an entry with its key exists."""
    if not ctx.config.alignment.enabled:
        return {"cache": None, "enabled": False}
    inputs = align_inputs(ctx)
    # first, so that a cached defense alignment never points at a deleted start
    start = sft_start(ctx, inputs.start) if inputs.start is not None else None
    # recorded beside the stage's own record: the SFT start it trained on, and the rows it
    # trained on named by content, so that records of one alignment made in other sessions or
    # on other machines (where the cache key may differ) can be checked for the same data
    recorded: dict[str, Any] = {"data_fingerprint": data_fingerprint(inputs.alignment)}
    if start is not None:
        recorded["sft_start"] = start
    key = inputs.key()
    target = ctx.cache_dir / "aligned" / key
    with entry_lock(target, ctx.is_main):
        ctx.accelerator.wait_for_everyone()
        if not ctx.force and usable_entry(target):
            log.info("aligned checkpoint found in cache: %s", target)
            return {"cache": str(target), "cached": True, "key": key, **recorded,
                    **read_json(target / "meta.json")}
        return train_alignment(ctx, inputs, target, key, start, recorded)


def train_alignment(ctx: RunContext, inputs: AlignInputs, target: Path, key: str,
                    start: dict[str, Any] | None, recorded: dict[str, Any]) -> dict[str, Any]:
    full = inputs.train.method == "full"
    seed_everything(inputs.seed)  # the adapter's init depends on the alignment seed only
    model = ctx.base_model(full_training=full)
    if start is not None:
        model = load_trained(model, Path(start["cache"]) / "model")
    model = attach_trainable(model, inputs.train)
    view = run_view(ctx, Stage.ALIGN, inputs.alignment, inputs.provider_harmful)
    trainer, result = train_stage(ctx, model, inputs.alignment, Stage.ALIGN, inputs.seed, view)
    meta = alignment_meta(trainer, result, ctx.defense)
    if start is not None:
        meta["starts_from"] = start["cache"]  # aligned_model merges it before this checkpoint
    save_alignment(ctx, target, trainer, meta)
    return {"cache": str(target), "cached": False, "key": key, "tokens": result.tokens,
            **recorded, **meta}


def sft_start(ctx: RunContext, inputs: AlignInputs) -> dict[str, Any]:
    """The plain SFT alignment a defense with ``alignment_start() == "sft"`` trains on: what a
    ``defense: sft`` run caches for this alignment config (same key, rows, seed, meta.json),
    reused from the cache or trained here first. It checkpoints into its own folder, so an
    interrupted run never resumes the defense's training from the start's checkpoint."""
    key = inputs.key()
    target = ctx.cache_dir / "aligned" / key
    with entry_lock(target, ctx.is_main):
        ctx.accelerator.wait_for_everyone()
        if not ctx.force and usable_entry(target):
            log.info("SFT start of the alignment found in cache: %s", target)
            return {"cache": str(target), "cached": True, "key": key}
        train_sft_start(ctx, inputs, target)
    return {"cache": str(target), "cached": False, "key": key}


def train_sft_start(ctx: RunContext, inputs: AlignInputs, target: Path) -> None:
    log.info("alignment: training its plain SFT start first (%s)", target)
    seed_everything(inputs.seed)
    model = attach_trainable(ctx.base_model(full_training=inputs.train.method == "full"),
                             inputs.train)
    sft = DEFENSES.get("sft")()
    view = run_view(ctx, Stage.ALIGN, inputs.alignment, [])
    trainer = make_trainer(ctx, model, inputs.train, Stage.ALIGN, sft, inputs.seed, view,
                           checkpoints="sft_start")
    result = trainer.train(ctx.tokenize(inputs.alignment, inputs.train.max_length))
    save_alignment(ctx, target, trainer, alignment_meta(trainer, result, sft))
    if ctx.is_main:
        shutil.rmtree(ctx.stage_dir(Stage.ALIGN) / "sft_start", ignore_errors=True)


def alignment_meta(trainer: SFTTrainer, result: TrainResult, defense: Defense) -> dict[str, Any]:
    """The meta.json of a cached alignment."""
    return {
        "steps": result.steps,
        "train_seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "train_tokens": result.tokens,
        "final_loss": result.losses[-1],
        "resumed_from_step": trainer.resumed_from,  # 0: trained in one go
        "defense": defense.cache_key(ALIGNMENT),
        "defense_report": defense.report(ALIGNMENT),
    }


def save_alignment(ctx: RunContext, target: Path, trainer: SFTTrainer, meta: dict) -> None:
    if ctx.is_main:
        with commit_entry(target) as tmp:
            save_trained(trainer.model, tmp / "model")
            write_json(tmp / "meta.json", meta)
    ctx.accelerator.wait_for_everyone()
