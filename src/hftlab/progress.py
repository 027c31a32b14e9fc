"""Live progress of every long step (a training stage, an evaluation, a defense's or an
attack's pass over many rows), from one component: on a terminal a tqdm bar with step/total,
the latest loss, tokens/s and the ETA; anywhere else (a log file, a pipe, a sweep's log) one
log line at most every :data:`INTERVAL_ENV` seconds (30 by default) and one at the end, never
a carriage-return-joined bar. It also knows which step is in progress (:func:`current`), for
the one line an interrupted command prints (:mod:`hftlab.interrupt`)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["INTERVAL_ENV", "Progress", "current", "format_seconds", "progress"]

log = logging.getLogger(__name__)
# Progress lines are the point of a long run's log: shown without -v (the command line sets
# WARNING on the root logger), still silenced like any other logger by a logging config.
log.setLevel(logging.INFO)

INTERVAL_ENV = "HFTLAB_PROGRESS_SECONDS"  # seconds between log lines when not on a terminal
DEFAULT_INTERVAL = 30.0

_open: list[Progress] = []  # the steps in progress, innermost last
_interrupted: list[Progress] = []  # the innermost step a Ctrl-C stopped (for its message)
_ended: list[Progress] = []  # the latest step that ended, for a reader polling after it


def format_seconds(seconds: float) -> str:
    """``9m12s``, ``1h05m``, ``42s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_value(value: Any) -> str:
    """A postfix value as it is shown: floats to three significant digits, large ones whole."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def postfix_name(key: str) -> str:
    """``tok_s`` -> ``tok/s``: keyword arguments cannot hold a slash."""
    return key[:-2] + "/s" if key.endswith("_s") else key


class Progress:
    """One long step's progress; :func:`progress` makes it. ``update(n, loss=..., tok_s=...)``
    after each unit of work; ``skip(n)`` for units done before a resume (counted, but kept out
    of the rate the ETA comes from)."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool, interval: float,
                 stream: TextIO) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.interval = interval
        self._start_n = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._logged_n: int | None = None  # the count the latest log line showed
        self._bar: Any = None
        if enabled and stream.isatty():
            from tqdm.auto import tqdm

            # follow the window's size; a terminal that reports none (a bare pty) gets a fixed
            # one, else tqdm draws nothing
            sized = _width(stream) > 0
            fixed: dict[str, Any] = {} if sized else {"ncols": 100, "nrows": 24}
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream,
                             dynamic_ncols=sized, **fixed)
        self._log = enabled and self._bar is None

    def skip(self, n: int) -> None:
        self.n += n
        self._start_n = self.n
        self._started = time.monotonic()
        if self._bar is not None:
            self._bar.n = self._bar.initial = self._bar.last_print_n = self.n
            self._bar.refresh()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                shown = {postfix_name(k): format_value(v) for k, v in postfix.items()}
                self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
        elif self._log and time.monotonic() - self._last_line >= self.interval:
            self._write()

    def eta(self) -> float | None:
        """Seconds left at the rate since the start (or the resume); None before any work."""
        done = self.n - self._start_n
        if done <= 0:
            return None
        return (time.monotonic() - self._started) / done * max(0, self.total - self.n)

    def line(self) -> str:
        """``align: step 40/180 (22%) loss 1.93 tok/s 250 eta 9m12s``."""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total}{share}"]
        parts += [f"{postfix_name(k)} {format_value(v)}" for k, v in self.postfix.items()]
        if self.total and self.n >= self.total:
            parts.append(f"done in {format_seconds(time.monotonic() - self._started)}")
        else:
            eta = self.eta()
            parts.append(f"eta {format_seconds(eta) if eta is not None else '?'}")
        return " ".join(parts)

    def _write(self) -> None:
        self._last_line = time.monotonic()
        self._logged_n = self.n
        log.info("%s", self.line())

    def close(self, finished: bool) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._log and finished and self._logged_n not in (None, self.n):
            self._write()  # the final count (a pass short enough for no line gets none)


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


def _interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


@contextmanager
def progress(total: int, desc: str, unit: str = "step", enabled: bool = True,
             stream: TextIO | None = None) -> Iterator[Progress]:
    """The progress of one long step of ``total`` units; ``enabled``: whether this process
    shows it (the main one; the others keep count silently)."""
    bar = Progress(total, desc, unit, enabled, _interval(), stream or sys.stderr)
    _open.append(bar)
    finished = False
    try:
        yield bar
        finished = True
    except KeyboardInterrupt:
        if not _interrupted:
            _interrupted.append(bar)
        raise
    finally:
        _open.remove(bar)
        _ended[:] = [bar]
        bar.close(finished)


def latest() -> Progress | None:
    """The step in progress, else the latest one that ended; None before any (or after
    :func:`forget`)."""
    return current() or (_ended[0] if _ended else None)


def forget() -> None:
    """Drop the ended (and any interrupted) step, so a long-lived process's next piece of work
    starts afresh."""
    _ended.clear()
    _interrupted.clear()


def current() -> Progress | None:
    """The innermost step in progress, or the one a Ctrl-C stopped; None if neither."""
    if _open:
        return _open[-1]
    return _interrupted[0] if _interrupted else None
