"""The fine-tuning-as-a-service pipeline, stage by stage, talking through files on disk.

    data → align → finetune → post_finetune (repair) → eval → metrics.json

The stages themselves live in :mod:`hftlab.stages`, one module each; this module orders them,
guards the run folder and records each stage's marker. Each stage writes its artifacts into its
own folder of the run directory and a ``stage.json`` marker last; a rerun skips stages whose
marker exists, so an interrupted run resumes where it stopped (``force=True`` redoes
everything). Aligned checkpoints and the base model's evaluation are cached outside the run,
keyed by a hash of everything that determines them.
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

from hftlab.cache import verify_entry
from hftlab.config import Config, ConfigError, dump_config, load_config, read_yaml_mapping
from hftlab.context import RunContext
from hftlab.cpu_load import contended, cores_used, cpu_clock, other_cores
from hftlab.devices import machine_label, seed_everything
from hftlab.experiment import Experiment
from hftlab.faults import announce_change
from hftlab.metrics import collect_metrics
from hftlab.run_metrics import RunMetrics
from hftlab.stages import CHECKPOINTS, MARKER, STAGES, Stage
from hftlab.stages.align import stage_align
from hftlab.stages.data import stage_data
from hftlab.stages.eval import stage_eval
from hftlab.stages.finetune import stage_finetune
from hftlab.stages.repair import stage_repair
from hftlab.tracking import final_summary
from hftlab.tracking_backends import TRACKING_DIR, start_tracker
from hftlab.utils import atomic_write_text, peak_rss_mb, read_json, write_json

__all__ = ["CHECKPOINTS", "MARKER", "RUN_OUTPUTS", "STAGES", "prepare_run_dir", "run_pipeline",
           "run_stage", "stage_align", "stage_data", "stage_eval", "stage_finetune",
           "stage_post_finetune"]

log = logging.getLogger(__name__)
stage_post_finetune = stage_repair  # the repair stage, by its folder's name


def run_pipeline(config: Config, run_dir: Path, force: bool = False,
                 experiment: Experiment | None = None) -> RunMetrics:
    """Run (or resume) every stage and return the metrics written to ``metrics.json``. The whole
    experiment (plug-ins, model, data) is built and checked before anything in ``run_dir`` is
    written or deleted."""
    ctx = RunContext(config, run_dir, force, experiment)
    prepare_run_dir(ctx)
    # looked up here, at call time, so that a test can replace one stage's function
    stage_fns: dict[Stage, Callable[[RunContext], dict[str, Any]]] = {
        Stage.DATA: stage_data,
        Stage.ALIGN: stage_align,
        Stage.FINETUNE: stage_finetune,
        Stage.REPAIR: stage_post_finetune,
        Stage.EVAL: stage_eval,
    }
    # tracking (tracking.backend): the config now, each stage's record as it ends (or was
    # ended by an earlier attempt), the scores at the end; closed whatever happens
    ctx.tracker = start_tracker(config.tracking, run_dir, ctx.is_main, config.to_dict())
    failed = True
    try:
        for offset, name in enumerate(STAGES):
            info = run_stage(ctx, name, stage_fns[name], config.seed + offset)
            ctx.tracker.log_stage(name, info)
        metrics = collect_metrics(ctx, STAGES)
        if ctx.is_main:
            write_json(run_dir / "metrics.json", metrics.to_dict())
        ctx.tracker.log_final(*final_summary(metrics))
        failed = False
    finally:
        ctx.tracker.finish(failed=failed)
    return metrics


# what --force removes (the tracking folder when it is the run's own: tracking.dir unset)
RUN_OUTPUTS = (*STAGES, "metrics.json", "report.md", "report.html", TRACKING_DIR)


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
    if force or not (ctx.stage_dir(Stage.DATA) / MARKER).exists():
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
    and whatever its ``checkpoint_every`` and ``tracking``: how often a stage saves and where
    its curves are shown are not part of the run."""
    try:
        saved = load_config(path)
    except ConfigError:
        return False
    saved.checkpoint_every = config.checkpoint_every
    saved.tracking = config.tracking
    saved.checkpoint_minutes = config.checkpoint_minutes
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
    start, clock = time.perf_counter(), cpu_clock()
    info = fn(ctx)
    seconds = time.perf_counter() - start
    end = cpu_clock()
    others = other_cores(clock, end)
    # a CPU run needs its compute threads; a GPU run the cores it kept busy
    on_cpu = ctx.accelerator.device.type == "cpu"
    needed = torch.get_num_threads() if on_cpu else cores_used(clock, end)
    tokens = int(info.pop("tokens", 0))
    info["timing"] = {
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds and tokens else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),  # the process's peak so far (host memory)
        # speeds compare only between runs of one machine
        "machine": machine_label(ctx.accelerator.num_processes, ctx.accelerator.device),
        # other work on the same cores slows a stage as much as a slower CPU does
        "other_cores": None if others is None else round(others, 2),
        "contended": contended(others, needed),
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
