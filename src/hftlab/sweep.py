"""Sweeps: a grid of single runs (defenses × attacks × poison ratios × sample counts × seeds,
or any config keys), run one after another or in worker processes, resumable. Reading the
finished runs (cells, statistics across seeds) lives in :mod:`hftlab.compare`.

A sweep file::

    config: ../cpu_sst2.yaml          # the run config every run starts from (path relative
                                      # to this file)
    set: {alignment.seed: 0}          # overrides shared by every run
    grid:                             # the product of these lists; a list of such mappings
      defense: [sft, vaccine]         # is the union of their products
      finetune.poison_ratio: [0.0, 0.1]
      seed: [0, 1, 2]
    out: runs/sweeps/NAME             # default: runs/sweeps/<file name>
    resources: {num_gpus: 1}          # what each run declares with --backend ray (num_cpus,
                                      # num_gpus, memory); the options --num-cpus ... win

Runs live in ``out/runs/<name>`` (each an ordinary run folder, resumable); ``out/sweep.json`` is
the plan. Runs that share an aligned checkpoint share it through the alignment cache; with
``--workers`` a run whose alignment is not cached yet waits for the first run of its alignment,
so no two workers train the same one; the others start at once. ``hftlab compare``
(:func:`hftlab.compare.compare_table`) summarises any folder of runs.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import os
import re
import sys
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hftlab.config import ConfigError, load_config, read_yaml_mapping
from hftlab.setting_names import setting_name
from hftlab.utils import stable_hash, write_json

log = logging.getLogger(__name__)
SWEEP_KEYS = {"config", "set", "grid", "out", "resources"}
RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory"}  # per run, for --backend ray


@dataclass
class PlannedRun:
    name: str
    overrides: list[str]
    values: dict[str, Any]  # the grid's values for this run


@dataclass
class Sweep:
    source: Path
    config: Path
    out: Path
    runs: list[PlannedRun] = field(default_factory=list)  # what this invocation runs
    resources: dict[str, Any] = field(default_factory=dict)  # the file's `resources`
    planned: list[PlannedRun] = field(default_factory=list)  # the whole grid (sweep.json)

    def run_dir(self, run: PlannedRun) -> Path:
        return self.out / "runs" / run.name


def override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: strings, numbers, lists, mappings


def run_name(values: dict[str, Any]) -> str:
    """``defense-sft_poison_ratio-0.1_seed-0``: each key's short name (:func:`setting_name`) and
    its value."""
    parts = []
    for key, value in values.items():
        if isinstance(value, dict):  # options: k=v pairs, a hash when too long to read
            shown = "+".join(f"{k}={v}" for k, v in sorted(value.items()))
            if len(shown) > 48:
                shown = stable_hash(value)[:8]
        elif isinstance(value, (str, int, float, bool)):
            shown = str(value)
        else:
            shown = stable_hash(value)[:8]
        shown = re.sub(r"[^A-Za-z0-9._+=-]+", "-", shown).strip("-")
        parts.append(f"{setting_name(key)}-{shown}")
    return "_".join(parts) or "run"


def load_sweep(path: Path, only: list[str] | None = None, overrides: list[str] | None = None,
               out: Path | None = None, check: bool = True) -> Sweep:
    """Read and validate a sweep file; every run's experiment (config, plug-ins and their
    options, checks across fields) is built before anything runs.
    ``only``: keep the runs whose name matches one of these globs (a subset, in file order).
    ``overrides``: ``key=value`` settings for every run, after the file's ``set`` (a key the
    grid varies is an error). ``out``: the sweep folder instead of the file's ``out``.
    ``check=False``: each run's config is only read, not built (``hftlab plan`` of a 7B sweep
    where the model cannot be reached)."""
    # imported here: the plug-ins (and torch) are not for every importer of this module (the
    # workers' initializer)
    from hftlab.experiment import build_experiment

    raw = read_yaml_mapping(path, "sweep file")
    if "config" not in raw or "grid" not in raw:
        raise ConfigError(f"{path}: a sweep needs 'config' (a run config) and 'grid' (key: list)")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {unknown}; allowed: {sorted(SWEEP_KEYS)}")
    config = (path.parent / raw["config"]).resolve()
    if not config.is_file():
        raise ConfigError(f"{path}: config {raw['config']} not found (looked at {config})")
    shared = raw.get("set") or {}
    grids = raw["grid"] if isinstance(raw["grid"], list) else [raw["grid"]]
    out = out or Path(raw.get("out") or Path("runs") / "sweeps" / path.stem)
    sweep = Sweep(path, config, out)
    sweep.resources = raw.get("resources") or {}
    if not isinstance(sweep.resources, dict) or set(sweep.resources) - RESOURCE_KEYS:
        raise ConfigError(f"{path}: 'resources' must be a mapping with keys among "
                          f"{sorted(RESOURCE_KEYS)}")
    extra = list(overrides or [])
    extra_keys = {word.partition("=")[0].strip() for word in extra}
    seen: set[str] = set()
    for number, grid in enumerate(grids):
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{path}: grid {number} must be a mapping of config keys to lists")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid key '{key}' needs a non-empty list of values")
            if key in extra_keys:
                raise ConfigError(f"{path}: the override {key}=... sets a key the grid varies; "
                                  "change the grid in the sweep file, or pick runs with --only")
        for combo in itertools.product(*grid.values()):
            values = dict(zip(grid.keys(), combo))
            name = run_name(values)
            if name in seen:
                continue  # the union of grids may repeat a run
            seen.add(name)
            run_overrides = ([override(k, v) for k, v in shared.items()] + extra
                             + [override(k, v) for k, v in values.items()])
            try:  # every plug-in and check of every run, before anything runs
                run_config = load_config(config, run_overrides)
                if check:
                    build_experiment(run_config, str(config))
            except ConfigError as exc:
                raise ConfigError(f"{path}: run {name}: {exc}") from exc
            sweep.runs.append(PlannedRun(name, run_overrides, values))
    sweep.planned = list(sweep.runs)
    if only:
        sweep.runs = [r for r in sweep.runs if any(fnmatch.fnmatch(r.name, p) for p in only)]
        if not sweep.runs:
            raise ConfigError(f"{path}: no run name matches --only {' '.join(only)}")
    return sweep


def execute_run(config_path: str, overrides: list[str], run_dir: str, threads: int | None) -> str:
    """One run in a worker process (or inline); returns the run folder."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from hftlab.pipeline import run_pipeline
    from hftlab.report import write_report

    run_pipeline(load_config(config_path, overrides), Path(run_dir))
    write_report(Path(run_dir))
    return run_dir


