"""Concurrent runs that need the same uncached entry train it once: the others wait on the
entry's file lock, which a killed holder releases."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hftlab.cache import entry_lock


def lock_is_held(folder: Path) -> bool:
    """Whether some process holds the lock of an entry in ``folder``."""
    for path in folder.glob(".*.lock"):
        with path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def test_two_runs_needing_one_alignment_train_it_once(tiny_overrides, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [tmp_path / "a", tmp_path / "b"]
    aligned = Path(next(o for o in tiny_overrides if o.startswith("cache_dir="))[10:]) / "aligned"

    # 1000 steps: the first run still trains when the second (start-up, imports) reaches the lock
    def start(run: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "hftlab", "run", "configs/quickstart.yaml", *tiny_overrides,
             "alignment.train.max_steps=1000", "--out", str(run)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    first = start(runs[0])
    deadline = time.monotonic() + 120
    while not lock_is_held(aligned):  # the first run is training the alignment
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = start(runs[1])
    errors = [p.communicate(timeout=600)[1] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], errors
    assert "waiting for another process" in errors[1]
    cached = [json.loads((run / "align" / "stage.json").read_text())["cached"] for run in runs]
    assert cached == [False, True]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    for m in metrics:
        m.pop("stages")
    assert metrics[0] == metrics[1]


def test_a_second_writer_waits_for_the_first(tmp_path) -> None:
    target = tmp_path / "entry"
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with entry_lock(target):
            inside.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with entry_lock(target):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_killed_holder_releases_the_lock(tmp_path) -> None:
    target = tmp_path / "entry"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from hftlab.cache import entry_lock\n"
         "with entry_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)",
         str(target)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(10)
    started = time.perf_counter()
    with entry_lock(target):
        pass
    assert time.perf_counter() - started < 5


def test_locks_of_different_entries_do_not_block(tmp_path) -> None:
    with entry_lock(tmp_path / "a"):
        started = time.perf_counter()
        with entry_lock(tmp_path / "b"):
            pass
    assert time.perf_counter() - started < 1
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [".a.lock", ".b.lock"]
