"""The load other processes put on a stage's cores: /proc/stat's busy time less the process's
own, and whether it took cores the run needed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hftlab import cpu_load
from hftlab.cpu_load import CpuClock, contended, cores_used, cpu_clock, other_cores


def test_other_cores_is_the_machine_busy_time_less_this_process() -> None:
    start, end = CpuClock(busy=100.0, own=10.0, wall=0.0), CpuClock(130.0, 20.0, 10.0)
    # 30 busy seconds on the cores in 10 s, 10 of them this process's: 2 cores of other work
    assert other_cores(start, end) == pytest.approx(2.0)
    assert cores_used(start, end) == pytest.approx(1.0)
    # a kernel whose busy time misses the process's own: unreadable, not "no load"
    assert other_cores(start, CpuClock(105.0, 20.0, 10.0)) is None
    # too short for 10 ms ticks, or no /proc/stat
    assert other_cores(start, CpuClock(100.5, 10.2, 0.5)) is None
    assert other_cores(CpuClock(None, 0.0, 0.0), CpuClock(None, 1.0, 2.0)) is None


def test_contended_means_other_work_took_cores_the_run_needed(monkeypatch) -> None:
    monkeypatch.setattr(cpu_load, "usable_cores", lambda: frozenset(range(4)))
    # 4 cores, a run needing 2: two are spare, and a quarter core more is tolerated
    assert not contended(2.2, needed=2)
    assert contended(2.3, needed=2)
    # a run needing every core: any other work beyond a quarter core counts
    assert contended(0.3, needed=4) and not contended(0.2, needed=4)
    assert not contended(None, needed=4)


def test_a_proc_stat_of_another_shape_reads_as_unknown_not_as_an_error(monkeypatch,
                                                                     tmp_path) -> None:
    odd = tmp_path / "stat"
    odd.write_text("cpu  1 2 3\n\ncpuX 5 5\nintr 7\n")
    real_path = Path
    monkeypatch.setattr(cpu_load, "Path",
                        lambda p: odd if p == "/proc/stat" else real_path(p))
    monkeypatch.setattr(cpu_load, "usable_cores", lambda: frozenset({0}))
    assert cpu_clock().busy is None  # no line names a usable core
    odd.write_text("cpu0 100 0 50 900\n")  # an old kernel's four fields
    assert cpu_clock().busy == pytest.approx(150 / cpu_load.os.sysconf("SC_CLK_TCK"))


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
def test_a_busy_child_process_is_counted_as_other_work() -> None:
    start = cpu_clock()
    subprocess.run([sys.executable, "-c",
                    "import time\nend = time.process_time() + 1.5\n"
                    "while time.process_time() < end: pass"], check=True)
    time.sleep(0.1)
    end = cpu_clock()
    others = other_cores(start, end)
    if others is None:
        pytest.skip("this kernel's /proc/stat does not count this process's time")
    # 1.5 CPU seconds of the child in about 1.6-2 s of wall time (more if the machine is busy)
    assert others * (end.wall - start.wall) >= 1.2
    assert cores_used(start, end) < 0.5  # this process waited