def alignment_group(sweep: Sweep, run: PlannedRun) -> tuple[str, bool]:
    """The alignment cache key this run will use and whether that checkpoint is already cached
    (computed from the alignment inputs alone, without training or building the upload)."""
    from hftlab.context import RunContext

    config = load_config(sweep.config, run.overrides)
    ctx = RunContext(config, sweep.run_dir(run))
    key = ctx.alignment_key()
    checkpoint = ctx.cache_dir / "aligned" / key / "meta.json"
    return key, not config.alignment.enabled or checkpoint.exists()


def run_progress(run_dir: Path) -> str:
    """How far a run folder got: ``done`` (it has metrics.json), ``after <stage>`` (the last
    finished stage; a rerun resumes from the next one, from its checkpoint if it saved one:
    ``after data, align at step 40``) or ``new``."""
    from hftlab.checkpoint import checkpoint_step
    from hftlab.context import MARKER
    from hftlab.pipeline import CHECKPOINTS, STAGES

    if (run_dir / "metrics.json").exists():
        return "done"
    finished = [name for name in STAGES if (run_dir / name / MARKER).exists()]
    if not finished:
        return "new"
    progress = f"after {finished[-1]}"
    following = STAGES[STAGES.index(finished[-1]) + 1 :][:1]
    step = checkpoint_step(run_dir / following[0] / CHECKPOINTS) if following else None
    if step is not None:
        progress += f", {following[0]} at step {step}"
    return progress


def describe_plan(sweep: Sweep) -> list[str]:
    """The lines of ``hftlab sweep --dry-run``: each run with its progress and, when it still
    has to align, whether its aligned checkpoint is cached, then a summary line."""
    lines: list[str] = []
    to_align: set[str] = set()
    counts = {"done": 0, "resumes": 0, "new": 0}
    stale = set(finished_with_another_config(sweep))
    for run in sweep.runs:
        progress = run_progress(sweep.run_dir(run))
        note = progress
        if sweep.run_dir(run) in stale:
            note += ", made with another config: the sweep refuses to start until it is moved"
        if progress in ("new", "after data"):
            try:
                key, cached = alignment_group(sweep, run)
            except (ConfigError, OSError) as exc:  # the plan still prints; the run will fail
                note += f", alignment unknown ({exc})"
            else:
                if not cached:
                    to_align.add(key)
                note += ", alignment cached" if cached else f", alignment {key} to train"
        counts["done" if progress == "done" else "new" if progress == "new" else "resumes"] += 1
        lines.append(f"{run.name} [{note}]: {' '.join(run.overrides)}")
    lines.append(
        f"{len(sweep.runs)} runs from {sweep.config} into {sweep.out}: {counts['done']} done, "
        f"{counts['resumes']} resume, {counts['new']} new; {len(to_align)} aligned "
        "checkpoint(s) to train")
    return lines


