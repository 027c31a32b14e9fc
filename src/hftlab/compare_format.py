"""``hftlab compare`` as data: one flat row per cell (the Python API's rows) and those rows as
CSV or JSON, with the numbers the markdown table prints as numbers, not formatted text."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hftlab.compare import (
    RunRecord,
    collect_runs,
    compare_rows,
    compare_table,
    default_baseline,
    default_metrics,
    group_cells,
)

FORMATS = ("markdown", "csv", "json")
#: each metric's columns, ``<metric>.<field>``: its summary over seeds, then its difference to
#: the baseline cell (empty for the baseline itself and where no test applies)
METRIC_FIELDS = ("n", "mean", "std", "ci95_low", "ci95_high", "diff", "diff_ci95_low",
                 "diff_ci95_high", "significant", "test")


def flat_row(row: dict[str, Any], metrics: tuple[str, ...], baseline: str) -> dict[str, Any]:
    """A :func:`~hftlab.compare.compare_rows` row as plain values: the cell's name, each
    varying setting, its seeds, the baseline, and :data:`METRIC_FIELDS` per metric."""
    flat: dict[str, Any] = {"cell": row["name"] or "(all runs)", **row["cell"],
                            "seeds": row["seeds"], "baseline": baseline}
    for metric in metrics:
        summary = row[metric] or {}
        ci = summary.get("ci95") or (None, None)
        delta = row[f"{metric}.vs_{baseline}"] or {}
        diff_ci = delta.get("ci95") or (None, None)
        values = (summary.get("n"), summary.get("mean"), summary.get("std"), ci[0], ci[1],
                  delta.get("diff"), diff_ci[0], diff_ci[1], delta.get("significant"),
                  delta.get("test"))
        flat.update({f"{metric}.{name}": value for name, value in zip(METRIC_FIELDS, values)})
    return flat


def flat_rows(source: Path | list[RunRecord], baseline: str | None = None,
              metrics: tuple[str, ...] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(the baseline used, one :func:`flat_row` per cell) of a folder's runs."""
    records = collect_runs(source) if isinstance(source, Path) else source
    metrics = metrics or default_metrics(records)
    rows = compare_rows(records, baseline, metrics)
    used = baseline or default_baseline(group_cells(records))
    return used, [flat_row(row, metrics, used) for row in rows]


def _csv_value(value: Any) -> Any:
    """None → empty, booleans as JSON writes them, lists and mappings (seeds, option
    mappings) as JSON text; numbers and text as they are."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV with a header; the columns are the union of the rows' keys, in order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row.get(key)) for key in columns})
    return out.getvalue()


def render_compare(folder: Path, baseline: str | None = None,
                   metrics: tuple[str, ...] | None = None, fmt: str = "markdown") -> str:
    """``hftlab compare``'s output in ``fmt``: the markdown table, or :func:`flat_rows` as CSV
    or as JSON (``{"folder", "baseline", "metrics", "rows"}``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    records = collect_runs(folder)
    if fmt == "markdown":
        return compare_table(records, baseline, metrics)
    metrics = metrics or default_metrics(records)
    used, rows = flat_rows(records, baseline, metrics)
    if fmt == "csv":
        return to_csv(rows)
    return json.dumps({"folder": str(folder), "baseline": used, "metrics": list(metrics),
                       "rows": rows}, indent=1) + "\n"
