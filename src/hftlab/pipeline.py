"""The fine-tuning-as-a-service pipeline, stage by stage, talking through files on disk.

    data → align → finetune → post_finetune → eval → metrics.json

Each stage writes its artifacts into its own folder of the run directory and a ``stage.json``
marker last; a rerun skips stages whose marker exists, so an interrupted run resumes where it
stopped (``force=True`` redoes everything). Aligned checkpoints and the base model's evaluation
are cached outside the run, keyed by a hash of everything that determines them.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hftlab.cache import commit_entry, copy_tree, entry_lock, usable_entry, verify_entry
from hftlab.config import Config, ConfigError, dump_config, load_config, read_yaml_mapping
from hftlab.context import MARKER, RunContext, seed_everything
from hftlab.data.loaders import data_fingerprint
from hftlab.data.records import Example
from hftlab.defenses import ALIGNMENT, DEFENSES, FINETUNE, POST_FINETUNE, Defense
from hftlab.eval_stage import stage_eval
from hftlab.faults import announce_change
from hftlab.formatting import Tokenized
from hftlab.mechanisms import MechanismTracker, embedding_drift, hidden_states
from hftlab.metrics import collect_metrics
from hftlab.model import attach_trainable, load_trained, save_trained
from hftlab.stage_models import aligned_adapter_model, aligned_model, finetuned_model
from hftlab.train import SFTTrainer, TrainResult
from hftlab.utils import (
    atomic_dir,
    atomic_write_text,
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
    """Run (or resume) every stage and return the metrics written to ``metrics.json``. The whole
    experiment (plug-ins, model, data) is built and checked before anything in ``run_dir`` is
    written or deleted."""
    ctx = RunContext(config, run_dir, force)
    prepare_run_dir(ctx)
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


RUN_OUTPUTS = (*STAGES, "metrics.json", "report.md", "report.html")  # what --force removes


def prepare_run_dir(ctx: RunContext) -> None:
    """Check the run folder and the data, then (``force``) remove what an earlier run wrote and
    save the config. A folder that is not empty and holds no hftlab run is refused, and with a
    different config unless forced; the data are loaded (and checked) first when the data stage
    has to run, so a bad data file leaves the folder as it was."""
    run_dir, config, force = ctx.run_dir, ctx.config, ctx.force
    path = run_dir / "config.yaml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not is_run_config(path):
            raise ConfigError(
                f"--out {run_dir} is not empty and holds no hftlab run (no readable "
                f"config.yaml): choose a new or empty folder; hftlab never deletes files it "
                "did not write"
            )
        changed = path.read_text() != dump_config(config)
        if changed and not force and not same_experiment(path, config):
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({path}); "
                "use another --out, or --force to redo it with this config"
            )
    if force or not (ctx.stage_dir("data") / MARKER).exists():
        _ = ctx.data  # load and check every data source now, before the folder changes
    if ctx.is_main:
        if force:
            for name in RUN_OUTPUTS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        else:
            redo_stages_with_damaged_caches(ctx)
        atomic_write_text(path, dump_config(config))
    ctx.accelerator.wait_for_everyone()


def is_run_config(path: Path) -> bool:
    """Whether ``path`` looks like the config.yaml of an hftlab run (of any version: its keys
    are a run config's, whether or not this version still accepts every value)."""
    try:
        raw = read_yaml_mapping(path, "run config")
    except (ConfigError, OSError, UnicodeDecodeError):
        return False
    known = {f.name for f in dataclasses.fields(Config)}
    return {"model", "finetune", "defense"} <= set(raw) <= known


def redo_stages_with_damaged_caches(ctx: RunContext) -> None:
    """A finished stage whose cached model is gone or damaged is redone, with every stage after
    it (their outputs were made from it): its marker and theirs are removed, with one warning.
    A finished run needs no cache: its folder holds every result."""
    if all((ctx.stage_dir(name) / MARKER).exists() for name in STAGES):
        return
    for index, name in enumerate(STAGES):
        marker = ctx.stage_dir(name) / MARKER
        if not marker.exists():
            continue
        info = read_json(marker)
        caches = [info.get("cache"), info.get("starts_from"),
                  (info.get("sft_start") or {}).get("cache")]
        for cache in filter(None, caches):
            problem = verify_entry(Path(cache))
            if problem is None:
                continue
            later = [s for s in STAGES[index:] if (ctx.stage_dir(s) / MARKER).exists()]
            log.warning("stage %s used the cache entry %s, which is %s: redoing %s", name,
                        cache, problem if problem == "missing" else f"damaged ({problem})",
                        ", ".join(later))
            for stage in later:
                shutil.rmtree(ctx.stage_dir(stage), ignore_errors=True)
            (ctx.run_dir / "metrics.json").unlink(missing_ok=True)
            return


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
    if ctx.is_main:
        remove_temporaries(ctx.stage_dir(name))
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
        announce_change(ctx.stage_dir(name) / CHECKPOINTS)
        shutil.rmtree(ctx.stage_dir(name) / CHECKPOINTS, ignore_errors=True)
    ctx.accelerator.wait_for_everyone()
    return info


def remove_temporaries(folder: Path) -> None:
    """Hidden ``.NAME.*`` files and folders an unfinished stage's killed writes left behind
    (atomic writes name their temporaries so); the stage is about to write them anew."""
    for path in folder.glob(".*"):
        log.info("removing %s, left by an interrupted write", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
    with entry_lock(target, ctx.is_main):
        ctx.accelerator.wait_for_everyone()
        if not ctx.force and usable_entry(target):
            log.info("aligned checkpoint found in cache: %s", target)
            return {"cache": str(target), "cached": True, "key": key, **started,
                    **read_json(target / "meta.json")}
        return train_alignment(ctx, target, key, start, started)


def train_alignment(ctx: RunContext, target: Path, key: str, start: dict[str, Any] | None,
                    started: dict[str, Any]) -> dict[str, Any]:
    cfg = ctx.config
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
    key = ctx.alignment_key(start=True)
    target = ctx.cache_dir / "aligned" / key
    with entry_lock(target, ctx.is_main):
        ctx.accelerator.wait_for_everyone()
        if not ctx.force and usable_entry(target):
            log.info("SFT start of the alignment found in cache: %s", target)
            return {"cache": str(target), "cached": True, "key": key}
        train_sft_start(ctx, target)
    return {"cache": str(target), "cached": False, "key": key}


def train_sft_start(ctx: RunContext, target: Path) -> None:
    cfg = ctx.config
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


def stage_finetune(ctx: RunContext) -> dict[str, Any]:
    """The user's job, cached like the alignment: runs that share everything up to here (e.g.
    sft and a post-fine-tuning repair of it, or one repair at several strengths) train once.
    The run folder gets links to (or copies of) the cached files."""
    key = ctx.finetune_key()
    cached = ctx.cache_dir / "finetuned" / key
    folder = ctx.stage_dir("finetune")
    with entry_lock(cached, ctx.is_main):
        ctx.accelerator.wait_for_everyone()
        if not ctx.force and usable_entry(cached):
            log.info("fine-tuned model found in cache: %s", cached)
            if ctx.is_main:
                copy_tree(cached, folder, skip={"meta.json", "manifest.json", "eval"})
            ctx.accelerator.wait_for_everyone()
            return {**read_json(cached / "meta.json"), "cached": True, "cache": str(cached),
                    "key": key}
        info = train_finetune(ctx)
        if ctx.is_main:
            with commit_entry(cached) as tmp:
                copy_tree(folder, tmp, skip={MARKER, CHECKPOINTS})
                write_json(tmp / "meta.json", {k: v for k, v in info.items() if k != "tokens"})
        ctx.accelerator.wait_for_everyone()
    return {**info, "cached": False, "cache": str(cached), "key": key}


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


