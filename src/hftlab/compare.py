"""Reading finished runs: collect every run folder under a path, group the runs that differ only
in their seed into cells, summarise each metric over seeds and test each cell against a
baseline cell (Welch's t across seeds, or a two-proportion test when a side has one seed).
``hftlab compare``, ``hftlab export`` and the sweep report are built on it; any folder of run
records works, whether a sweep made it or not.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from hftlab.compare_checks import check_defense, check_metrics, check_value, unknown_setting
from hftlab.config import ConfigError, load_config, load_yaml
from hftlab.run_metrics import RunMetrics
from hftlab.setting_names import names_setting, setting_names
from hftlab.stats import SHARED, Difference, Summary, compare, summarize

log = logging.getLogger(__name__)
# keys that do not define a cell: seeds are repetitions, paths are where things live, and a
# resumed stage reaches the same weights as an uninterrupted one (checkpoint_every)
NOT_CELL_KEYS = {"seed", "out_dir", "cache_dir", "data_root", "checkpoint_every",
                 "checkpoint_minutes"}
METRICS = ("harmful_score", "finetune_accuracy")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        sources = value.get("sources") if key == "options" and isinstance(value, dict) else None
        if isinstance(sources, list) and all(isinstance(s, dict) for s in sources):
            # a mix's sources one by one, so that cells differing in one source are named by
            # that source's field, not by the whole list
            rest = {k: v for k, v in value.items() if k != "sources"}
            if rest:
                out[name] = rest
            for index, source in enumerate(sources):
                out.update(flatten(source, f"{name}.sources[{index}]."))
        elif isinstance(value, dict) and value and key not in ("defense_args", "attack_args",
                                                                "judge_args", "options"):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass
class RunRecord:
    path: Path
    settings: dict[str, Any]  # the flattened config
    metrics: RunMetrics

    @property
    def seed(self) -> int:
        return int(self.settings.get("seed", 0))


def current_config_text(path: Path) -> str:
    """A run's saved config with settings added since it ran at their defaults (so runs made by
    different hftlab versions group together) and the fine-tuning settings its defense trained
    with (Antidote trains its own rank-256 adapter: its cell is named r=256 and pairs with the
    sft cell of that adapter); the file as is if it no longer loads."""
    from hftlab.config import dump_config
    from hftlab.defenses.composite import build_defense

    try:
        config = load_config(path)
    except ConfigError:
        return path.read_text()
    try:
        defense = build_defense(config.defense, config.defense_args)
    except ConfigError:  # a defense or option this version no longer has: the settings as saved
        return dump_config(config)
    train = defense.finetune_train(config.finetune.train)
    return dump_config(replace(config, finetune=replace(config.finetune, train=train)))


def collect_runs(folder: Path) -> list[RunRecord]:
    """Every finished run (a folder with metrics.json and config.yaml) under ``folder``."""
    records = []
    for path in sorted(folder.rglob("metrics.json")):
        config = path.parent / "config.yaml"
        if not config.is_file():
            continue
        settings = flatten(yaml.safe_load(current_config_text(config)) or {})
        for key in list(settings):  # how often a stage saved, where curves were logged
            if key in ("checkpoint_every", "checkpoint_minutes") or key.startswith("tracking."):
                settings.pop(key, None)
        metrics = RunMetrics.load(path)
        if metrics.precision:
            # `auto` resolves per machine (bf16 only where the CPU or GPU has it natively) and
            # bf16 and fp32 training give different models: never pool them into one cell
            settings["model.precision"] = metrics.precision
        # likewise resolved: a fine-tuning at the run's own precision is no separate cell
        settings.pop("finetune.precision", None)
        if metrics.finetune_precision:
            settings["finetune.precision"] = metrics.finetune_precision
        records.append(RunRecord(path.parent, settings, metrics))
    if not records:
        raise FileNotFoundError(f"no finished runs (metrics.json + config.yaml) under {folder}")
    return records


RECORD_FILES = ("metrics.json", "config.yaml")
# the training stages' markers, when present: each defense's stage report (Booster's h(w) /
# h(w') trace, T-Vaccine's layers, TAR's diagnostics, Panacea's ε norms), counts and timings
STAGE_RECORDS = ("align/stage.json", "finetune/stage.json", "post_finetune/stage.json")


def export_records(source: Path, out: Path) -> list[Path]:
    """Copy each finished run's record (metrics.json and config.yaml: scores, curves, drift,
    timings, the resolved config; and the training stages' stage.json with each defense's stage
    report) from ``source`` into ``out``, keeping the folder layout.
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
        for name in STAGE_RECORDS:
            if (record.path / name).is_file():
                (target / name).parent.mkdir(exist_ok=True)
                shutil.copyfile(record.path / name, target / name)
        written.append(target)
    return written


