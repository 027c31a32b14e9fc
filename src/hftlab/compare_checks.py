"""What ``hftlab compare`` is asked for, checked against the runs it reads: a baseline that
names no cell or a metric that no run records is an error with a did-you-mean, not a table of
dashes."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hftlab.config import ConfigError
from hftlab.setting_names import setting_name

if TYPE_CHECKING:
    from hftlab.compare import Cell, RunRecord


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean X?)`` for the closest choice, or nothing when none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _paths(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _paths(value, f"{name}.")
        else:
            yield name, value


def metric_paths(records: list[RunRecord]) -> dict[str, bool]:
    """Every metric name the runs record (the v1 keys and dotted paths into metrics.json's
    blocks) → whether some run holds a number there."""
    found: dict[str, bool] = {}
    for record in records:
        for view in (record.metrics.as_v1(), record.metrics.to_dict()):
            for name, value in _paths(view):
                found[name] = found.get(name, False) or is_number(value)
    return found


def check_metrics(records: list[RunRecord], metrics: tuple[str, ...]) -> None:
    """ConfigError for a metric that no run records, or that names a block or a text rather
    than a number; a key that every run left empty passes (its column is empty)."""
    paths: dict[str, bool] | None = None
    for metric in metrics:
        present = [v for v in (r.metrics.value(metric) for r in records) if v is not None]
        if any(is_number(v) for v in present):
            continue
        paths = paths if paths is not None else metric_paths(records)
        numeric = sorted(p for p, number in paths.items() if number)
        if present:
            inside = [p for p in numeric if p.startswith(f"{metric}.")]
            what = ("a block of metrics.json, not a number" if isinstance(present[0], Mapping)
                    else f"not a number (e.g. {present[0]!r})")
            hint = f"; choose one of {', '.join(inside[:8])}" if inside else ""
            raise ConfigError(f"metric '{metric}' is {what}{hint}")
        if metric in paths:
            continue
        hint = did_you_mean(metric, numeric) or (
            "; metrics are metrics.json keys (harmful_score, finetune_accuracy, ...) or dotted "
            "paths into its blocks (e.g. stages.align.seconds_per_step)")
        raise ConfigError(f"unknown metric '{metric}': no run's metrics.json has it{hint}")


def check_defense(cells: list[Cell], name: str) -> None:
    """ConfigError unless some run used defense ``name`` (a ``--baseline`` without ``=``)."""
    defenses = sorted({str(r.settings["defense"]) for c in cells for r in c.runs
                       if r.settings.get("defense") is not None})
    if name in defenses:
        return
    varying = sorted({setting_name(k) for c in cells for k in c.label})
    other = (f", or KEY=VALUE for a setting that varies ({', '.join(varying)})"
             if varying else "")
    raise ConfigError(f"unknown baseline '{name}': no run used that defense"
                      f"{did_you_mean(name, defenses)}; the runs' defenses: "
                      f"{', '.join(defenses) or '(none)'}{other}")


def check_value(cells: list[Cell], baseline: str, key: str, value: Any) -> None:
    """ConfigError unless some cell has setting ``key`` = ``value`` (``--baseline KEY=VALUE``)."""
    values = sorted({str(c.label[key]) for c in cells if key in c.label})
    if any(key in c.label and c.label[key] == value for c in cells):
        return
    raise ConfigError(f"baseline {baseline} matches no cell; "
                      f"{key} is one of {', '.join(values)}")


def unknown_setting(baseline: str, key: str, keys: list[str]) -> ConfigError:
    """The error for ``--baseline KEY=VALUE`` whose key does not vary between cells."""
    short = sorted({setting_name(k) for k in keys} | set(keys))
    return ConfigError(f"--baseline {baseline}: '{key}' is not a setting that varies between "
                       f"cells{did_you_mean(key, short)}; choose one of "
                       f"{', '.join(sorted(keys)) or '(none vary)'}")
