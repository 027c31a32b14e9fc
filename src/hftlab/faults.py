"""Fault injection for the tests of what a ``kill -9`` leaves behind.

Every change that makes a file or folder of a run, a cache entry or a checkpoint visible (a
rename into place, a file written in place, a deletion) first calls :func:`announce_change`.
:func:`fault_at` makes the ``n``-th announced change raise :class:`SimulatedKill`, so a test can
stop hftlab between any two of its writes and check that the rerun recovers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: Called with a path before each change; None outside tests.
before_change: Callable[[Path], None] | None = None


class SimulatedKill(BaseException):
    """Raised by :func:`fault_at`; a BaseException, so no ``except Exception`` swallows it."""


def announce_change(path: Path) -> None:
    if before_change is not None:
        before_change(path)


@contextmanager
def fault_at(n: int, under: Path | None = None) -> Iterator[list[Path]]:
    """Raise :class:`SimulatedKill` before the ``n``-th change (0-based; below ``under`` when
    given); yields the changes seen so far. ``n < 0``: never raise (to list the changes)."""
    global before_change
    seen: list[Path] = []

    def hook(path: Path) -> None:
        if under is not None and not path.is_relative_to(under):
            return
        if len(seen) == n:
            raise SimulatedKill(f"before {path}")
        seen.append(path)

    previous, before_change = before_change, hook
    try:
        yield seen
    finally:
        before_change = previous
