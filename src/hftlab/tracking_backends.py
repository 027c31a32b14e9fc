"""The trackers of :mod:`hftlab.tracking`, one per backend, each importing its library when it
is made (``import hftlab`` imports none of them), and :func:`start_tracker`, which makes and
starts the one a run's config asks for.

Names: per-step curves ``<stage>/loss`` (``/lr``, ``/tok_s``) against the stage's optimizer
step; a stage's record ``stage/<stage>/<key>``; the scores ``final/harmful_score``,
``aligned/finetune_accuracy``, ...; the table ``final_table``; the config ``config``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hftlab.tracking import (
    DEFAULT_PROJECT,
    LoggingTracker,
    Tracker,
    flatten,
    markdown_table,
    numbers,
)

if TYPE_CHECKING:
    from hftlab.config import TrackingConfig

TRACKING_DIR = "tracking"  # the local output's default folder inside the run folder
MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch call
MLFLOW_PARAM_CHARS = 500  # longer config values are cut (the whole config is an artifact too)


def make_tracker(cfg: TrackingConfig, run_dir: Path, is_main: bool) -> Tracker:
    """The tracker ``cfg`` asks for (a no-op one when off, or on a process other than the
    main one). Its local files go to ``tracking.dir``, by default ``<run>/tracking``."""
    if cfg.backend == "none" or not is_main:
        return Tracker()
    folder = Path(cfg.dir).expanduser() if cfg.dir else run_dir / TRACKING_DIR
    return BACKEND_TRACKERS[cfg.backend](cfg, folder)


def start_tracker(cfg: TrackingConfig, run_dir: Path, is_main: bool,
                  config: Mapping[str, Any]) -> Tracker:
    """A started tracker for the run in ``run_dir`` (run name: ``tracking.run_name``, by
    default the run folder's name); ``config``: the run's config as a nested mapping."""
    tracker = make_tracker(cfg, run_dir, is_main)
    tracker.start(cfg.run_name or run_dir.resolve().name, flatten(config, sep="."))
    return tracker


def _config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), indent=1, default=str)


class TensorBoardTracker(LoggingTracker):
    """Event files in ``folder`` (``tensorboard --logdir runs/`` shows every run); the config
    and the tables as text (Markdown)."""

    def __init__(self, cfg: TrackingConfig, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), **cfg.args)

    def start(self, run_name: str, config: dict[str, Any]) -> None:
        self.writer.add_text("config", f"run `{run_name}`\n\n```\n{_config_text(config)}\n```")

    def log_step(self, stage: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{stage}/{name}", value, step)

    def log_stage(self, stage: str, info: Mapping[str, Any]) -> None:
        for name, value in numbers(info, f"stage/{stage}/").items():
            self.writer.add_scalar(name, value, 0)
        self.writer.add_text(f"stage/{stage}", f"```\n{_config_text(info)}\n```")

    def log_final(self, values: dict[str, float], columns: list[str],
                  rows: list[list[Any]]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, 0)
        self.writer.add_text("final_table", markdown_table(columns, rows))

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker(LoggingTracker):
    """One MLflow run in experiment ``tracking.project``: the config as params (and as
    ``config.json``), curves and scores as metrics, the table as ``final_table.json`` and
    ``.md``. The store: ``tracking.uri``, else a local file store in ``folder/mlruns``."""

    def __init__(self, cfg: TrackingConfig, folder: Path) -> None:
        from mlflow.tracking import MlflowClient

        uri = cfg.uri
        if uri is None:
            # MLflow 3 keeps its file store only on request; it is the one local store that
            # needs no database package
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (folder / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = cfg.project or DEFAULT_PROJECT
        self.tags = {str(k): str(v) for k, v in cfg.args.items()}
        self.run_id = ""

    def start(self, run_name: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(self.experiment)
        experiment = (found.experiment_id if found is not None
                      else self.client.create_experiment(self.experiment))
        self.run_id = self.client.create_run(experiment, run_name=run_name,
                                             tags=self.tags).info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in config.items()]
        for first in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[first:first + MLFLOW_BATCH])
        self.client.log_dict(self.run_id, config, "config.json")

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for first in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + MLFLOW_BATCH])

    def log_step(self, stage: str, step: int, values: dict[str, float]) -> None:
        self._metrics({f"{stage}/{k}": v for k, v in values.items()}, step)

    def log_stage(self, stage: str, info: Mapping[str, Any]) -> None:
        self._metrics(numbers(info, f"stage/{stage}/"), 0)
        self.client.log_dict(self.run_id, dict(info), f"stages/{stage}.json")

    def log_final(self, values: dict[str, float], columns: list[str],
                  rows: list[list[Any]]) -> None:
        self._metrics(values, 0)
        self.client.log_dict(self.run_id, {"columns": columns, "data": rows},
                             "final_table.json")
        self.client.log_text(self.run_id, markdown_table(columns, rows), "final_table.md")

    def finish(self, failed: bool = False) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker(LoggingTracker):
    """One W&B run in project ``tracking.project``, files under ``folder`` (``wandb/``); extra
    ``wandb.init`` arguments from ``tracking.args`` (``mode: offline``, ``entity``, ``tags``).
    Each stage's curves have their own step axis (``<stage>/step``)."""

    def __init__(self, cfg: TrackingConfig, folder: Path) -> None:
        import wandb

        self.wandb = wandb
        self.cfg = cfg
        self.folder = folder
        self.run: Any = None
        self.axes: set[str] = set()

    def start(self, run_name: str, config: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        options = {"project": self.cfg.project or DEFAULT_PROJECT, "name": run_name,
                   "dir": str(self.folder), **self.cfg.args}
        self.run = self.wandb.init(config=config, **options)

    def log_step(self, stage: str, step: int, values: dict[str, float]) -> None:
        if stage not in self.axes:
            self.axes.add(stage)
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in values.items()}})

    def log_stage(self, stage: str, info: Mapping[str, Any]) -> None:
        self.run.summary.update(numbers(info, f"stage/{stage}/"))

    def log_final(self, values: dict[str, float], columns: list[str],
                  rows: list[list[Any]]) -> None:
        self.run.summary.update(values)
        self.run.log({"final_table": self.wandb.Table(columns=columns, data=rows)})

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


BACKEND_TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}
