"""The queue and a whole job on a real PostgreSQL server, started here with initdb/pg_ctl in a
temporary folder (as the unprivileged user ``nobody`` when the tests run as root: postgres
refuses root). Skipped, with the reason, where no server can be started."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hftlab.serve.store import Store
from tests.serve import queue_checks
from tests.serve.serve_helpers import auth, demo_rows, drain, service_config, start_job, upload


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    candidates = [found] if found else []
    candidates += sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install hftlab[serve])")
    as_user: list[str] = []
    folder = tmp_path_factory.mktemp("postgres")
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and no runuser to start postgres as another user")
        as_user = [runuser, "-u", "nobody", "--"]
        for parent in [folder, *folder.parents]:  # nobody must reach the data folder
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o711)
        shutil.chown(folder, "nobody")
    data, port = folder / "data", free_port()
    init = subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres",
                           "--no-sync"], capture_output=True, text=True)
    if init.returncode != 0:
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l",
                            str(folder / "log"), "-w", "-t", "60", "start"],
                           capture_output=True, text=True)
    if start.returncode != 0:
        pytest.skip(f"pg_ctl could not start postgres: {start.stderr.strip()[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    store = Store("postgres", postgres_url=postgres_url)
    with store.transaction() as cur:  # each test starts from empty tables
        cur.execute("TRUNCATE jobs, uploads, api_keys, tenants")
    yield store
    store.close()


def test_serve_postgres_claims_in_order_and_once(pg_store: Store) -> None:
    queue_checks.check_claims_in_order_and_once(pg_store)


def test_serve_postgres_concurrent_claims(pg_store: Store, postgres_url: str) -> None:
    queue_checks.check_concurrent_claims_never_share_a_job(
        lambda: Store("postgres", postgres_url=postgres_url))


def test_serve_postgres_stale_lease_is_reclaimed(pg_store: Store) -> None:
    queue_checks.check_stale_lease_is_reclaimed(pg_store)


def test_serve_postgres_uploads_per_tenant(pg_store: Store) -> None:
    queue_checks.check_uploads_are_per_tenant(pg_store)


def test_serve_postgres_runs_a_job_end_to_end(pg_store: Store, postgres_url: str, tmp_path,
                                             tiny_model_dir) -> None:
    from fastapi.testclient import TestClient

    from hftlab.serve.app import create_app
    from hftlab.serve.auth import create_key

    config = service_config(tmp_path / "state", tiny_model_dir, database="postgres",
                            postgres=postgres_url)
    key = create_key(pg_store, "acme")
    other = create_key(pg_store, "globex")
    client = TestClient(create_app(config))
    job = start_job(client, key, upload(client, key, demo_rows(8))["id"])
    drain(config)
    done = client.get(f"/api/jobs/{job['id']}", headers=auth(key)).json()
    assert done["status"] in ("deployed", "refused") and done["error"] is None
    assert client.get(f"/api/jobs/{job['id']}", headers=auth(other)).status_code == 404
    assert not (tmp_path / "state" / "service.db").exists()  # nothing went to SQLite
