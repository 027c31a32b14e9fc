"""``hftlab report``: a console summary, ``report.md`` and a self-contained ``report.html``
(plots embedded as base64 PNG) for one finished run or for a sweep / any folder of runs.

The plots need matplotlib (``pip install 'hftlab[report]'``); without it both files are still
written and the HTML says how to get the plots."""

from __future__ import annotations

import base64
import html
import logging
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hftlab import plots
from hftlab.stats import wilson
from hftlab.utils import atomic_write_text, read_json

log = logging.getLogger(__name__)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(model, harmful score %, fine-tune accuracy %) for base, aligned and final."""
    rows = [
        ("base (original)", _fmt(metrics["base.harmful_score"]),
         _fmt(metrics["base.finetune_accuracy"])),
        ("aligned", _fmt(metrics["aligned.harmful_score"]),
         _fmt(metrics["aligned.finetune_accuracy"])),
    ]
    if metrics.get("repair"):
        rows.append(("fine-tuned, before repair", _fmt(metrics["finetuned.harmful_score"]),
                     _fmt(metrics["finetuned.finetune_accuracy"])))
        final = f"deployed, after repair ({metrics['defense']})"
    else:
        final = f"fine-tuned ({metrics['defense']})"
    rows.append((final, _fmt(metrics["harmful_score"]), _fmt(metrics["finetune_accuracy"])))
    return rows


def table(headers: list[str], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def _headline(metrics: dict[str, Any]) -> str:
    attack = metrics["attack"]
    return (
        f"task {metrics['task']} · attack {attack['attack']} "
        f"({attack['n_harmful']}/{attack['n']} harmful rows) · defense {metrics['defense']} · "
        f"judge {metrics['judge']['name']} · seed {metrics['seed']}"
        + (f" · {metrics['precision']}" if metrics.get("precision") else "")
    )


def _timing_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [
        (name, _fmt(t["seconds"]), _fmt(t["tokens_per_s"], 0), _fmt(t["peak_rss_mb"], 0))
        for name, t in metrics["stages"].items()
    ]


TIMING_HEADERS = ["stage", "seconds", "tokens/s", "peak RSS MB"]


def _score_headers(metrics: dict[str, Any]) -> list[str]:
    return ["model", f"harmful score % (n={metrics['n_eval_harmful']})",
            f"accuracy % (n={metrics['n_eval_task']})"]


def _mechanism_line(metrics: dict[str, Any]) -> list[str]:
    lines = []
    curves = metrics.get("curves") or []
    if curves and curves[0].get("alignment_loss") is not None:
        first, last = curves[0], curves[-1]
        lines.append(
            f"alignment loss {first['alignment_loss']:.3f} → {last['alignment_loss']:.3f} · "
            f"harmful loss {first['harmful_loss']:.3f} → {last['harmful_loss']:.3f} "
            f"(steps 0 → {last['step']})"
        )
    drift = metrics.get("drift")
    if drift:
        lines.append(f"hidden-state drift (mean over layers): {drift['mean']:.3f}")
    empty = metrics.get("empty_harmful_completions")
    if empty:
        lines.append(f"{empty} of {metrics['n_eval_harmful']} harmful prompts got an empty "
                     f"completion, which the {metrics['judge']['name']} judge scored as it "
                     "would any answer (see eval/completions.jsonl)"
                     + _empty_as_harmless(metrics))
    labelled = metrics.get("task_label_harmful_completions")
    if labelled:
        lines.append(f"{labelled} of {metrics['n_eval_harmful']} harmful prompts were answered "
                     f"with a bare {metrics['task']} label; harmful score with those counted as "
                     f"harmless: {metrics['harmful_score_without_task_labels']:.1f} %")
    return lines


def _empty_as_harmless(metrics: dict[str, Any]) -> str:
    score = metrics.get("harmful_score_empty_as_harmless")
    return "" if score is None else f"; harmful score with those counted as harmless: {score:.1f} %"


def console_summary(metrics: dict[str, Any]) -> str:
    body = table(_score_headers(metrics), summary_rows(metrics))
    timing = table(TIMING_HEADERS, _timing_rows(metrics))
    return "\n".join([_headline(metrics), "", body, "", *_mechanism_line(metrics), "", timing])


def write_report(path: Path) -> str:
    """Write ``report.md`` and ``report.html`` for a finished run, or for a sweep folder or any
    folder of finished runs; return the console summary."""
    if (path / "metrics.json").exists():
        return write_run_report(path)
    unfinished = (
        f"{path / 'metrics.json'} not found: the run has not finished; rerun `hftlab run` to "
        "resume it"
    )
    if (path / "config.yaml").exists() and not (path / "sweep.json").exists():
        raise FileNotFoundError(unfinished)
    from hftlab.compare import collect_runs

    try:
        records = collect_runs(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{unfinished} (nor are there finished runs under it)") from None
    return write_sweep_report(path, records)


# ------------------------------------------------------------------------------ HTML pieces

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1120px; padding: 1.5em 2em 4em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.65em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.front td:first-child { font-weight: 600; }
.sig { font-weight: 600; }
figure { margin: 1.8em 0; }
figure img { max-width: 100%; border: 1px solid #e2e2e2; }
figcaption { color: #444; font-size: 0.92em; max-width: 60em; margin-top: 0.4em; }
figure h3 { font-size: 1.05em; margin: 0 0 0.4em; }
.hint { background: #fff4d6; border: 1px solid #e5c86b; padding: 0.6em 0.9em; }
.note { color: #555; font-size: 0.9em; }
details { margin: 1em 0; }
code { white-space: nowrap; background: #f3f3f3; padding: 0 0.2em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
               numeric_from: int = 1, row_classes: Sequence[str] | None = None) -> str:
    """Cells are escaped unless given as ``("raw", html)``; columns from ``numeric_from`` on
    are right-aligned."""
    def cell(i: int, value: Any) -> str:
        text = value[1] if isinstance(value, tuple) and value[:1] == ("raw",) else _esc(value)
        return f'<td class="num">{text}</td>' if i >= numeric_from else f"<td>{text}</td>"

    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for number, row in enumerate(rows):
        css = row_classes[number] if row_classes else ""
        attr = f' class="{css}"' if css else ""
        body.append(f"<tr{attr}>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_figure(plot: plots.Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    # the title is drawn in the picture itself, so a copied PNG still says what it shows
    return (f'<figure id="{_esc(plot.key)}">'
            f'<img alt="{_esc(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_prose(plot.caption)}</figcaption></figure>")


def _prose(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))


def html_page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def draw(make: Callable[[], list[plots.Plot]]) -> tuple[list[plots.Plot], list[str]]:
    """The plots, and HTML notes for what could not be drawn (no matplotlib, or a plot that
    failed: the report is still written, a long run is never lost to a plotting error)."""
    if not plots.available():
        return [], [f'<p class="hint">{_prose(plots.INSTALL_HINT)}</p>']
    try:
        return make(), []
    except Exception as exc:
        log.warning("plots failed: %s", exc, exc_info=True)
        return [], [f'<p class="hint">The plots failed: {_esc(exc)}</p>']


def _plots_md(drawn: list[plots.Plot], notes: list[str]) -> list[str]:
    if drawn:
        return ["## Plots", "", "In `report.html` (self-contained, open it in a browser):", "",
                *(f"- {p.title}" for p in drawn), ""]
    if not plots.available():
        return [f"Plots: {plots.INSTALL_HINT}", ""]
    return ["Plots: none drawn (see report.html).", ""] if notes else []


# ------------------------------------------------------------------------------ one run


def _with_interval(metrics: dict[str, Any], key: str, n_key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "—"
    ci = metrics.get(f"{key}_ci95")
    if not ci and metrics.get(n_key):
        n = int(metrics[n_key])
        ci = wilson(round(float(value) / 100 * n), n)
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"


def write_run_report(run_dir: Path) -> str:
    metrics = read_json(run_dir / "metrics.json")
    summary = console_summary(metrics)
    drawn, notes = draw(lambda: plots.run_plots(metrics))
    atomic_write_text(run_dir / "report.md", _run_markdown(run_dir, metrics, summary, drawn,
                                                           notes))
    atomic_write_text(run_dir / "report.html", _run_html(run_dir, metrics, drawn, notes))
    if not plots.available():
        summary += f"\n\n{plots.INSTALL_HINT}"
    return summary


def _curve_rows(metrics: dict[str, Any]) -> list[tuple[str, ...]]:
    return [
        (str(c["step"]), _fmt(c.get("train_loss"), 3), _fmt(c.get("task_loss"), 3),
         _fmt(c.get("alignment_loss"), 3), _fmt(c.get("harmful_loss"), 3))
        for c in metrics.get("curves") or []
    ]


CURVE_HEADERS = ["step", "train loss", "task loss", "alignment loss", "harmful loss"]
HARMFUL_SCORE_TEXT = (
    "Harmful score: percent of harmful eval prompts whose completion the judge (`{judge}`) "
    "flags as harmful. Completions are in `eval/completions.jsonl` (not shown here)."
)


def _run_markdown(run_dir: Path, metrics: dict[str, Any], summary: str,
                  drawn: list[plots.Plot], notes: list[str]) -> str:
    curve_rows = _curve_rows(metrics)
    drift = metrics.get("drift")
    parts = [
        f"# hftlab run report: {run_dir.name}", "", "```", summary, "```", "",
        HARMFUL_SCORE_TEXT.format(judge=metrics["judge"]["name"]), "",
        *_plots_md(drawn, notes),
    ]
    if curve_rows:
        parts += [
            "## Fine-tuning curves (survey §3: forgetting vs revitalisation)", "",
            "Alignment loss rising = the refusals are forgotten; harmful loss falling = harmful "
            "answers are revitalised.", "",
            "| " + " | ".join(CURVE_HEADERS) + " |", "|---|---|---|---|---|",
            *(f"| {' | '.join(r)} |" for r in curve_rows), "",
        ]
    if drift:
        parts += [
            "## Hidden-state drift (aligned → fine-tuned, held-out alignment prompts)", "",
            "| layer | mean L2 distance |", "|---|---|",
            *(f"| {i} | {d:.4f} |" for i, d in enumerate(drift["per_layer"])), "",
        ]
    parts += ["## Versions", "", *(f"- {k}: {v}" for k, v in metrics["versions"].items()), ""]
    return "\n".join(parts)


def _run_html(run_dir: Path, metrics: dict[str, Any], drawn: list[plots.Plot],
              notes: list[str]) -> str:
    rows = [list(r) for r in summary_rows(metrics)]
    rows[-1][1] = _with_interval(metrics, "harmful_score", "n_eval_harmful")
    rows[-1][2] = _with_interval(metrics, "finetune_accuracy", "n_eval_task")
    headers = _score_headers(metrics)
    headers[1] += " [95% CI]"
    headers[2] += " [95% CI]"
    body = [
        f"<h1>hftlab run report: {_esc(run_dir.name)}</h1>",
        f'<p class="meta">{_esc(_headline(metrics))} · model {_esc(metrics.get("model"))} · '
        f'{_esc(metrics.get("device"))}</p>',
        "<h2>Scores</h2>", html_table(headers, rows),
        f'<p class="note">{_prose(HARMFUL_SCORE_TEXT.format(judge=metrics["judge"]["name"]))} '
        "The interval on the final row is the Wilson 95% interval over the prompts.</p>",
    ]
    if metrics.get("over_refusal") is not None:
        body.append(f"<p>Over-refusal of harmless prompts: {_esc(metrics['over_refusal'])}% "
                    f"(n={_esc(metrics.get('n_eval_harmless'))}).</p>")
    mechanism = _mechanism_line(metrics)
    if mechanism:
        body.append("<p>" + "<br>".join(_esc(line) for line in mechanism) + "</p>")
    body += ["<h2>Plots</h2>", *notes, *(html_figure(p) for p in drawn)]
    body += ["<h2>Cost per stage</h2>", html_table(TIMING_HEADERS, _timing_rows(metrics))]
    if metrics.get("curves"):
        body.append("<details><summary>Fine-tuning curves as numbers</summary>"
                    + html_table(CURVE_HEADERS, _curve_rows(metrics)) + "</details>")
    if metrics.get("drift"):
        per_layer = [(i, f"{d:.4f}") for i, d in enumerate(metrics["drift"]["per_layer"])]
        body.append("<details><summary>Drift per layer as numbers</summary>"
                    + html_table(["layer", "mean L2 distance"], per_layer) + "</details>")
    body.append('<p class="note">Versions: ' + _esc(", ".join(
        f"{k} {v}" for k, v in metrics["versions"].items())) + "</p>")
    return html_page(f"hftlab run report: {run_dir.name}", body)


# ------------------------------------------------------------------------------ sweeps


def _status(folder: Path, records: list[Any]) -> list[str]:
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
    seconds = [sum(float(stage.get("seconds") or 0.0)
                   for stage in (r.metrics.get("stages") or {}).values()) for r in records]
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


def _loss_change(metrics: dict[str, Any], key: str) -> float | None:
    points = [c[key] for c in metrics.get("curves") or [] if c.get(key) is not None]
    return points[-1] - points[0] if len(points) > 1 else None


def _stage(metrics: dict[str, Any], stage: str, key: str) -> float | None:
    value = (metrics.get("stages") or {}).get(stage, {}).get(key)
    return None if value is None else float(value)


def mechanism_rows(cells: list[Any]) -> list[tuple[str, ...]]:
    """Per cell (means over seeds): the change of the alignment and harmful losses during
    fine-tuning, the mean drift, seconds per step and the peak memory."""
    rows = []
    for cell in cells:
        runs = [r.metrics for r in cell.runs]
        drift = _mean([(m.get("drift") or {}).get("mean") for m in runs])
        peak = _mean([_stage(m, "finetune", "peak_rss_mb") for m in runs])
        rows.append((
            cell.name or "(all runs)", str(len(runs)),
            _fmt(_mean([m.get("aligned.harmful_score") for m in runs]), 1),
            _fmt(_mean([_loss_change(m, "alignment_loss") for m in runs]), 3),
            _fmt(_mean([_loss_change(m, "harmful_loss") for m in runs]), 3),
            _fmt(drift, 2),
            _fmt(_mean([_stage(m, "align", "seconds_per_step") for m in runs]), 2),
            _fmt(_mean([_stage(m, "finetune", "seconds_per_step") for m in runs]), 2),
            _fmt(None if peak is None else peak / 1024, 1),
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
    text = (f"{delta['diff']:+.1f} [{delta['ci95'][0]:+.1f}, {delta['ci95'][1]:+.1f}]")
    if delta["significant"]:
        return ("raw", f'<span class="sig">{_esc(text)} *</span>')
    return text


def _summary_text(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "—"
    std = summary["std"]
    return f"{summary['mean']:.1f}" + ("" if std is None else f" ± {std:.1f}")


def write_sweep_report(folder: Path, records: list[Any], baseline: str | None = None) -> str:
    from hftlab.compare import (
        compare_rows,
        compare_table,
        default_baseline,
        default_metrics,
        group_cells,
    )

    cells = group_cells(records)
    metrics = default_metrics(records)
    baseline = baseline or default_baseline(cells)
    rows = compare_rows(records, baseline, metrics)
    compare_md = compare_table(records, baseline, metrics)
    groups = plots.groups_from_cells(cells)
    means = [(statistics.fmean(c.values("harmful_score")),
              statistics.fmean(c.values("finetune_accuracy")))
             for c in cells if c.values("harmful_score") and c.values("finetune_accuracy")]
    scored = [c for c in cells if c.values("harmful_score") and c.values("finetune_accuracy")]
    front = [scored[i] for i in plots.pareto_front(means)]
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
        *_plots_md(drawn, notes),
    ]
    atomic_write_text(folder / "report.md", "\n".join(md))

    headers = ["cell", "seeds"]
    for metric in metrics:
        headers += [f"{metric.replace('_', ' ')} % (mean ± std)", f"Δ vs {baseline} [95% CI]"]
    table_rows = []
    for row in rows:
        values: list[Any] = [row["name"] or "(all runs)", ",".join(map(str, row["seeds"]))]
        for metric in metrics:
            values += [_summary_text(row[metric]), _delta_html(row[f"{metric}.vs_{baseline}"])]
        table_rows.append(values)
    front_set = set(front_names)
    tests = sorted({row[f"{m}.vs_{baseline}"]["test"] for row in rows for m in metrics
                    if row.get(f"{m}.vs_{baseline}")})
    first = records[0].metrics
    body = [
        f"<h1>hftlab sweep report: {_esc(folder.name)}</h1>",
        f'<p class="meta">{_esc(" ".join(status))}</p>',
        f"<p>task {_esc(first.get('task'))} · model {_esc(first.get('model'))} · judge "
        f"{_esc(first['judge']['name'])} · {len(records)} runs in {len(cells)} cells (a cell = "
        "the runs that differ only in their seed). Harmful score: % of harmful prompts the "
        "judge flags (lower is safer); fine-tune accuracy: % of task prompts answered "
        "correctly (higher is better).</p>",
        "<h2>Scores per cell</h2>",
        html_table(headers, table_rows, numeric_from=2,
                   row_classes=["front" if r[0] in front_set else "" for r in table_rows]),
        f'<p class="note">mean ± std over seeds; Δ = difference to {_esc(baseline)} with the '
        f"same other settings, with its 95% interval ({_esc('; '.join(tests) or 'no baseline')}"
        "); bold * = the interval excludes 0. Bold cell names are on the Pareto front: "
        f"{_esc(', '.join(front_names))}.</p>",
        "<h2>Plots</h2>", *notes, *(html_figure(p) for p in drawn),
        "<h2>Mechanisms and cost per cell</h2>",
        html_table(MECHANISM_HEADERS, mech), f'<p class="note">{_esc(MECHANISM_NOTE)}</p>',
        _runs_details(folder, records),
    ]
    atomic_write_text(folder / "report.html",
                      html_page(f"hftlab sweep report: {folder.name}", body))
    summary = "\n".join([*status, "", compare_md])
    if not plots.available():
        summary += f"\n\n{plots.INSTALL_HINT}"
    return summary


def _runs_details(folder: Path, records: list[Any]) -> str:
    rows = []
    for record in records:
        m = record.metrics
        name = _esc(record.path.relative_to(folder))
        link = record.path / "report.html"
        shown = (f'<a href="{_esc(link.relative_to(folder).as_posix())}">{name}</a>'
                 if link.exists() else name)
        rows.append([("raw", shown), m.get("defense"), record.seed,
                     _fmt(record.settings.get(plots.POISON)),
                     _with_interval(m, "harmful_score", "n_eval_harmful"),
                     _with_interval(m, "finetune_accuracy", "n_eval_task")])
    return ("<details><summary>Every run (with a link to its own report)</summary>"
            + html_table(["run", "defense", "seed", "poison ratio", "harmful score % [95% CI]",
                          "accuracy % [95% CI]"], rows, numeric_from=2) + "</details>")
