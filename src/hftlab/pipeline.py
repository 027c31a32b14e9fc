"""The fine-tuning-as-a-service pipeline, stage by stage, talking through files on disk.

    data → align → finetune → post_finetune → eval → metrics.json

Each stage writes its artifacts into its own folder of the run directory and a ``stage.json``
marker last; a rerun skips stages whose marker exists, so an interrupted run resumes where it
stopped (``force=True`` redoes everything). Aligned checkpoints and the base model's evaluation
are cached outside the run, keyed by a hash of everything that determines them.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hftlab.config import Config, ConfigError, dump_config, load_config
from hftlab.context import MARKER, RunContext, seed_everything
from hftlab.data.loaders import data_fingerprint
from hftlab.data.records import Example
from hftlab.defenses import ALIGNMENT, DEFENSES, FINETUNE, POST_FINETUNE, Defense
from hftlab.eval_stage import stage_eval
from hftlab.formatting import Tokenized
from hftlab.mechanisms import MechanismTracker, embedding_drift, hidden_states
from hftlab.metrics import collect_metrics
from hftlab.model import attach_trainable, load_trained, save_trained
from hftlab.stage_models import aligned_adapter_model, aligned_model, finetuned_model
from hftlab.train import SFTTrainer, TrainResult
from hftlab.utils import (
    atomic_dir,
    peak_rss_mb,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)

log = logging.getLogger(__name__)
STAGES = ("data", "align", "finetune", "post_finetune", "eval")
CHECKPOINTS = "checkpoint"  # a training stage's resumable state (config checkpoint_every)
N_TRACK_TASK = 24  # benign user rows whose loss is tracked during fine-tuning


def run_pipeline(config: Config, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage and return the metrics written to ``metrics.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    guard_run_dir(config, run_dir, force)
    ctx = RunContext(config, run_dir, force)
    stage_fns: dict[str, Callable[[RunContext], dict[str, Any]]] = {
        "data": stage_data,
        "align": stage_align,
        "finetune": stage_finetune,
        "post_finetune": stage_post_finetune,
        "eval": stage_eval,
    }
    for offset, name in enumerate(STAGES):
        run_stage(ctx, name, stage_fns[name], config.seed + offset)
    metrics = collect_metrics(ctx, STAGES)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def guard_run_dir(config: Config, run_dir: Path, force: bool) -> None:
    """A run folder holds one config: resuming with another is an error, unless forced."""
    path = run_dir / "config.yaml"
    text = dump_config(config)
    changed = path.exists() and path.read_text() != text
    if changed and not force and not same_experiment(path, config):
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({path}); "
            "use another --out, or --force to redo it with this config"
        )
    if force:
        for name in (*STAGES, "metrics.json", "report.md"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    from hftlab.utils import atomic_write_text

    atomic_write_text(path, text)


def same_experiment(path: Path, config: Config) -> bool:
    """Whether a saved config describes the run ``config`` does, read as this version reads it
    (settings added since then take their defaults, so a run started by an older hftlab resumes)
    and whatever its ``checkpoint_every``: how often a stage saves is not part of the run."""
    try:
        saved = load_config(path)
    except ConfigError:
        return False
    saved.checkpoint_every = config.checkpoint_every
    return dump_config(saved) == dump_config(config)


def run_stage(
    ctx: RunContext, name: str, fn: Callable[[RunContext], dict[str, Any]], seed: int
) -> dict[str, Any]:
    marker = ctx.stage_dir(name) / MARKER
    if marker.exists():
        log.info("stage %s: done earlier, skipped", name)
        return read_json(marker)
    log.info("stage %s", name)
    ctx.stage_dir(name).mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    info = fn(ctx)
    seconds = time.perf_counter() - start
    tokens = int(info.pop("tokens", 0))
    info["timing"] = {
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds and tokens else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),  # the process's peak so far (host memory)
    }
    if torch.cuda.is_available():  # this stage's own peak on the accelerator
        info["timing"]["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if ctx.is_main:
        write_json(marker, info)  # written last: its presence means the stage is complete
        shutil.rmtree(ctx.stage_dir(name) / CHECKPOINTS, ignore_errors=True)
    ctx.accelerator.wait_for_everyone()
    return info


def stage_data(ctx: RunContext) -> dict[str, Any]:
    """Build and save the user's fine-tuning data (``is_harmful`` per row) and the split counts."""
    data = ctx.data
    folder = ctx.stage_dir("data")
    write_jsonl(folder / "user_data.jsonl", [e.to_dict() for e in data.user])
    summary = {
        "attack": {**ctx.attack.describe(data.user), **ctx.attack.data_report(ctx)},
        "counts": {
            "alignment": len(data.alignment),
            "user": len(data.user),
            "user_harmful": sum(e.is_harmful for e in data.user),
            "mechanisms_alignment": len(data.mech_alignment),
            "mechanisms_harmful": len(data.mech_harmful),
            "eval_harmful": len(data.eval_harmful),
            "eval_task": len(data.eval_task),
            "provider_harmful": len(data.provider_harmful),
        },
        "overlaps": data.overlaps,
        "defense_report": ctx.defense.report("data"),
        "fingerprints": {
            "alignment": data_fingerprint(data.alignment),
            "user": data_fingerprint(data.user),
        },
    }
    return summary


