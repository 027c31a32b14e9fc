"""Optional experiment tracking (config ``tracking: {backend: tensorboard | mlflow | wandb}``):
the run's config, each training stage's per-step curves (loss, learning rate, tokens/s), each
stage's ``stage.json`` numbers, the final scores and a final table go to the chosen backend.

Only the main process logs. Every backend's library is imported inside its tracker, when a run
starts one, so ``import hftlab`` imports none of them; a missing one is a ConfigError from
:func:`check_tracking` when the experiment is built, before any work. Tracking is not part of
the run: it enters no cache key, and changing it never makes a run folder "a different run".
The backends, and :func:`~hftlab.tracking_backends.start_tracker` that picks one, live in
:mod:`hftlab.tracking_backends`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hftlab import progress
from hftlab.errors import ConfigError, unknown_name_message

if TYPE_CHECKING:
    from hftlab.config import TrackingConfig
    from hftlab.run_metrics import RunMetrics

__all__ = ["BACKENDS", "Tracker", "check_tracking", "check_tracking_settings", "final_summary",
           "flatten"]

BACKENDS = ("none", "tensorboard", "mlflow", "wandb")
# backend -> (module it imports, what to pip install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}
DEFAULT_PROJECT = "hftlab"
SCORE_BLOCKS = ("base", "aligned", "finetuned", "final")  # the final table's rows, in order
TABLE_COLUMNS = ["model", "harmful_score", "finetune_accuracy", "over_refusal"]


class Tracker:
    """The tracking interface; this base class logs nothing (tracking off, or a process other
    than the main one). Stage names are the run folder's (``align``, ``finetune``, ...)."""

    def start(self, run_name: str, config: dict[str, Any]) -> None:
        """Open the run; ``config``: the run's config, flat (``finetune.train.lr``)."""

    def log_step(self, stage: str, step: int, values: dict[str, float]) -> None:
        """One optimizer step of a training stage (``loss``, ``lr``, ``tok_s``)."""

    def log_stage(self, stage: str, info: Mapping[str, Any]) -> None:
        """A finished (or earlier finished) stage's record, its ``stage.json``."""

    def log_final(self, values: dict[str, float], columns: list[str],
                  rows: list[list[Any]]) -> None:
        """The run's scores (``final/harmful_score``, ...) and its table of models × scores."""

    def finish(self, failed: bool = False) -> None:
        """Close the run (``failed``: it stopped with an error or an interrupt)."""

    def step_callback(self, stage: str, on_step: Any) -> Any:
        """The ``on_step`` callback a training stage passes its trainer: ``on_step`` itself
        when nothing is tracked, else one that also logs each step (:class:`StepLog`)."""
        return on_step


class StepLog:
    """A training stage's ``on_step`` while tracking: calls the stage's own callback (the
    mechanism curves), then logs the step's loss, learning rate and the tokens/s its progress
    line shows. The callback's state still travels with the trainer's checkpoints."""

    def __init__(self, tracker: Tracker, stage: str,
                 on_step: Callable[[Any, float], None] | None) -> None:
        self.tracker = tracker
        self.stage = stage
        self.on_step = on_step

    def __call__(self, trainer: Any, loss: float) -> None:
        values = {"loss": float(loss)}
        if trainer.optimizer is not None:
            values["lr"] = float(trainer.optimizer.param_groups[0]["lr"])
        # read before the stage's callback, which may show a progress of its own
        bar = progress.current()
        tok_s = bar.postfix.get("tok_s") if bar is not None else None
        if isinstance(tok_s, (int, float)):
            values["tok_s"] = float(tok_s)
        if self.on_step is not None:
            self.on_step(trainer, loss)
        self.tracker.log_step(self.stage, trainer.step, values)

    def state_dict(self) -> dict[str, Any] | None:
        state = getattr(self.on_step, "state_dict", None)
        return state() if state is not None else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.on_step, "load_state_dict", None)
        if load is not None:
            load(state)


class LoggingTracker(Tracker):
    """The part every backend shares: its per-step hook."""

    def step_callback(self, stage: str, on_step: Any) -> Any:
        return StepLog(self, stage, on_step)


def check_tracking_settings(tracking: TrackingConfig, fail: Callable[[str, str], None]) -> None:
    """A known backend, and a URI only where it means something (part of
    :func:`hftlab.config.validate`; whether the backend's library is installed is
    :func:`check_tracking`'s question, asked when the experiment is built)."""
    if tracking.backend not in BACKENDS:
        fail("tracking.backend", unknown_name_message(
            "tracking backend", str(tracking.backend), list(BACKENDS)))
    if tracking.uri is not None and tracking.backend != "mlflow":
        fail("tracking.uri", f"is set, but only the mlflow backend reads it (backend is "
             f"{tracking.backend!r}); use tracking.dir for where local files go")


def check_tracking(cfg: TrackingConfig) -> None:
    """The backend's library is installed (one ConfigError saying what to install if not)."""
    if cfg.backend == "none":
        return
    module, package = PACKAGES[cfg.backend]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"'tracking.backend' is {cfg.backend!r}, but {package} is not installed: "
            f"pip install 'hftlab[tracking]' (or pip install {package}), or set "
            "tracking.backend: none")


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested mappings as one level of ``a/b/c`` keys (``sep`` between the parts)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}{sep}", sep))
        else:
            out[name] = value
    return out


def numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of nested ``data`` (bools as 0/1), flat, each key after ``prefix``."""
    return {f"{prefix}{k}": float(v) for k, v in flatten(data).items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def final_summary(metrics: RunMetrics) -> tuple[dict[str, float], list[str], list[list[Any]]]:
    """What :meth:`Tracker.log_final` takes: every evaluated model's scores
    (``final/harmful_score``, ``aligned/finetune_accuracy``, attack variants, the drift's
    mean), and the table of models × scores (base, aligned, before a repair, final)."""
    data = metrics.to_dict()
    values: dict[str, float] = {}
    for block in (*SCORE_BLOCKS, "attack_eval", "repair"):
        values.update(numbers(data.get(block) or {}, f"{block}/"))
    drift = data.get("drift") or {}
    if drift.get("mean") is not None:
        values["drift/mean"] = float(drift["mean"])
    rows = [[name, *(data[name].get(c) for c in TABLE_COLUMNS[1:])]
            for name in SCORE_BLOCKS if data.get(name)]
    return values, list(TABLE_COLUMNS), rows


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (what TensorBoard's text tab and MLflow's artifact view render)."""
    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
