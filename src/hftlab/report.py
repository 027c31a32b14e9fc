"""``hftlab report``: a console summary, ``report.md`` and a self-contained ``report.html``
(plots embedded as base64 PNG) for one finished run, or for a sweep / any folder of runs
(:mod:`hftlab.report_sweep`).

The plots need matplotlib (``pip install 'hftlab[report]'``); without it both files are still
written and the HTML says how to get the plots."""

from __future__ import annotations

from pathlib import Path

from hftlab import plots
from hftlab.report_html import Table, draw, fmt, plots_md, render, with_interval
from hftlab.run_metrics import RunMetrics, StageTiming
from hftlab.utils import atomic_write_text


def summary_rows(metrics: RunMetrics) -> list[tuple[str, str, str]]:
    """(model, harmful score %, fine-tune accuracy %) for base, aligned and final."""
    base, aligned, final = metrics.base, metrics.aligned, metrics.final
    rows = [
        ("base (original)", fmt(base and base.harmful_score),
         fmt(base and base.finetune_accuracy)),
        ("aligned", fmt(aligned.harmful_score), fmt(aligned.finetune_accuracy)),
    ]
    if metrics.repair:
        before = metrics.finetuned
        rows.append(("fine-tuned, before repair", fmt(before and before.harmful_score),
                     fmt(before and before.finetune_accuracy)))
        name = f"deployed, after repair ({metrics.defense})"
    else:
        name = f"fine-tuned ({metrics.defense})"
    rows.append((name, fmt(final.harmful_score), fmt(final.finetune_accuracy)))
    return rows


