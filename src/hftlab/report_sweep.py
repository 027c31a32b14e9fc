"""``hftlab report`` on a sweep or any folder of runs: the compare table per cell, the Pareto
front, mechanisms and cost per cell, the sweep's plots and a link to every run's own report."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from markupsafe import Markup

from hftlab import plot_base, plots
from hftlab.compare import (
    Cell,
    RunRecord,
    compare_rows,
    compare_table,
    default_baseline,
    default_metrics,
    group_cells,
)
from hftlab.plot_labels import groups_from_cells
from hftlab.report_html import Table, draw, fmt, plots_md, render, with_interval
from hftlab.run_metrics import CurvePoint, RunMetrics, StageTiming
from hftlab.utils import atomic_write_text, read_json


def _status(folder: Path, records: list[RunRecord]) -> list[str]:
    """Finished / planned runs and failures, from sweep.json and failures.json if present."""
    lines = []
    plan = folder / "sweep.json"
    if plan.exists():
        planned = [r["name"] for r in read_json(plan).get("runs", [])]
        finished = {r.path.name for r in records}
        missing = [name for name in planned if name not in finished]
        lines.append(f"{len(planned) - len(missing)} of {len(planned)} planned runs finished.")
        extra = len(finished - set(planned))
        if extra:
            lines.append(f"{extra} more finished runs in the folder are not in sweep.json's "
                         "plan (an earlier plan); they are included.")
        if missing:
            lines.append("Not finished (running, not started or failed): "
                         + ", ".join(missing) + ".")
    else:
        lines.append(f"{len(records)} finished runs under this folder.")
    seconds = [sum(float(stage.seconds or 0.0) for stage in r.metrics.stages.values())
               for r in records]
    if any(seconds):
        lines.append(f"Compute: {sum(seconds) / 60:.0f} min of stage time over {len(records)} "
                     f"runs ({statistics.fmean(seconds) / 60:.1f} min per run; a stage found in "
                     "the cache counts only its lookup, so a shared alignment is not included).")
    failures = folder / "failures.json"
    if failures.exists():
        for failure in read_json(failures):
            lines.append(f"Failed: {failure['run']}: {failure['error']}")
    return lines


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _loss_change(metrics: RunMetrics, loss: Callable[[CurvePoint], float | None]) -> float | None:
    points = [value for value in map(loss, metrics.curves) if value is not None]
    return points[-1] - points[0] if len(points) > 1 else None


def _stage(metrics: RunMetrics, stage: str,
           get: Callable[[StageTiming], float | None]) -> float | None:
    timing = metrics.stages.get(stage)
    value = None if timing is None else get(timing)
    return None if value is None else float(value)


def mechanism_rows(cells: list[Cell]) -> list[tuple[str, ...]]:
    """Per cell (means over seeds): the change of the alignment and harmful losses during
    fine-tuning, the mean drift, seconds per step and the peak memory."""
    rows = []
    for cell in cells:
        runs = [r.metrics for r in cell.runs]
        drift = _mean([m.drift.mean if m.drift else None for m in runs])
        peak = _mean([_stage(m, "finetune", lambda t: t.peak_rss_mb) for m in runs])
        rows.append((
            cell.name or "(all runs)", str(len(runs)),
            fmt(_mean([m.aligned.harmful_score for m in runs]), 1),
            fmt(_mean([_loss_change(m, lambda c: c.alignment_loss) for m in runs]), 3),
            fmt(_mean([_loss_change(m, lambda c: c.harmful_loss) for m in runs]), 3),
            fmt(drift, 2),
            fmt(_mean([_stage(m, "align", lambda t: t.seconds_per_step) for m in runs]), 2),
            fmt(_mean([_stage(m, "finetune", lambda t: t.seconds_per_step) for m in runs]), 2),
            fmt(None if peak is None else peak / 1024, 1),
        ))
    return rows


MECHANISM_HEADERS = ["cell", "runs", "aligned HS %", "Δ alignment loss", "Δ harmful loss",
                     "mean drift", "align s/step", "finetune s/step", "peak RSS GB"]
MECHANISM_NOTE = (
    "Means over seeds. aligned HS = the harmful score of the aligned model before fine-tuning "
    "(where the attack starts from). Δ loss = last − first point of the fine-tuning curve "
    "(alignment loss up = forgetting, harmful loss down = revitalisation); drift = mean over "
    "layers of the L2 distance between aligned and fine-tuned hidden states; peak RSS = the "
    "process's peak host memory up to the end of fine-tuning."
)


def _delta_html(delta: dict[str, Any] | None) -> Any:
    if delta is None:
        return "—"
    ci = delta.get("ci95")  # none where the test could not give one (a single run per side)
    text = f"{delta['diff']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
    if delta["significant"]:
        return Markup('<span class="sig">{} *</span>').format(text)
    return text


def _summary_text(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "—"
    std = summary["std"]
    return f"{summary['mean']:.1f}" + ("" if std is None else f" ± {std:.1f}")


def _scored(cell: Cell) -> tuple[list[float], list[float]]:
    return (cell.series(lambda m: m.final.harmful_score),
            cell.series(lambda m: m.final.finetune_accuracy))


def write_sweep_report(folder: Path, records: list[RunRecord], baseline: str | None = None,
                       out: Path | None = None) -> str:
    """Write the sweep's ``report.md`` and ``report.html`` into ``out`` (default: ``folder``);
    return the console summary."""
    out = folder if out is None else out
    cells = group_cells(records)
    metrics = default_metrics(records)
    baseline = baseline or default_baseline(cells)
    rows = compare_rows(records, baseline, metrics)
    compare_md = compare_table(records, baseline, metrics)
    groups = groups_from_cells(cells)
    short_name = {_key(c.label): g.label for c, g in zip(cells, groups)}
    scored = [c for c in cells if all(_scored(c))]
    means = [(statistics.fmean(_scored(c)[0]), statistics.fmean(_scored(c)[1])) for c in scored]
    front = [scored[i] for i in plot_base.pareto_front(means)]
    drawn, notes = draw(lambda: plots.sweep_plots(groups))
    status = _status(folder, records)
    mech = mechanism_rows(cells)
    front_names = [c.name or "(all runs)" for c in front]

    md = [
        f"# hftlab sweep report: {folder.name}", "", *status, "",
        "## Harmful score and fine-tune accuracy per cell", "",
        "A cell = the runs that differ only in their seed.", "", compare_md, "",
        "## Pareto front (low harmful score, high fine-tune accuracy)", "",
        *(f"- {name}" for name in front_names), "",
        "## Mechanisms and cost per cell", "",
        "| " + " | ".join(MECHANISM_HEADERS) + " |", "|" + "---|" * len(MECHANISM_HEADERS),
        *(f"| {' | '.join(r)} |" for r in mech), "", MECHANISM_NOTE, "",
        *plots_md(drawn, notes),
    ]
    atomic_write_text(out / "report.md", "\n".join(md))

    headers = ["cell", "seeds"]
    for metric in metrics:
        headers += [f"{metric.replace('_', ' ')} % (mean ± std)", f"Δ vs {baseline} [95% CI]"]
    table_rows = []
    for row in rows:
        values: list[Any] = [short_name[_key(row["cell"])], ",".join(map(str, row["seeds"]))]
        for metric in metrics:
            values += [_summary_text(row[metric]), _delta_html(row[f"{metric}.vs_{baseline}"])]
        table_rows.append(values)
    front_set = {_key(c.label) for c in front}
    tests = sorted({row[f"{m}.vs_{baseline}"]["test"] for row in rows for m in metrics
                    if row.get(f"{m}.vs_{baseline}")})
    first = records[0].metrics
    mech_named = [(short_name[_key(c.label)], *r[1:]) for c, r in zip(cells, mech)]
    page = render(
        "sweep.html", title=f"hftlab sweep report: {folder.name}", status=" ".join(status),
        task=first.task, model=first.model, judge=first.judge.name, n_runs=len(records),
        n_cells=len(cells), baseline=baseline, tests="; ".join(tests) or "no baseline",
        front=", ".join(short_name[_key(c.label)] for c in front),
        scores=Table(headers, table_rows, numeric_from=2,
                     row_classes=["front" if _key(r["cell"]) in front_set else ""
                                  for r in rows],
                     titles=[r["name"] or "(all runs)" for r in rows]),
        drawn=drawn, notes=notes,
        mechanisms=Table(MECHANISM_HEADERS, mech_named,
                         titles=[c.name or "(all runs)" for c in cells]),
        mechanism_note=MECHANISM_NOTE, runs=_runs_table(folder, out, records),
    )
    atomic_write_text(out / "report.html", page)
    summary = "\n".join([*status, "", compare_md])
    if not plot_base.available():
        summary += f"\n\n{plot_base.INSTALL_HINT}"
    return summary


def _key(label: dict[str, Any]) -> str:
    return json.dumps(label, sort_keys=True, default=str)


def _runs_table(folder: Path, out: Path, records: list[RunRecord]) -> Table:
    """Every run, linked to its own report (relative to where this report is written)."""
    rows = []
    for record in records:
        final = record.metrics.final
        name = str(record.path.relative_to(folder))
        link = record.path / "report.html"
        shown = (Markup('<a href="{}">{}</a>').format(
                    Path(os.path.relpath(link, out)).as_posix(), name)
                 if link.exists() else name)
        rows.append([shown, record.metrics.defense, record.seed,
                     fmt(record.settings.get(plot_base.POISON)),
                     with_interval(final.harmful_score, final.harmful_score_ci95,
                                   final.n_eval_harmful),
                     with_interval(final.finetune_accuracy, final.finetune_accuracy_ci95,
                                   final.n_eval_task)])
    return Table(["run", "defense", "seed", "poison ratio", "harmful score % [95% CI]",
                  "accuracy % [95% CI]"], rows, numeric_from=2)
