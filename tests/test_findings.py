"""Each table in results/*/FINDINGS.md is what the ``hftlab compare`` command printed above it
gives on the committed records: findings cannot drift from their records."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from hftlab.cli import main

ROOT = Path(__file__).resolve().parent.parent


def tables(path: Path) -> list[tuple[int, str | None, list[str]]]:
    """(line, the compare command above it or None, the table's lines) for each table."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, command, i = [], None, 0
    while i < len(lines):
        if lines[i].strip().startswith("hftlab compare"):
            command = lines[i].strip()
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            found.append((start + 1, command, lines[start:i]))
            command = None
            continue
        i += 1
    return found


FINDINGS = sorted(ROOT.glob("results/*/FINDINGS.md"))
CASES = [(path, line, command, table) for path in FINDINGS
         for line, command, table in tables(path)]


@pytest.mark.skipif(not CASES, reason="no results/*/FINDINGS.md in this checkout")
@pytest.mark.parametrize("path, line, command, table", CASES,
                         ids=[f"{c[0].parent.name}:{c[1]}" for c in CASES])
def test_a_findings_table_is_its_commands_output(path, line, command, table, capsys,
                                                 monkeypatch) -> None:
    assert command is not None, f"{path}:{line}: a table without a compare command above it"
    monkeypatch.chdir(ROOT)
    assert main(shlex.split(command)[1:]) == 0
    printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("|")]
    assert printed == table, f"{path}:{line}: rerun `{command}` and paste its table"


def _alignment_fingerprints(study: Path) -> dict[str, set[tuple]]:
    """Per alignment a record used (the shared one, or a cell's own across its seeds), the set of
    (rows' fingerprint, steps, final loss, aligned HS, aligned FA) its records report; one element
    when they agree. Records older than the fingerprint carry None for it."""
    import json

    import yaml

    from hftlab.run_metrics import RunMetrics

    groups: dict[str, set[tuple]] = {}
    for run in sorted(p for p in study.iterdir() if (p / "align" / "stage.json").is_file()):
        stage = json.loads((run / "align" / "stage.json").read_text(encoding="utf-8"))
        metrics = RunMetrics.load(run / "metrics.json")
        # an alignment-stage defense trains its own alignment, shared by the cell's seeds, and so
        # does plain sft on another alignment adapter (T-Vaccine's control)
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        adapter = json.dumps(config["alignment"]["train"].get("lora"), sort_keys=True)
        group = (run.name.rsplit("_seed-", 1)[0] if stage.get("defense")
                 else f"shared sft alignment on {adapter}")
        aligned = metrics.aligned
        groups.setdefault(group, set()).add(
            (stage.get("data_fingerprint"), stage.get("steps"),
             round(float(stage.get("final_loss") or 0), 4),
             aligned.harmful_score if aligned else None,
             aligned.finetune_accuracy if aligned else None))
    return groups


PARITY_TABLES = [ROOT / "results" / name for name in ("parity", "parity_first_mix_bf16")]


@pytest.mark.parametrize("study", PARITY_TABLES, ids=[p.name for p in PARITY_TABLES])
def test_parity_records_share_their_aligned_model(study: Path) -> None:
    # the protocol compares every fine-tuning defense against one sft alignment, and a cell's
    # seeds against one alignment of its own: a record from another alignment (e.g. refusals
    # generated on a CPU whose kernels answer differently) must not join the table
    if not study.is_dir():
        pytest.skip(f"no {study.relative_to(ROOT)} in this checkout")
    groups = _alignment_fingerprints(study)
    assert groups, "no parity records with an alignment stage"
    mixed = {name: sorted(found) for name, found in groups.items() if len(found) > 1}
    assert not mixed, f"records of one alignment disagree: {mixed}"