# metrics.json values that are percentages of the evaluation prompts (any model: base.,
# aligned., attack_eval.<variant>.); everything else (counts, losses, drift) is not
PERCENTAGE_METRICS = {"harmful_score", "finetune_accuracy", "harmful_score_without_task_labels",
                      "harmful_score_empty_as_harmless", "task_refusal"}


def is_percentage(metric: str) -> bool:
    """Whether ``metric`` is a percentage of evaluation prompts (so a run with one seed can
    still be tested with the two-proportion test)."""
    return metric.rsplit(".", 1)[-1] in PERCENTAGE_METRICS


def default_metrics(records: list[RunRecord]) -> tuple[str, ...]:
    """HS and FA, plus the harmful score of each attack eval variant the runs report (e.g. a
    backdoor attack's HS with its trigger)."""
    variants = sorted({name for r in records for name in (r.metrics.attack_eval or {})})
    return METRICS + tuple(f"attack_eval.{v}.harmful_score" for v in variants)


@dataclass
class Cell:
    """Runs that differ only in their seed."""

    label: dict[str, Any]  # the settings that vary between cells
    runs: list[RunRecord]

    def values(self, metric: str) -> list[float]:
        return self.series(lambda m: m.value(metric))

    def series(self, get: Callable[[RunMetrics], Any]) -> list[float]:
        """``get`` of each run's metrics, where present."""
        found = (get(r.metrics) for r in self.runs)
        return [float(v) for v in found if v is not None]

    def summary(self, metric: str) -> Summary | None:
        values = self.values(metric)
        return summarize(values) if values else None

    def n_prompts(self, metric: str) -> int:
        """The prompts a percentage metric was measured on in one run; 0 for any other metric
        (a count, a loss, a drift), which has no two-proportion test."""
        if not is_percentage(metric):
            return 0
        metrics = self.runs[0].metrics
        if metric.startswith("attack_eval."):  # a variant carries its own sample size
            variant = (metrics.attack_eval or {}).get(metric.split(".")[1])
            return int(variant.n or 0) if variant else 0
        final = metrics.final
        return int((final.n_eval_harmful if "harmful" in metric else final.n_eval_task) or 0)

    @property
    def name(self) -> str:
        """``defense=lisa, defense_args={...}``; unset settings and empty option mappings
        (``defense_args={}`` beside a cell that sets some) are left out of the name, not out of
        the label; a cell that sets nothing its neighbours set is named by what it leaves unset
        (``finetune.precision=None``), so that no cell but the only one reads "(all runs)"."""
        named = {k: v for k, v in self.label.items() if v != {}}
        named = {k: v for k, v in named.items() if v is not None} or named
        short = setting_names(self.label)
        return ", ".join(f"{short[k]}={_short(v)}" for k, v in named.items())


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


def baseline_setting(cells: list[Cell], baseline: str, check: bool = True) -> tuple[str, Any]:
    """``--baseline`` as (setting, value): a defense name (``sft``), or ``KEY=VALUE`` for any
    setting that varies between cells (``poison_ratio=0.0``: the key may drop its section).
    ``check``: a ConfigError (with a did-you-mean) when no run has that defense or value."""
    key, sep, text = baseline.partition("=")
    if not sep:
        if check:
            check_defense(cells, baseline)
        return "defense", baseline
    value = load_yaml(text, f"--baseline {baseline}", lines=False)
    keys = sorted({k for c in cells for k in c.label})
    for candidate in keys:
        if names_setting(key, candidate):
            if check:
                check_value(cells, baseline, candidate, value)
            return candidate, value
    raise unknown_setting(baseline, key, keys)


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
    """The cell's difference to its baseline: Welch with two or more seeds on each side, else
    the two-proportion test, which only a percentage of prompts has (None otherwise)."""
    a, b = cell.values(metric), base.values(metric)
    if not a or not b:
        return None
    if (len(a) < 2 or len(b) < 2) and not (cell.n_prompts(metric) and base.n_prompts(metric)):
        return None
    return compare(a, b, cell.n_prompts(metric), base.n_prompts(metric))


