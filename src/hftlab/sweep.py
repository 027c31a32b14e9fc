"""Sweeps: a grid of single runs (defenses × attacks × poison ratios × sample counts × seeds,
or any config keys), run one after another or in worker processes, resumable, and the
statistics across seeds that turn runs into evidence.

A sweep file::

    config: ../cpu_sst2.yaml          # the run config every run starts from (path relative
                                      # to this file)
    set: {alignment.seed: 0}          # overrides shared by every run
    grid:                             # the product of these lists; a list of such mappings
      defense: [sft, vaccine]         # is the union of their products
      finetune.poison_ratio: [0.0, 0.1]
      seed: [0, 1, 2]
    out: runs/sweeps/NAME             # default: runs/sweeps/<file name>

Runs live in ``out/runs/<name>`` (each an ordinary run folder, resumable); ``out/sweep.json`` is
the plan. Runs that share an aligned checkpoint share it through the alignment cache; with
``--workers`` a run whose alignment is not cached yet waits for the first run of its alignment,
so no two workers train the same one; the others start at once. ``hftlab compare``
(:func:`compare_table`) summarises any folder of runs.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hftlab.config import ConfigError, load_config, read_yaml_mapping
from hftlab.stats import Difference, Summary, compare, summarize
from hftlab.utils import read_json, stable_hash, write_json

log = logging.getLogger(__name__)
SWEEP_KEYS = {"config", "set", "grid", "out"}
# keys that do not define a cell: seeds are repetitions, paths are where things live
NOT_CELL_KEYS = {"seed", "out_dir", "cache_dir", "data_root"}
METRICS = ("harmful_score", "finetune_accuracy")


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
    planned: list[PlannedRun] = field(default_factory=list)  # the whole grid (sweep.json)

    def run_dir(self, run: PlannedRun) -> Path:
        return self.out / "runs" / run.name


def override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: strings, numbers, lists, mappings


def run_name(values: dict[str, Any]) -> str:
    """``defense-sft_poison_ratio-0.1_seed-0``: the last part of each key and its value."""
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
        parts.append(f"{key.rsplit('.', 1)[-1]}-{shown}")
    return "_".join(parts) or "run"


def load_sweep(path: Path, only: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file; every run's config is checked before anything runs.
    ``only``: keep the runs whose name matches one of these globs (a subset, in file order)."""
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
    out = Path(raw.get("out") or Path("runs") / "sweeps" / path.stem)
    sweep = Sweep(path, config, out)
    seen: set[str] = set()
    for number, grid in enumerate(grids):
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{path}: grid {number} must be a mapping of config keys to lists")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid key '{key}' needs a non-empty list of values")
        for combo in itertools.product(*grid.values()):
            values = dict(zip(grid.keys(), combo))
            name = run_name(values)
            if name in seen:
                continue  # the union of grids may repeat a run
            seen.add(name)
            overrides = [override(k, v) for k, v in {**shared, **values}.items()]
            try:
                load_config(config, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{path}: run {name}: {exc}") from exc
            sweep.runs.append(PlannedRun(name, overrides, values))
    sweep.planned = list(sweep.runs)
    if only:
        sweep.runs = [r for r in sweep.runs if any(fnmatch.fnmatch(r.name, p) for p in only)]
        if not sweep.runs:
            raise ConfigError(f"{path}: no run name matches --only {' '.join(only)}")
    return sweep


def _execute(config_path: str, overrides: list[str], run_dir: str, threads: int | None) -> str:
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
    from hftlab.context import MARKER
    from hftlab.pipeline import CHECKPOINTS, STAGES
    from hftlab.train import checkpoint_step

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
    for run in sweep.runs:
        progress = run_progress(sweep.run_dir(run))
        note = progress
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
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_json(sweep.out / "sweep.json", {
        "sweep": str(sweep.source), "config": str(sweep.config),
        "runs": [{"name": r.name, "overrides": r.overrides, "values": r.values}
                 for r in sweep.planned or sweep.runs],
    })
    todo = [r for r in sweep.runs if not (sweep.run_dir(r) / "metrics.json").exists()]
    log.info("sweep %s: %d runs, %d to do", sweep.source, len(sweep.runs), len(todo))
    failures: list[tuple[str, str]] = []
    if workers <= 1:
        for number, run in enumerate(todo, 1):
            print(f"[{number}/{len(todo)}] {run.name}", flush=True)
            try:
                _execute(str(sweep.config), run.overrides, str(sweep.run_dir(run)), None)
            except Exception as exc:  # one failed run must not stop the sweep
                failures.append((run.name, _describe(exc)))
        return _record_failures(sweep, failures)
    plan = AlignmentOrder([(run, *alignment_group(sweep, run)) for run in todo])
    threads = max(1, (os.cpu_count() or 1) // workers)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    # One fresh process per run: a run's recorded peak memory is its process's lifetime peak
    # (ru_maxrss), so a reused worker would pass one run's peak on to the next. Python 3.10's
    # pool cannot recycle workers; there the peaks carry over.
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent,
                             initargs=(os.getpid(),), **fresh) as pool:
        def submit(batch: list[PlannedRun]) -> dict[Future[str], PlannedRun]:
            return {pool.submit(_execute, str(sweep.config), r.overrides,
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
    return _record_failures(sweep, failures)


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


def _record_failures(sweep: Sweep, failures: list[tuple[str, str]]) -> list[tuple[str, str]]:
    path = sweep.out / "failures.json"
    if failures:
        write_json(path, [{"run": n, "error": e} for n, e in failures])
    elif path.exists():
        path.unlink()
    return failures


# ------------------------------------------------------------------------------ aggregation


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("defense_args", "attack_args",
                                                              "judge_args", "options"):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass
class RunRecord:
    path: Path
    settings: dict[str, Any]  # the flattened config
    metrics: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.settings.get("seed", 0))


def current_config_text(path: Path) -> str:
    """A run's saved config with settings added since it ran at their defaults (so runs made by
    different hftlab versions group together); the file as is if it no longer loads."""
    from hftlab.config import dump_config

    try:
        return dump_config(load_config(path))
    except ConfigError:
        return path.read_text()


def collect_runs(folder: Path) -> list[RunRecord]:
    """Every finished run (a folder with metrics.json and config.yaml) under ``folder``."""
    records = []
    for path in sorted(folder.rglob("metrics.json")):
        config = path.parent / "config.yaml"
        if not config.is_file():
            continue
        settings = flatten(yaml.safe_load(current_config_text(config)) or {})
        settings.pop("checkpoint_every", None)  # how often a stage saved: not an experiment
        metrics = read_json(path)
        if metrics.get("precision"):
            # `auto` resolves per machine (bf16 only where the CPU or GPU has it natively) and
            # bf16 and fp32 training give different models: never pool them into one cell
            settings["model.precision"] = metrics["precision"]
        records.append(RunRecord(path.parent, settings, metrics))
    if not records:
        raise FileNotFoundError(f"no finished runs (metrics.json + config.yaml) under {folder}")
    return records


RECORD_FILES = ("metrics.json", "config.yaml")


def export_records(source: Path, out: Path) -> list[Path]:
    """Copy each finished run's record (metrics.json and config.yaml: scores, curves, drift,
    timings, the resolved config) from ``source`` into ``out``, keeping the folder layout.
    Checkpoints and completions stay behind, so the records are small enough to commit and
    carry no model outputs; ``hftlab compare`` and ``hftlab report`` work on them as on runs."""
    if out.resolve().is_relative_to(source.resolve()):
        raise ConfigError(f"export folder {out} lies inside {source}: a later export would "
                          "collect its own records again; choose a folder outside it")
    written = []
    for record in collect_runs(source):
        target = out / record.path.relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            shutil.copyfile(record.path / name, target / name)
        written.append(target)
    return written


def metric_value(metrics: dict[str, Any], name: str) -> Any:
    """A metrics.json value by name: a top-level key (``aligned.harmful_score``) or a dotted
    path into a nested block (``attack_eval.triggered.harmful_score``); None when absent."""
    if name in metrics:
        return metrics[name]
    value: Any = metrics
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def default_metrics(records: list[RunRecord]) -> tuple[str, ...]:
    """HS and FA, plus the harmful score of each attack eval variant the runs report (e.g. a
    backdoor attack's HS with its trigger)."""
    variants = sorted({name for r in records for name in (r.metrics.get("attack_eval") or {})})
    return METRICS + tuple(f"attack_eval.{v}.harmful_score" for v in variants)


@dataclass
class Cell:
    """Runs that differ only in their seed."""

    label: dict[str, Any]  # the settings that vary between cells
    runs: list[RunRecord]

    def values(self, metric: str) -> list[float]:
        found = (metric_value(r.metrics, metric) for r in self.runs)
        return [float(v) for v in found if v is not None]

    def summary(self, metric: str) -> Summary | None:
        values = self.values(metric)
        return summarize(values) if values else None

    def n_prompts(self, metric: str) -> int:
        if metric.startswith("attack_eval."):  # a variant carries its own sample size
            variant = metric.split(".")[1]
            return int(metric_value(self.runs[0].metrics, f"attack_eval.{variant}.n") or 0)
        key = "n_eval_harmful" if "harmful" in metric else "n_eval_task"
        return int(self.runs[0].metrics.get(key) or 0)

    @property
    def name(self) -> str:
        """``defense=lisa, defense_args={...}``; empty option mappings (``defense_args={}``
        beside a cell that sets some) are left out of the name, not out of the label."""
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in self.label.items()
                         if v != {})


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def _frozen(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def group_cells(records: Iterable[RunRecord]) -> list[Cell]:
    records = list(records)
    keys = sorted({k for r in records for k in r.settings} - NOT_CELL_KEYS)
    varying = [k for k in keys
               if len({_frozen(r.settings.get(k)) for r in records}) > 1]
    cells: dict[str, Cell] = {}
    for record in records:
        label = {k: record.settings.get(k) for k in varying}
        cell = cells.setdefault(_frozen(label), Cell(label, []))
        if any(r.seed == record.seed for r in cell.runs):
            # the same run in two folders (a copy): count it once
            log.warning("%s repeats %s (same config and seed); counted once", record.path,
                        next(r.path for r in cell.runs if r.seed == record.seed))
            continue
        cell.runs.append(record)
    return list(cells.values())


def default_baseline(cells: list[Cell]) -> str:
    """``sft`` when the defense varies between cells; else the lowest poison ratio when that
    varies (the ratio sweep: each p against p = min); else ``sft``."""
    keys = {k for c in cells for k in c.label}
    if "defense" in keys:
        return "sft"
    for key in sorted(keys):
        if key.endswith("poison_ratio"):
            lowest = min(c.label[key] for c in cells if key in c.label)
            return f"{key}={lowest}"
    return "sft"


def baseline_setting(cells: list[Cell], baseline: str) -> tuple[str, Any]:
    """``--baseline`` as (setting, value): a defense name (``sft``), or ``KEY=VALUE`` for any
    setting that varies between cells (``poison_ratio=0.0``: the key may drop its section)."""
    key, sep, text = baseline.partition("=")
    if not sep:
        return "defense", baseline
    value = yaml.safe_load(text)
    keys = {k for c in cells for k in c.label}
    for candidate in sorted(keys):
        if candidate == key or candidate.endswith(f".{key}"):
            return candidate, value
    raise ConfigError(f"--baseline {baseline}: '{key}' is not a setting that varies between "
                      f"cells; choose one of {', '.join(sorted(keys)) or '(none vary)'}")


def baseline_of(cell: Cell, cells: list[Cell], key: str, value: Any) -> Cell | None:
    """The cell whose setting ``key`` is ``value`` (see :func:`baseline_setting`) and every
    other varying setting equal to ``cell``'s; None for a baseline cell itself."""
    ignore = {key, "defense_args"} if key == "defense" else {key}
    if key in cell.label and cell.label[key] == value:
        return None
    want = {k: v for k, v in cell.label.items() if k not in ignore}
    for other in cells:
        if key in other.label and other.label[key] == value and \
                {k: v for k, v in other.label.items() if k not in ignore} == want:
            return other
    return None


def difference(cell: Cell, base: Cell, metric: str) -> Difference | None:
    a, b = cell.values(metric), base.values(metric)
    if not a or not b:
        return None
    return compare(a, b, cell.n_prompts(metric), base.n_prompts(metric))


def _records(source: Path | list[RunRecord]) -> list[RunRecord]:
    """A folder's finished runs, read once; records already read pass through."""
    return collect_runs(source) if isinstance(source, Path) else source


def compare_rows(source: Path | list[RunRecord], baseline: str | None = None,
                 metrics: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per cell of a folder's runs (or of runs already read): each metric's
    mean/std/CI over seeds and its difference to the baseline cell with the same other
    settings (defaults: :func:`default_baseline`, :func:`default_metrics`)."""
    records = _records(source)
    metrics = metrics or default_metrics(records)
    cells = group_cells(records)
    baseline = baseline or default_baseline(cells)
    key, value = baseline_setting(cells, baseline)
    cells.sort(key=lambda c: c.label.get(key) != value)  # the baseline first (a stable sort)
    rows = []
    for cell in cells:
        base = baseline_of(cell, cells, key, value)
        row: dict[str, Any] = {"cell": cell.label, "name": cell.name, "seeds":
                               sorted(r.seed for r in cell.runs)}
        for metric in metrics:
            summary = cell.summary(metric)
            row[metric] = summary.as_dict() if summary else None
            diff = difference(cell, base, metric) if base else None
            row[f"{metric}.vs_{baseline}"] = None if diff is None else {
                "diff": round(diff.diff, 3), "ci95": [round(c, 3) for c in diff.ci],
                "significant": diff.significant, "test": diff.test}
        rows.append(row)
    return rows


def compare_table(source: Path | list[RunRecord], baseline: str | None = None,
                  metrics: tuple[str, ...] | None = None) -> str:
    """The console / markdown table of :func:`compare_rows`."""
    records = _records(source)
    metrics = metrics or default_metrics(records)
    baseline = baseline or default_baseline(group_cells(records))
    rows = compare_rows(records, baseline, metrics)
    header = ["cell", "seeds"]
    for metric in metrics:
        header += [metric, f"Δ vs {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"] or "(all runs)", ",".join(map(str, row["seeds"]))]
        for metric in metrics:
            s = row[metric]
            if s is None:
                cells += ["—", "—"]
                continue
            text = f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["std"] is not None else "")
            d = row[f"{metric}.vs_{baseline}"]
            delta = "—" if d is None else (
                f"{d['diff']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"
                + (" *" if d["significant"] else ""))
            cells += [text, delta]
        lines.append("| " + " | ".join(cells) + " |")
    tests = {row[f"{m}.vs_{baseline}"]["test"] for row in rows for m in metrics
             if row.get(f"{m}.vs_{baseline}")}
    lines += ["", f"mean ± std over seeds; Δ = difference to {baseline} with its 95% interval "
              f"({'; '.join(sorted(tests)) or 'no baseline cells'}); * = interval excludes 0"]
    return "\n".join(lines)
