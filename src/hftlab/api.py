"""The Python API, for notebooks and scripts: :func:`run`, :func:`sweep` and :func:`compare`
do what ``hftlab run``, ``hftlab sweep`` and ``hftlab compare`` do, and return data instead of
printing it. ``import hftlab`` stays cheap: torch and the plug-ins load on the first call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from hftlab.run_metrics import RunMetrics


def _overrides(overrides: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
    """``key=value`` items for the config loader; JSON is YAML, so every value keeps its type."""
    return [f"{key}={json.dumps(value)}" for key, value in {**(overrides or {}),
                                                           **settings}.items()]


def run(config: Any = None, out: str | Path | None = None,
        overrides: dict[str, Any] | None = None, *, force: bool = False,
        **settings: Any) -> RunMetrics:
    """Run (or resume) one experiment and return its metrics; the run folder gets the same
    files as ``hftlab run`` (metrics.json, report.md, report.html).

    ``config``: a YAML path, a :class:`~hftlab.config.Config`, or None for the defaults.
    ``overrides``: dotted keys, ``{"finetune.poison_ratio": 0.2}``; ``settings``: top-level
    keys as keyword arguments, ``seed=1, defense="lisa"``. ``out``: the run folder (default:
    the config's ``out_dir``, else ``runs/<config file name>``)."""
    from hftlab.cli import check_out_dir
    from hftlab.config import Config, dump_config, load_config
    from hftlab.experiment import build_experiment
    from hftlab.pipeline import run_pipeline
    from hftlab.report import write_report

    items = _overrides(overrides, settings)
    if isinstance(config, Config):
        # the config as its YAML text, so overrides apply and validate as they do on a file
        raw = yaml.safe_load(dump_config(config))
        items = [f"{key}={json.dumps(value)}" for key, value in raw.items()] + items
        config, where, stem = load_config(None, items), "config", "run"
    else:
        where, stem = str(config or "defaults"), Path(config).stem if config else "run"
        config = load_config(config, items)
    experiment = build_experiment(config, where)  # every check, before any file is written
    run_dir = Path(out or config.out_dir or Path("runs") / stem)
    check_out_dir(run_dir, "out" if out else "out_dir" if config.out_dir else "run folder")
    metrics = run_pipeline(config, run_dir, force=force, experiment=experiment)
    write_report(run_dir)
    return metrics


def sweep(path: str | Path, only: list[str] | None = None, workers: int = 1,
          overrides: list[str] | None = None, out: str | Path | None = None) -> list[Path]:
    """Run (or resume) a sweep file's runs and return their folders, in the file's order;
    ``only``: globs on run names (a subset); ``overrides``: ``key=value`` settings for every
    run; ``out``: the sweep folder instead of the file's. Runs that fail do not stop the
    others; a RuntimeError names them after the rest finished."""
    from hftlab.cli import check_out_dir
    from hftlab.sweep import load_sweep, run_sweep

    plan = load_sweep(Path(path), only, overrides, Path(out) if out is not None else None)
    check_out_dir(plan.out, f"{path}: out")
    failures = run_sweep(plan, workers)
    if failures:
        raise RuntimeError("; ".join(f"run {name} failed: {error}" for name, error in failures))
    return [plan.run_dir(r) for r in plan.runs]


def compare(folder: str | Path, baseline: str | None = None,
            metrics: list[str] | None = None) -> list[dict[str, Any]]:
    """``hftlab compare`` as rows of plain values, one per cell (``pandas.DataFrame(rows)``;
    ``hftlab compare --format csv`` writes the same rows): the cell's name, each varying
    setting, its seeds, the baseline, and per metric the mean, std, 95% interval and the
    difference to the baseline cell with its interval, significance and test. An unknown
    baseline or metric is a ConfigError with a did-you-mean."""
    from hftlab.compare_format import flat_rows

    return flat_rows(Path(folder), baseline, tuple(metrics) if metrics else None)[1]