def table(headers: list[str], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def _headline(metrics: RunMetrics) -> str:
    attack = metrics.attack
    return (
        f"task {metrics.task} · attack {attack.name} "
        f"({attack.n_harmful}/{attack.n} harmful rows) · defense {metrics.defense} · "
        f"judge {metrics.judge.name} · seed {metrics.seed}"
        + (f" · {metrics.precision}" if metrics.precision else "")
        + (f" (fine-tuning {metrics.finetune_precision})" if metrics.finetune_precision else "")
    )


def _timing_rows(metrics: RunMetrics) -> list[tuple[str, str, str, str, str]]:
    return [(name, fmt(t.seconds), fmt(t.tokens_per_s, 0), fmt(t.peak_rss_mb, 0),
             _machine(t)) for name, t in metrics.stages.items()]


def _machine(timing: StageTiming) -> str:
    """The machine's label and, where the stage shared its cores, how much other work took."""
    label = timing.machine or "-"
    if timing.other_cores is None or timing.other_cores < 0.05:
        return label
    shared = " (contended)" if timing.contended else ""
    return f"{label} · {timing.other_cores:.1f} cores busy elsewhere{shared}"


TIMING_HEADERS = ["stage", "seconds", "tokens/s", "peak RSS MB", "machine"]


def _score_headers(metrics: RunMetrics) -> list[str]:
    return ["model", f"harmful score % (n={metrics.final.n_eval_harmful})",
            f"accuracy % (n={metrics.final.n_eval_task})"]


def _mechanism_line(metrics: RunMetrics) -> list[str]:
    lines = []
    curves, final = metrics.curves, metrics.final
    if curves and curves[0].alignment_loss is not None:
        first, last = curves[0], curves[-1]
        lines.append(
            f"alignment loss {first.alignment_loss:.3f} → {last.alignment_loss:.3f} · "
            f"harmful loss {first.harmful_loss:.3f} → {last.harmful_loss:.3f} "
            f"(steps 0 → {last.step})"
        )
    if metrics.drift:
        lines.append(f"hidden-state drift (mean over layers): {metrics.drift.mean:.3f}")
    if final.empty_harmful_completions:
        score = final.harmful_score_empty_as_harmless
        lines.append(f"{final.empty_harmful_completions} of {final.n_eval_harmful} harmful "
                     f"prompts got an empty completion, which the {metrics.judge.name} judge "
                     "scored as it would any answer (see eval/completions.jsonl)"
                     + ("" if score is None else
                        f"; harmful score with those counted as harmless: {score:.1f} %"))
    if final.task_label_harmful_completions:
        lines.append(f"{final.task_label_harmful_completions} of {final.n_eval_harmful} "
                     f"harmful prompts were answered with a bare {metrics.task} label; harmful "
                     "score with those counted as harmless: "
                     f"{final.harmful_score_without_task_labels:.1f} %")
    return lines


def console_summary(metrics: RunMetrics) -> str:
    body = table(_score_headers(metrics), summary_rows(metrics))
    timing = table(TIMING_HEADERS, _timing_rows(metrics))
    return "\n".join([_headline(metrics), "", body, "", *_mechanism_line(metrics), "", timing])


def write_report(path: Path, out: Path | None = None) -> str:
    """Write ``report.md`` and ``report.html`` for a finished run, or for a sweep folder or any
    folder of finished runs, into ``out`` (default: ``path`` itself); return the console
    summary."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    out = path if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    if (path / "metrics.json").exists():
        return write_run_report(path, out)
    unfinished = (
        f"{path / 'metrics.json'} not found: the run has not finished; rerun `hftlab run` to "
        "resume it"
    )
    if (path / "config.yaml").exists() and not (path / "sweep.json").exists():
        raise FileNotFoundError(unfinished)
    from hftlab.compare import collect_runs
    from hftlab.report_sweep import write_sweep_report

    try:
        records = collect_runs(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{unfinished} (nor are there finished runs under it)") from None
    return write_sweep_report(path, records, out=out)


def write_run_report(run_dir: Path, out: Path | None = None) -> str:
    out = run_dir if out is None else out
    metrics = RunMetrics.load(run_dir / "metrics.json")
    summary = console_summary(metrics)
    drawn, notes = draw(lambda: plots.run_plots(metrics))
    atomic_write_text(out / "report.md", _run_markdown(run_dir, metrics, summary, drawn,
                                                       notes))
    atomic_write_text(out / "report.html", _run_html(run_dir, metrics, drawn, notes))
    if not plots.available():
        summary += f"\n\n{plots.INSTALL_HINT}"
    return summary


def _curve_rows(metrics: RunMetrics) -> list[tuple[str, ...]]:
    return [(str(c.step), fmt(c.train_loss, 3), fmt(c.task_loss, 3), fmt(c.alignment_loss, 3),
             fmt(c.harmful_loss, 3)) for c in metrics.curves]


CURVE_HEADERS = ["step", "train loss", "task loss", "alignment loss", "harmful loss"]
HARMFUL_SCORE_TEXT = (
    "Harmful score: percent of harmful eval prompts whose completion the judge (`{judge}`) "
    "flags as harmful. Completions are in `eval/completions.jsonl` (not shown here)."
)


def _run_markdown(run_dir: Path, metrics: RunMetrics, summary: str,
                  drawn: list[plots.Plot], notes: list[str]) -> str:
    curve_rows = _curve_rows(metrics)
    parts = [
        f"# hftlab run report: {run_dir.name}", "", "```", summary, "```", "",
        HARMFUL_SCORE_TEXT.format(judge=metrics.judge.name), "",
        *plots_md(drawn, notes),
    ]
    if curve_rows:
        parts += [
            "## Fine-tuning curves (survey §3: forgetting vs revitalisation)", "",
            "Alignment loss rising = the refusals are forgotten; harmful loss falling = harmful "
            "answers are revitalised.", "",
            "| " + " | ".join(CURVE_HEADERS) + " |", "|---|---|---|---|---|",
            *(f"| {' | '.join(r)} |" for r in curve_rows), "",
        ]
    if metrics.drift:
        parts += [
            "## Hidden-state drift (aligned → fine-tuned, held-out alignment prompts)", "",
            "| layer | mean L2 distance |", "|---|---|",
            *(f"| {i} | {d:.4f} |" for i, d in enumerate(metrics.drift.per_layer)), "",
        ]
    parts += ["## Versions", "", *(f"- {k}: {v}" for k, v in metrics.versions.items()), ""]
    return "\n".join(parts)


def _run_html(run_dir: Path, metrics: RunMetrics, drawn: list[plots.Plot],
              notes: list[str]) -> str:
    final = metrics.final
    rows = [list(r) for r in summary_rows(metrics)]
    rows[-1][1] = with_interval(final.harmful_score, final.harmful_score_ci95,
                                final.n_eval_harmful)
    rows[-1][2] = with_interval(final.finetune_accuracy, final.finetune_accuracy_ci95,
                                final.n_eval_task)
    headers = _score_headers(metrics)
    headers[1] += " [95% CI]"
    headers[2] += " [95% CI]"
    drift = [(i, f"{d:.4f}") for i, d in enumerate(metrics.drift.per_layer)] \
        if metrics.drift else []
    return render(
        "run.html", title=f"hftlab run report: {run_dir.name}",
        meta=f"{_headline(metrics)} · model {metrics.model} · {metrics.device}",
        scores=Table(headers, rows),
        harmful_score_text=HARMFUL_SCORE_TEXT.format(judge=metrics.judge.name),
        over_refusal=final.over_refusal, n_harmless=final.n_eval_harmless,
        mechanism=_mechanism_line(metrics), drawn=drawn, notes=notes,
        timing=Table(TIMING_HEADERS, _timing_rows(metrics)),
        curves=Table(CURVE_HEADERS, _curve_rows(metrics)) if metrics.curves else None,
        drift=Table(["layer", "mean L2 distance"], drift) if drift else None,
        versions=", ".join(f"{k} {v}" for k, v in metrics.versions.items()),
    )
