"""Agreement of a second judge with the judge a run was scored with (``hftlab judge agree``).

A harmful score is only as good as its judge. This re-judges the harmful-set completions that
runs saved (``eval/completions*.jsonl``) with another judge and reports, over all rows and per
run, both harmful scores, the share of verdicts that agree, Cohen's kappa and the confusion
counts, with the run's own verdicts as the reference. Completions are read from disk and never
printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hftlab.config import ConfigError
from hftlab.judges.base import Judge
from hftlab.judges.common import classification_metrics

if TYPE_CHECKING:
    from hftlab.compare import RunRecord

COMPLETION_FILES = {
    "final": "completions.jsonl",
    "finetuned": "completions_finetuned.jsonl",
    "aligned": "completions_aligned.jsonl",
    "base": "completions_base.jsonl",
}


def finished_runs(folder: Path) -> list[RunRecord]:
    """``folder`` itself when it is a run, else every finished run below it, as ``hftlab
    compare`` finds them (a folder with metrics.json and config.yaml)."""
    from hftlab.compare import collect_runs

    try:
        return collect_runs(folder)
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no run folder (with metrics.json) in it; give a run or "
                          "sweep folder") from None


def harmful_rows(run: Path, which: str) -> list[dict[str, Any]]:
    """The harmful-set rows (prompt, completion, the run judge's ``flagged``) of one model."""
    path = run / "eval" / COMPLETION_FILES[which]
    if not path.is_file():
        return []
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            row = json.loads(line)
            if row.get("set") != "harmful":
                continue
            if "flagged" not in row:
                raise ConfigError(f"{path}: line {number} has no 'flagged' verdict; rerun the "
                                  "evaluation with this version of hftlab")
            rows.append(row)
    return rows


def judge_agreement(folder: Path, judge: Judge, which: str = "final") -> dict[str, Any]:
    """Re-judge every run's saved harmful completions with ``judge``; the runs' own verdicts
    are the reference, pooled over runs (``reference_judges`` lists every judge they used).
    Agreement (accuracy), kappa and the confusion counts come from ``sklearn.metrics``."""
    from sklearn.metrics import accuracy_score

    if which not in COMPLETION_FILES:
        raise ConfigError(f"--completions {which!r}: choose one of {', '.join(COMPLETION_FILES)}")
    per_run: list[dict[str, Any]] = []
    reference: list[bool] = []
    verdicts: list[bool] = []
    reference_judges: set[str] = set()
    for record in finished_runs(folder):
        run = record.path
        rows = harmful_rows(run, which)
        if not rows:
            continue
        reference_judges.add(json.dumps(record.metrics.get("judge"), sort_keys=True))
        flags = [bool(f) for f in judge.flag([r["prompt"] for r in rows],
                                             [r["completion"] for r in rows])]
        if len(flags) != len(rows):
            raise ValueError(f"judge '{judge.name}' returned {len(flags)} verdicts for "
                             f"{len(rows)} rows")
        theirs = [bool(r["flagged"]) for r in rows]
        reference += theirs
        verdicts += flags
        per_run.append({
            "run": str(run), "n": len(rows),
            "reference_hs": round(100 * sum(theirs) / len(rows), 2),
            "judge_hs": round(100 * sum(flags) / len(rows), 2),
            "agreement": round(float(accuracy_score(theirs, flags)), 4),
        })
    if not per_run:
        raise ConfigError(f"{folder}: no run has eval/{COMPLETION_FILES[which]} with harmful "
                          "rows")
    overall = classification_metrics(reference, verdicts)
    return {
        "judge": judge.describe(),
        "reference_judges": [json.loads(j) for j in sorted(reference_judges)],
        "completions": which,
        "runs": len(per_run),
        "n": overall["n"],
        "reference_hs": round(100 * sum(reference) / len(reference), 2),
        "judge_hs": round(100 * sum(verdicts) / len(verdicts), 2),
        "agreement": round(overall["accuracy"], 4),
        "kappa": round(overall["kappa"], 4),
        # the run's judge is the reference: fp = only the new judge flags, fn = only the run's
        "both_flag": overall["tp"], "only_judge": overall["fp"],
        "only_reference": overall["fn"], "neither": overall["tn"],
        "per_run": per_run,
    }


def format_agreement(result: dict[str, Any]) -> str:
    """A short plain-text summary (no completions)."""
    names = ", ".join(j.get("name", "?") for j in result["reference_judges"] if j)
    lines = [
        f"judge {result['judge']['name']} vs the runs' judge ({names}) on {result['n']} "
        f"{result['completions']} harmful completions from {result['runs']} runs",
        f"harmful score: runs' judge {result['reference_hs']:.1f}%, "
        f"{result['judge']['name']} {result['judge_hs']:.1f}%",
        f"agreement {100 * result['agreement']:.1f}%, Cohen's kappa {result['kappa']:.3f}",
        f"both flag {result['both_flag']}, only {result['judge']['name']} "
        f"{result['only_judge']}, only the runs' judge {result['only_reference']}, "
        f"neither {result['neither']}",
        "",
        f"{'run':<48} {'n':>4} {'runs HS':>8} {'judge HS':>9} {'agree':>6}",
    ]
    for row in result["per_run"]:
        name = Path(row["run"]).name
        lines.append(f"{name[-48:]:<48} {row['n']:>4} {row['reference_hs']:>8.1f} "
                     f"{row['judge_hs']:>9.1f} {100 * row['agreement']:>5.1f}%")
    return "\n".join(lines)
