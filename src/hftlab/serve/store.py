"""The service's database: tenants, API keys, uploads and jobs, the job table doubling as the
persistent queue. One class speaks to SQLite (WAL, the default: a file in the state folder) or
Postgres (``database: postgres``) with the same SQL; only the claim differs, because SQLite has
no row locks."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
        salt TEXT NOT NULL, digest TEXT NOT NULL, created DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
        name TEXT, rows INTEGER, flagged INTEGER, kept INTEGER, path TEXT,
        created DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
        upload_id TEXT, task TEXT, defense TEXT, seed INTEGER, status TEXT NOT NULL,
        stage TEXT, step INTEGER, total_steps INTEGER, eta_seconds DOUBLE PRECISION,
        created DOUBLE PRECISION, updated DOUBLE PRECISION, error TEXT, worker TEXT,
        heartbeat DOUBLE PRECISION, attempts INTEGER DEFAULT 0, screening TEXT,
        decision TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created)",
]
JOB_FIELDS = ("id", "upload_id", "task", "defense", "seed", "status", "stage", "step",
              "total_steps", "eta_seconds", "created", "updated", "error")
UPLOAD_FIELDS = ("id", "name", "rows", "flagged", "kept", "created")
FINISHED = ("deployed", "refused", "failed")
# a job to claim: queued, or running under a worker whose heartbeat is older than the lease
CLAIMABLE = "(status = 'queued' OR (status = 'running' AND heartbeat < ?))"


def new_id() -> str:
    return secrets.token_hex(8)


class Store:
    """Thread-safe: one connection per thread (FastAPI serves requests from a thread pool)."""

    def __init__(self, database: str, sqlite_path: Path | None = None,
                 postgres_url: str | None = None) -> None:
        self.postgres = database == "postgres"
        self.sqlite_path = sqlite_path
        self.postgres_url = postgres_url
        self._local = threading.local()
        with self.transaction() as cur:
            if self.postgres:  # concurrent CREATE ... IF NOT EXISTS can still collide there
                cur.execute("SELECT pg_advisory_xact_lock(3636)")
            for statement in SCHEMA:
                cur.execute(statement)

    # ---------------------------------------------------------------- connections and SQL
    def _connect(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self.postgres:
            import psycopg

            conn = psycopg.connect(self.postgres_url, autocommit=False)
        else:
            assert self.sqlite_path is not None
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level None: transactions are the explicit BEGINs below
            conn = sqlite3.connect(self.sqlite_path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
        self._local.conn = conn
        return conn

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s") if self.postgres else query

    @contextmanager
    def transaction(self, immediate: bool = False) -> Iterator[Any]:
        """A cursor inside one transaction; ``immediate`` takes SQLite's write lock at once
        (the claim's read-then-update must not interleave with another worker's)."""
        conn = self._connect()
        if self.postgres:
            with conn.transaction():
                yield _Cursor(conn.cursor(), self._sql)
            return
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield _Cursor(conn.cursor(), self._sql)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _one(self, query: str, *args: Any) -> dict[str, Any] | None:
        with self.transaction() as cur:
            cur.execute(query, args)
            return cur.fetchone()

    def _all(self, query: str, *args: Any) -> list[dict[str, Any]]:
        with self.transaction() as cur:
            cur.execute(query, args)
            return cur.fetchall()

    def _run(self, query: str, *args: Any) -> int:
        with self.transaction() as cur:
            cur.execute(query, args)
            return cur.rowcount

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---------------------------------------------------------------- tenants and keys
    def add_tenant(self, name: str) -> None:
        with self.transaction() as cur:
            cur.execute("SELECT name FROM tenants WHERE name = ?", (name,))
            if cur.fetchone() is None:
                cur.execute("INSERT INTO tenants (name, created) VALUES (?, ?)",
                            (name, time.time()))

    def add_key(self, tenant: str, key_id: str, salt: str, digest: str) -> None:
        self._run("INSERT INTO api_keys (key_id, tenant, salt, digest, created) "
                  "VALUES (?, ?, ?, ?, ?)", key_id, tenant, salt, digest, time.time())

    def key(self, key_id: str) -> dict[str, Any] | None:
        return self._one("SELECT tenant, salt, digest FROM api_keys WHERE key_id = ?", key_id)

    # ---------------------------------------------------------------- uploads
    def add_upload(self, tenant: str, upload_id: str, name: str, rows: int, flagged: int,
                   kept: int, path: str) -> dict[str, Any]:
        self._run("INSERT INTO uploads (id, tenant, name, rows, flagged, kept, path, created) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", upload_id, tenant, name, rows, flagged,
                  kept, path, time.time())
        upload = self.upload(tenant, upload_id)
        assert upload is not None
        return upload

    def upload(self, tenant: str, upload_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM uploads WHERE tenant = ? AND id = ?", tenant, upload_id)

    def uploads(self, tenant: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM uploads WHERE tenant = ? ORDER BY created", tenant)

    def delete_upload(self, tenant: str, upload_id: str) -> bool:
        return self._run("DELETE FROM uploads WHERE tenant = ? AND id = ?",
                         tenant, upload_id) > 0

    # ---------------------------------------------------------------- jobs
    def add_job(self, tenant: str, job_id: str, upload_id: str, task: str, defense: str,
                seed: int, screening: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        self._run("INSERT INTO jobs (id, tenant, upload_id, task, defense, seed, status, step, "
                  "total_steps, created, updated, attempts, screening) "
                  "VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, 0, ?, ?, 0, ?)", job_id, tenant,
                  upload_id, task, defense, seed, now, now, json.dumps(screening))
        job = self.job(tenant, job_id)
        assert job is not None
        return job

    def job(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM jobs WHERE tenant = ? AND id = ?", tenant, job_id)

    def job_any_tenant(self, job_id: str) -> dict[str, Any] | None:
        """For the worker, which serves every tenant."""
        return self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    def jobs(self, tenant: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM jobs WHERE tenant = ? ORDER BY created", tenant)

    def claim(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        """Atomically take the oldest claimable job for ``worker``; None when there is none.
        A running job whose worker stopped heart-beating for ``lease_seconds`` is taken over
        (it resumes from its run folder's checkpoints)."""
        now = time.time()
        stale = now - lease_seconds
        with self.transaction(immediate=True) as cur:
            if self.postgres:
                cur.execute(f"SELECT id FROM jobs WHERE {CLAIMABLE} ORDER BY created LIMIT 1 "
                            "FOR UPDATE SKIP LOCKED", (stale,))
            else:
                cur.execute(f"SELECT id FROM jobs WHERE {CLAIMABLE} ORDER BY created LIMIT 1",
                            (stale,))
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(f"UPDATE jobs SET status = 'running', worker = ?, heartbeat = ?, "
                        f"updated = ?, attempts = attempts + 1 WHERE id = ? AND {CLAIMABLE}",
                        (worker, now, now, row["id"], stale))
            if cur.rowcount != 1:
                return None
        return self.job_any_tenant(row["id"])

    def heartbeat(self, job_id: str, worker: str, **progress: Any) -> bool:
        """Renew the lease and record progress; False when the job is no longer this
        worker's (another one took it over after a stall)."""
        sets = ", ".join(f"{key} = ?" for key in progress)
        now = time.time()
        query = (f"UPDATE jobs SET heartbeat = ?, updated = ?{', ' + sets if sets else ''} "
                 "WHERE id = ? AND worker = ? AND status = 'running'")
        return self._run(query, now, now, *progress.values(), job_id, worker) == 1

    def finish(self, job_id: str, worker: str, status: str, error: str | None = None,
               decision: dict[str, Any] | None = None) -> bool:
        assert status in FINISHED
        return self._run("UPDATE jobs SET status = ?, error = ?, decision = ?, updated = ?, "
                         "eta_seconds = 0 WHERE id = ? AND worker = ? AND status = 'running'",
                         status, error, json.dumps(decision) if decision else None,
                         time.time(), job_id, worker) == 1


class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders and returns rows as dicts."""

    def __init__(self, cursor: Any, sql: Any) -> None:
        self._cursor = cursor
        self._sql = sql

    def execute(self, query: str, args: tuple[Any, ...] = ()) -> None:
        self._cursor.execute(self._sql(query), args)

    def _row(self, row: Any) -> dict[str, Any] | None:
        if row is None:
            return None
        names = [d[0] for d in self._cursor.description]
        return dict(zip(names, row, strict=True))

    def fetchone(self) -> dict[str, Any] | None:
        return self._row(self._cursor.fetchone())

    def fetchall(self) -> list[dict[str, Any]]:
        return [r for r in map(self._row, self._cursor.fetchall()) if r is not None]

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


def open_store(config: Any) -> Store:
    """The store a :class:`~hftlab.serve.config.ServiceConfig` names."""
    return Store(config.database, Path(config.state_dir) / "service.db", config.postgres)
