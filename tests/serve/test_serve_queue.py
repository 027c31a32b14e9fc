"""The persistent queue on SQLite (WAL): claims in order, each job once even under
concurrent workers, a stale lease taken over, finished jobs left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.serve.store import Store
from tests.serve import queue_checks


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "service.db"


def test_serve_sqlite_is_in_wal_mode(sqlite_path: Path) -> None:
    store = Store("sqlite", sqlite_path)
    with store.transaction() as cur:
        cur.execute("PRAGMA journal_mode")
        assert cur.fetchone() == {"journal_mode": "wal"}


def test_serve_queue_claims_in_order_and_once(sqlite_path: Path) -> None:
    queue_checks.check_claims_in_order_and_once(Store("sqlite", sqlite_path))


def test_serve_queue_concurrent_claims(sqlite_path: Path) -> None:
    queue_checks.check_concurrent_claims_never_share_a_job(lambda: Store("sqlite", sqlite_path))


def test_serve_queue_stale_lease_is_reclaimed(sqlite_path: Path) -> None:
    queue_checks.check_stale_lease_is_reclaimed(Store("sqlite", sqlite_path))


def test_serve_queue_uploads_per_tenant(sqlite_path: Path) -> None:
    queue_checks.check_uploads_are_per_tenant(Store("sqlite", sqlite_path))