def user_data(ctx: RunContext) -> list[Example]:
    return [Example.from_dict(r) for r in read_jsonl(ctx.stage_dir("data") / "user_data.jsonl")]


def train_stage(
    ctx: RunContext,
    model: torch.nn.Module,
    examples: list[Example],
    stage: str,
    seed: int,
    tracker: MechanismTracker | None = None,
) -> tuple[SFTTrainer, TrainResult]:
    """Train ``model`` on ``examples`` with the stage's settings and the run's defense; the
    tracker (if any) records a point before the first step, every k steps and at the end."""
    from tqdm.auto import tqdm

    train_cfg = ctx.config.alignment.train if stage == ALIGNMENT else ctx.finetune_train
    items = ctx.tokenize(examples, train_cfg.max_length)
    trainer = SFTTrainer(
        model, train_cfg, ctx.accelerator, ctx.tokenizer.pad_token_id, stage, ctx.defense, seed,
        precision=ctx.precision, context=ctx,
        checkpoint_dir=ctx.stage_dir("align" if stage == ALIGNMENT else "finetune") / CHECKPOINTS,
        checkpoint_every=ctx.config.checkpoint_every,
    )
    _, total = trainer.plan(len(items))
    if tracker is not None:
        tracker.record(trainer, None)
    with tqdm(total=total, desc=f"{stage} ({len(items)} rows)", disable=not ctx.is_main) as bar:
        result = trainer.train(items, on_step=tracker, progress=bar)
    if tracker is not None:
        tracker.finish(trainer)
    return trainer, result


def stage_align(ctx: RunContext) -> dict[str, Any]:
    """Safety alignment on refusal data, cached by a hash of everything that determines it. A
    defense that starts from the plain SFT alignment (``alignment_start() == "sft"``: TAR) gets
    that first (:func:`sft_start`) and trains a fresh adapter on it, merged."""
    cfg = ctx.config
    if not cfg.alignment.enabled:
        return {"cache": None, "enabled": False}
    # first, so that a cached defense alignment never points at a deleted start
    start = sft_start(ctx) if ctx.defense.alignment_start() == "sft" else None
    started = {"sft_start": start} if start is not None else {}
    key = ctx.alignment_key()
    target = ctx.cache_dir / "aligned" / key
    meta_path = target / "meta.json"
    if meta_path.exists() and not ctx.force:
        log.info("aligned checkpoint found in cache: %s", target)
        return {"cache": str(target), "cached": True, "key": key, **started,
                **read_json(meta_path)}
    full = cfg.alignment.train.method == "full"
    seed_everything(ctx.alignment_seed)  # the adapter's init depends on the alignment seed only
    model = ctx.base_model(full_training=full)
    if start is not None:
        model = load_trained(model, Path(start["cache"]) / "model")
    model = attach_trainable(model, cfg.alignment.train)
    trainer, result = train_stage(ctx, model, ctx.data.alignment, ALIGNMENT, ctx.alignment_seed)
    meta = alignment_meta(trainer, result, ctx.defense)
    if start is not None:
        meta["starts_from"] = start["cache"]  # aligned_model merges it before this checkpoint
    save_alignment(ctx, target, trainer, meta)
    return {"cache": str(target), "cached": False, "key": key, "tokens": result.tokens,
            **started, **meta}


