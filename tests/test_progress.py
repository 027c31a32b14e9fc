"""Live progress (hftlab.progress): a bar with step/total, loss and ETA on a terminal, periodic
log lines elsewhere."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time

from hftlab.progress import INTERVAL_ENV, current, forget, format_seconds, latest, progress


def test_off_a_terminal_it_logs_lines_with_step_loss_and_eta(monkeypatch, caplog) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")
    with caplog.at_level(logging.INFO, logger="hftlab.progress"):
        with progress(4, "align", stream=io.StringIO()) as bar:
            for _ in range(4):
                bar.update(1, loss=1.93, tok_s=250.4)
    lines = [r.getMessage() for r in caplog.records if r.name == "hftlab.progress"]
    assert lines[0].startswith("align: step 1/4 (25%) loss 1.93 tok/s 250 eta ")
    assert lines[-1].startswith("align: step 4/4 (100%) loss 1.93 tok/s 250 done in ")
    assert len(lines) == 4  # the last update's line is the final one, not repeated


def test_lines_come_at_most_every_interval(monkeypatch, caplog) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="hftlab.progress"):
        with progress(50, "eval base", unit="prompt", stream=stream) as bar:
            for _ in range(50):
                bar.update(1)
    assert not [r for r in caplog.records if r.name == "hftlab.progress"]
    assert stream.getvalue() == ""  # never a bar off a terminal


def test_a_disabled_progress_shows_nothing_but_keeps_count(monkeypatch, caplog) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")
    with caplog.at_level(logging.INFO, logger="hftlab.progress"):
        with progress(3, "align", enabled=False, stream=io.StringIO()) as bar:
            bar.update(2)
            assert current() is bar and bar.n == 2
    assert not caplog.records


def test_skipped_work_counts_but_stays_out_of_the_eta() -> None:
    with progress(10, "refusals", unit="prompt", stream=io.StringIO()) as bar:
        bar.skip(8)
        assert bar.eta() is None  # nothing done since the resume: no rate yet
        bar.update(1)
        assert bar.n == 9 and bar.eta() is not None
        assert "prompt 9/10 (90%)" in bar.line()


def test_the_latest_ended_step_stays_readable_until_forgotten() -> None:
    forget()
    assert latest() is None
    with progress(3, "finetune", enabled=False) as bar:
        bar.update(3)
        assert latest() is bar
    assert current() is None and latest() is bar and (bar.n, bar.total) == (3, 3)
    forget()
    assert latest() is None


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 42, 552, 3900)] == ["0s", "42s", "9m12s", "1h05m"]


def run_in_pty(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as stdin, stdout and stderr; (exit code, output)."""
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def test_a_run_on_a_terminal_shows_a_bar_with_loss_and_eta(tiny_overrides, tmp_path) -> None:
    code, out = run_in_pty([sys.executable, "-m", "hftlab", "run", "configs/quickstart.yaml",
                            *tiny_overrides, "--out", str(tmp_path / "run")])
    assert code == 0, out
    # tqdm's bar: step/total, elapsed<remaining (the ETA), loss and tokens/s
    bar = re.compile(r"alignment \(16 rows\): +\d+%\|.*\| \d/3 \[\d\d:\d\d<\d\d:\d\d, .*"
                     r"loss=[\d.]+, tok/s=\d+\]")
    assert bar.search(out), out
    assert re.search(r"finetune \(20 rows\): +100%\|.*\| 4/4 ", out), out
    assert "eval final: " in out
