"""Summaries of a finished run: a console table and ``report.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hftlab.utils import atomic_write_text, read_json


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


def console_summary(metrics: dict[str, Any]) -> str:
    judge = metrics["judge"]["name"]
    attack = metrics["attack"]
    head = (
        f"task {metrics['task']} · attack {attack['attack']} "
        f"({attack['n_harmful']}/{attack['n']} harmful rows) · defense {metrics['defense']} · "
        f"judge {judge} · seed {metrics['seed']}"
    )
    rows = summary_rows(metrics)
    body = table(
        [
            "model",
            f"harmful score % (n={metrics['n_eval_harmful']})",
            f"accuracy % (n={metrics['n_eval_task']})",
        ],
        rows,
    )
    timing = table(
        ["stage", "seconds", "tokens/s", "peak RSS MB"],
        [
            (name, _fmt(t["seconds"]), _fmt(t["tokens_per_s"], 0), _fmt(t["peak_rss_mb"], 0))
            for name, t in metrics["stages"].items()
        ],
    )
    drift = metrics.get("drift")
    curves = metrics.get("curves") or []
    lines = [head, "", body, ""]
    if curves and curves[0].get("alignment_loss") is not None:
        first, last = curves[0], curves[-1]
        lines.append(
            f"alignment loss {first['alignment_loss']:.3f} → {last['alignment_loss']:.3f} · "
            f"harmful loss {first['harmful_loss']:.3f} → {last['harmful_loss']:.3f} "
            f"(steps 0 → {last['step']})"
        )
    if drift:
        lines.append(f"hidden-state drift (mean over layers): {drift['mean']:.3f}")
    lines += ["", timing]
    return "\n".join(lines)


def write_report(run_dir: Path) -> str:
    """Write ``report.md`` for a finished run and return the console summary."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise FileNotFoundError(
            f"{metrics_path} not found: the run has not finished; rerun `hftlab run` to resume it"
        )
    metrics = read_json(metrics_path)
    summary = console_summary(metrics)
    curves = metrics.get("curves") or []
    curve_rows = [
        (str(c["step"]), _fmt(c.get("train_loss"), 3), _fmt(c.get("task_loss"), 3),
         _fmt(c.get("alignment_loss"), 3), _fmt(c.get("harmful_loss"), 3))
        for c in curves
    ]
    drift = metrics.get("drift")
    parts = [
        f"# hftlab run report: {run_dir.name}",
        "",
        "```",
        summary,
        "```",
        "",
        "Harmful score: percent of harmful eval prompts whose completion the judge "
        f"(`{metrics['judge']['name']}`) flags as harmful. Completions are in "
        "`eval/completions.jsonl` (not shown here).",
        "",
    ]
    if curve_rows:
        parts += [
            "## Fine-tuning curves (survey §3: forgetting vs revitalisation)",
            "",
            "Alignment loss rising = the refusals are forgotten; harmful loss falling = harmful "
            "answers are revitalised.",
            "",
            "| step | train loss | task loss | alignment loss | harmful loss |",
            "|---|---|---|---|---|",
            *(f"| {' | '.join(r)} |" for r in curve_rows),
            "",
        ]
    if drift:
        parts += [
            "## Hidden-state drift (aligned → fine-tuned, held-out alignment prompts)",
            "",
            "| layer | mean L2 distance |",
            "|---|---|",
            *(f"| {i} | {d:.4f} |" for i, d in enumerate(drift["per_layer"])),
            "",
        ]
    parts += ["## Versions", "", *(f"- {k}: {v}" for k, v in metrics["versions"].items()), ""]
    atomic_write_text(run_dir / "report.md", "\n".join(parts))
    return summary