def sft_start(ctx: RunContext) -> dict[str, Any]:
    """The plain SFT alignment a defense with ``alignment_start() == "sft"`` trains on: what a
    ``defense: sft`` run caches for this alignment config (same key, rows, seed, meta.json),
    reused from the cache or trained here first. It checkpoints into its own folder, so an
    interrupted run never resumes the defense's training from the start's checkpoint."""
    cfg = ctx.config
    key = ctx.alignment_key(start=True)
    target = ctx.cache_dir / "aligned" / key
    if (target / "meta.json").exists() and not ctx.force:
        log.info("SFT start of the alignment found in cache: %s", target)
        return {"cache": str(target), "cached": True, "key": key}
    log.info("alignment: training its plain SFT start first (%s)", target)
    train_cfg = cfg.alignment.train
    seed_everything(ctx.alignment_seed)
    model = attach_trainable(ctx.base_model(full_training=train_cfg.method == "full"), train_cfg)
    sft = DEFENSES.get("sft")()
    checkpoints = ctx.stage_dir("align") / "sft_start"
    trainer = SFTTrainer(
        model, train_cfg, ctx.accelerator, ctx.tokenizer.pad_token_id, ALIGNMENT, sft,
        ctx.alignment_seed, precision=ctx.precision, context=ctx, checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
    )
    result = trainer.train(ctx.tokenize(ctx.load(cfg.alignment.data), train_cfg.max_length))
    save_alignment(ctx, target, trainer, alignment_meta(trainer, result, sft))
    if ctx.is_main:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return {"cache": str(target), "cached": False, "key": key}


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
        with atomic_dir(target) as tmp:
            save_trained(trainer.model, tmp / "model")
            write_json(tmp / "meta.json", meta)
    ctx.accelerator.wait_for_everyone()


def stage_finetune(ctx: RunContext) -> dict[str, Any]:
    """The user's job, cached like the alignment: runs that share everything up to here (e.g.
    sft and a post-fine-tuning repair of it, or one repair at several strengths) train once.
    The run folder gets links to (or copies of) the cached files."""
    key = ctx.finetune_key()
    cached = ctx.cache_dir / "finetuned" / key
    folder = ctx.stage_dir("finetune")
    if (cached / "meta.json").exists() and not ctx.force:
        log.info("fine-tuned model found in cache: %s", cached)
        link_tree(cached, folder, skip={"meta.json", "eval"})
        return {**read_json(cached / "meta.json"), "cached": True, "cache": str(cached),
                "key": key}
    info = train_finetune(ctx)
    if ctx.is_main:
        with atomic_dir(cached) as tmp:
            link_tree(folder, tmp, skip={MARKER})
            write_json(tmp / "meta.json", {k: v for k, v in info.items() if k != "tokens"})
    ctx.accelerator.wait_for_everyone()
    return {**info, "cached": False, "cache": str(cached), "key": key}


