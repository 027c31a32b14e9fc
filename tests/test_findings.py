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