def run_sweep(sweep: Sweep, workers: int = 1) -> list[tuple[str, str]]:
    """Run every unfinished run; returns (run name, error) for the ones that failed (the
    others keep going). Finished runs (with metrics.json) are skipped: rerun to resume."""
    todo = start_sweep(sweep)
    failures: list[tuple[str, str]] = []
    if workers <= 1:
        for number, run in enumerate(todo, 1):
            print(f"[{number}/{len(todo)}] {run.name}", flush=True)
            try:
                execute_run(str(sweep.config), run.overrides, str(sweep.run_dir(run)), None)
            except Exception as exc:  # one failed run must not stop the sweep
                failures.append((run.name, _describe(exc)))
        return record_failures(sweep, failures)
    plan = AlignmentOrder([(run, *alignment_group(sweep, run)) for run in todo])
    import multiprocessing

    from hftlab.devices import usable_cores

    threads = max(1, len(usable_cores()) // workers)  # the cores this process may use

    context = multiprocessing.get_context("spawn")
    # One fresh process per run: a run's recorded peak memory is its process's lifetime peak
    # (ru_maxrss), so a reused worker would pass one run's peak on to the next. Python 3.10's
    # pool cannot recycle workers; there the peaks carry over.
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent,
                             initargs=(os.getpid(),), **fresh) as pool:
        def submit(batch: list[PlannedRun]) -> dict[Future[str], PlannedRun]:
            return {pool.submit(execute_run, str(sweep.config), r.overrides,
                                str(sweep.run_dir(r)), threads): r for r in batch}

        pending = submit(plan.start())
        broken = False
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                run = pending.pop(future)
                try:
                    future.result()
                    print(f"done {run.name}", flush=True)
                    ok = True
                except Exception as exc:
                    failures.append((run.name, _describe(exc)))
                    ok = False
                    if isinstance(exc, BrokenProcessPool):  # the pool takes no more work:
                        broken = True  # the runs still waiting fail with it
                        failures += [(r.name, _describe(exc)) for r in plan.remaining()]
                if not broken:
                    pending.update(submit(plan.finished(run, ok)))
    return record_failures(sweep, failures)


def finished_with_another_config(sweep: Sweep) -> list[Path]:
    """The finished run folders of this invocation whose saved config is not the experiment the
    sweep now plans for them (the sweep file or its run config changed since they ran). Resuming
    would count them as done and mix two experiments in one table."""
    from hftlab.pipeline import same_experiment

    stale = []
    for run in sweep.runs:
        run_dir = sweep.run_dir(run)
        if (run_dir / "metrics.json").exists() and not same_experiment(
                run_dir / "config.yaml", load_config(sweep.config, run.overrides)):
            stale.append(run_dir)
    return stale


def start_sweep(sweep: Sweep) -> list[PlannedRun]:
    """Write the plan (``sweep.json``) and return the runs still to do (every backend). Refused,
    with nothing written, when a finished run was made with another config
    (:func:`finished_with_another_config`)."""
    stale = finished_with_another_config(sweep)
    if stale:
        shown = ", ".join(str(path) for path in stale[:5]) + (" …" if len(stale) > 5 else "")
        raise ConfigError(
            f"{sweep.source}: {len(stale)} finished run(s) in {sweep.out / 'runs'} were made with "
            f"another config than this sweep now gives them ({shown}); move them out of that "
            "folder, or pass --out for a new sweep folder")
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_json(sweep.out / "sweep.json", {
        "sweep": str(sweep.source), "config": str(sweep.config),
        "runs": [{"name": r.name, "overrides": r.overrides, "values": r.values}
                 for r in sweep.planned or sweep.runs],
    })
    todo = [r for r in sweep.runs if not (sweep.run_dir(r) / "metrics.json").exists()]
    log.info("sweep %s: %d runs, %d to do", sweep.source, len(sweep.runs), len(todo))
    return todo


def exit_with_parent(parent: int, every: float = 2.0) -> None:
    """Worker initializer: end this worker when the sweep process is gone (killed by a
    scheduler, say), instead of training on as an orphan that competes with the next sweep."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class AlignmentOrder:
    """Which runs may start: a run whose alignment is not cached yet waits for the one run that
    trains it (its group's leader), so no two workers train the same alignment; every other run
    starts at once. When a leader fails, the next run of its group trains the alignment."""

    def __init__(self, runs: list[tuple[PlannedRun, str, bool]]) -> None:
        groups: dict[str, list[PlannedRun]] = {}
        self._ready: list[PlannedRun] = []
        for run, key, cached in runs:
            if cached:
                self._ready.append(run)
            else:
                groups.setdefault(key, []).append(run)
        self._ready = [group[0] for group in groups.values()] + self._ready
        self._waiting = {group[0].name: group[1:] for group in groups.values()}

    def start(self) -> list[PlannedRun]:
        return self._ready

    def remaining(self) -> list[PlannedRun]:
        """Every run still waiting for a leader, removed from the plan."""
        runs = [r for group in self._waiting.values() for r in group]
        self._waiting.clear()
        return runs

    def finished(self, run: PlannedRun, ok: bool) -> list[PlannedRun]:
        followers = self._waiting.pop(run.name, [])
        if ok or not followers:
            return followers
        self._waiting[followers[0].name] = followers[1:]
        return followers[:1]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, BrokenProcessPool):
        return ("a worker process died abruptly (killed by the OS, often for lack of memory: "
                "each worker holds its own models), which stops the whole pool; rerun the "
                "sweep to resume, with fewer --workers")
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def record_failures(sweep: Sweep, failures: list[tuple[str, str]]) -> list[tuple[str, str]]:
    path = sweep.out / "failures.json"
    if failures:
        write_json(path, [{"run": n, "error": e} for n, e in failures])
    elif path.exists():
        path.unlink()
    return failures