def link_tree(source: Path, target: Path, skip: set[str]) -> None:
    """Hard-link (or copy, across file systems) ``source``'s files into ``target``."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in skip or not path.is_file():
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            destination.unlink()
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def train_finetune(ctx: RunContext) -> dict[str, Any]:
    """A fresh LoRA (or full FT) on the aligned model, with the survey's curves every
    ``mechanisms.every`` steps and the hidden-state drift at the end."""
    cfg = ctx.config
    mech = cfg.mechanisms
    examples = user_data(ctx)
    folder = ctx.stage_dir("finetune")
    if not examples:
        # The defense screened out every uploaded row (the guardrail flagged them all): as in
        # the reference (git-disl/Virus, moderation), nothing is fine-tuned and the aligned
        # model is what gets served and evaluated.
        log.warning("fine-tuning skipped: the defense '%s' left none of the uploaded rows; the "
                    "aligned model is served", ctx.defense.name)
        if ctx.is_main:
            write_json(folder / "curves.json", [])
            write_json(folder / "drift.json", None)
        return {"steps": 0, "train_seconds": 0.0, "seconds_per_step": None,
                "skipped": "no uploaded rows left after the defense's screening",
                "defense_report": ctx.defense.report(FINETUNE)}
    train_cfg = ctx.finetune_train
    continued = ctx.defense.continues_alignment_adapter()
    model = (aligned_adapter_model(ctx) if continued
             else aligned_model(ctx, full_training=train_cfg.method == "full"))
    max_len = train_cfg.max_length
    # Drift is measured on the held-out alignment prompts as the model sees them at inference.
    drift_prompts = [
        ctx.formatter.encode_prompt(e.prompt)[:max_len] for e in ctx.data.mech_alignment
    ]
    drift_items = [Tokenized(ids, len(ids)) for ids in drift_prompts]
    before = (
        hidden_states(model, drift_items, ctx.tokenizer.pad_token_id, mech.batch_size,
                      ctx.device, ctx.autocast)
        if mech.drift and drift_items
        else None
    )
    if not continued:
        model = attach_trainable(model, train_cfg)
    tracker = None
    if mech.every:
        # the user's own benign rows: not harmful, not added by the provider's defense
        benign = [e for e in examples
                  if not e.is_harmful and "added_by" not in e.meta][:N_TRACK_TASK]
        tracker = MechanismTracker(
            mech.every,
            ctx.tokenize(benign, max_len),
            ctx.tokenize(ctx.data.mech_alignment, max_len),
            ctx.tokenize(ctx.data.mech_harmful, max_len),
            mech.batch_size,
        )
    trainer, result = train_stage(ctx, model, examples, FINETUNE, cfg.seed, tracker)
    drift = None
    if before is not None:
        after = hidden_states(trainer.model, drift_items, ctx.tokenizer.pad_token_id,
                              mech.batch_size, ctx.device, ctx.autocast)
        drift = embedding_drift(before, after)
    if ctx.is_main:
        with atomic_dir(folder / "model") as tmp:
            save_trained(trainer.model, tmp)
        write_json(folder / "curves.json", tracker.curves if tracker else [])
        write_json(folder / "drift.json", drift)
    return {
        "steps": result.steps,
        "train_seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "final_loss": result.losses[-1],
        "resumed_from_step": trainer.resumed_from,  # 0: trained in one go
        "tokens": result.tokens,
        # the saved adapter is the alignment LoRA trained on: it applies to the base model
        **({"continues_alignment_adapter": True} if continued else {}),
        "defense_report": ctx.defense.report(FINETUNE),
    }


def stage_post_finetune(ctx: RunContext) -> dict[str, Any]:
    """The provider's repair of the fine-tuned model (SafeLoRA, Antidote, ...), saved as the
    deployed model; the fine-tuned model is kept when no defense acts here."""
    if POST_FINETUNE not in ctx.defense.stages:
        return {"repaired": False}
    if ctx.stage_info("finetune").get("skipped"):
        return {"repaired": False, "skipped": "fine-tuning was skipped: nothing to repair"}
    model = ctx.defense.post_finetune(finetuned_model(ctx), ctx)
    if ctx.is_main:
        with atomic_dir(ctx.stage_dir("post_finetune") / "model") as tmp:
            save_trained(model, tmp)
    return {
        "repaired": True,
        "defense": ctx.defense.name,
        "defense_report": ctx.defense.report(POST_FINETUNE),
    }