def _records(source: Path | list[RunRecord]) -> list[RunRecord]:
    """A folder's finished runs, read once; records already read pass through."""
    return collect_runs(source) if isinstance(source, Path) else source


def compare_rows(source: Path | list[RunRecord], baseline: str | None = None,
                 metrics: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per cell of a folder's runs (or of runs already read): each metric's
    mean/std/CI over seeds and its difference to the baseline cell with the same other
    settings (defaults: :func:`default_baseline`, :func:`default_metrics`). A baseline other
    than the default that names no cell, and a metric no run records, are ConfigErrors."""
    records = _records(source)
    metrics = metrics or default_metrics(records)
    check_metrics(records, metrics)
    cells = group_cells(records)
    default = default_baseline(cells)
    baseline = baseline or default
    key, value = baseline_setting(cells, baseline, check=baseline != default)
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
                "diff": round(diff.diff, 3),
                "ci95": None if diff.ci is None else [round(c, 3) for c in diff.ci],
                "significant": diff.significant, "test": diff.test}
        rows.append(row)
    return rows


def summary_text(summary: dict[str, Any] | None) -> str:
    """``mean ± std`` of a row's metric (``mean`` for one seed, ``—`` when absent)."""
    if summary is None:
        return "—"
    std = summary["std"]
    return f"{summary['mean']:.1f}" + ("" if std is None else f" ± {std:.1f}")


def delta_text(delta: dict[str, Any] | None, star: bool = True) -> str:
    """``+Δ [low, high] *`` of a row's difference; ``+Δ (no interval)`` where the seeds share
    the value (see :data:`hftlab.stats.SHARED`); ``—`` without a baseline cell."""
    if delta is None:
        return "—"
    if delta["ci95"] is None:
        return f"{delta['diff']:+.1f} (no interval)"
    low, high = delta["ci95"]
    return (f"{delta['diff']:+.1f} [{low:+.1f}, {high:+.1f}]"
            + (" *" if star and delta["significant"] else ""))


def footnote(rows: list[dict[str, Any]], metrics: tuple[str, ...], baseline: str) -> str:
    """What the table's numbers are: the tests behind its Δ columns."""
    tests = {row[f"{m}.vs_{baseline}"]["test"] for row in rows for m in metrics
             if row.get(f"{m}.vs_{baseline}")}
    text = (f"mean ± std over seeds; Δ = difference to {baseline} with its 95% interval "
            f"({'; '.join(sorted(tests - {SHARED})) or 'no baseline cells'}); "
            "* = interval excludes 0")
    if SHARED in tests:
        text += ("; (no interval) = every seed of both cells gave one value (seeds sharing "
                 "it, e.g. one cached alignment): nothing to test, never *")
    return text


def compare_table(source: Path | list[RunRecord], baseline: str | None = None,
                  metrics: tuple[str, ...] | None = None) -> str:
    """The console / markdown table of :func:`compare_rows`."""
    records = _records(source)
    metrics = metrics or default_metrics(records)
    rows = compare_rows(records, baseline, metrics)
    baseline = baseline or default_baseline(group_cells(records))
    header = ["cell", "seeds"]
    for metric in metrics:
        header += [metric, f"Δ vs {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"] or "(all runs)", ",".join(map(str, row["seeds"]))]
        for metric in metrics:
            s = row[metric]
            delta = None if s is None else row[f"{metric}.vs_{baseline}"]
            cells += [summary_text(s), delta_text(delta)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", footnote(rows, metrics, baseline)]
    return "\n".join(lines)
