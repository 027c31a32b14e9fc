"""A bounded load test on loopback against a real server process (uvicorn, one worker process
running a job meanwhile): 4 tenants, 20 concurrent uploads and status polls each round; no
error, no object of one tenant in another's answers; latency p50/p95 printed."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from hftlab.serve.auth import create_key
from hftlab.serve.store import open_store
from tests.serve.serve_helpers import REPO, auth, demo_rows, jsonl, service_config, write_config
from tests.serve.test_serve_postgres import free_port

TENANTS = ("acme", "globex", "initech", "umbrella")
SESSIONS_PER_TENANT = 5  # 20 concurrent clients, one upload each: 20 uploads
POLL_ROUNDS = 4


def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        try:
            if httpx.get(f"{base}/api/me", timeout=2).status_code == 401:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


def test_serve_load_on_loopback(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = service_config(tmp_path / "state", tiny_model_dir, workers=1)
    config.run_overrides.append("finetune.train.max_steps=40")
    path = write_config(config, tmp_path / "service.yaml")
    store = open_store(config)
    keys = {name: create_key(store, name) for name in TENANTS}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "hftlab", "serve", "--config", str(path),
                               "--port", str(port)], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_until_up(base, server)
        with httpx.Client(base_url=base, timeout=60) as client:
            first = client.post("/api/uploads", headers=auth(keys["acme"]),
                                files={"file": ("a.jsonl", jsonl(demo_rows(12)))}).json()
            job = client.post("/api/jobs", headers=auth(keys["acme"]), json={
                "upload_id": first["id"], "task": "sst2", "defense": "sft"}).json()
            deadline = time.monotonic() + 180
            while client.get(f"/api/jobs/{job['id']}", headers=auth(keys["acme"])).json()[
                    "status"] == "queued":
                assert time.monotonic() < deadline, "the worker never claimed the job"
                time.sleep(0.2)
        latencies: list[float] = []
        owned: dict[str, set[str]] = {name: set() for name in TENANTS}
        owned["acme"] |= {first["id"], job["id"]}
        seen: dict[str, set[str]] = {name: set() for name in TENANTS}

        def timed(client: httpx.Client, method: str, url: str, **kw) -> httpx.Response:
            start = time.perf_counter()
            response = client.request(method, url, **kw)
            latencies.append(time.perf_counter() - start)
            return response

        def tenant_session(name: str, i: int) -> list[str]:
            problems = []
            with httpx.Client(base_url=base, timeout=60, headers=auth(keys[name])) as client:
                response = timed(client, "POST", "/api/uploads", files={
                    "file": (f"{name}-{i}.jsonl", jsonl(demo_rows(3 + i)))})
                if response.status_code != 201:
                    problems.append(f"upload {response.status_code}")
                else:
                    owned[name].add(response.json()["id"])
                for _ in range(POLL_ROUNDS):
                    for url in ("/api/jobs", "/api/uploads", f"/api/jobs/{job['id']}"):
                        response = timed(client, "GET", url)
                        mine = name == "acme" or not url.startswith(f"/api/jobs/{job['id']}")
                        expected = 200 if mine else 404
                        if response.status_code != expected:
                            problems.append(f"{url} {response.status_code}")
                        elif url in ("/api/jobs", "/api/uploads"):
                            seen[name] |= {row["id"] for row in response.json()}
            return problems

        sessions = [(name, i) for name in TENANTS for i in range(SESSIONS_PER_TENANT)]
        with ThreadPoolExecutor(len(sessions)) as pool:
            results = list(pool.map(lambda s: tenant_session(*s), sessions))
        problems = [p for r in results for p in r]
        # judged once every upload is known: a tenant saw only ids it created itself
        problems += [f"{name} saw {len(seen[name] - owned[name])} ids of other tenants"
                     for name in TENANTS if seen[name] - owned[name]]
        assert problems == [], problems[:10]
        for name in TENANTS:  # and no upload was lost
            listed = httpx.get(f"{base}/api/uploads", headers=auth(keys[name])).json()
            assert {row["id"] for row in listed} == owned[name] - {job["id"]}
        status = httpx.get(f"{base}/api/jobs/{job['id']}", headers=auth(keys["acme"])).json()
        assert status["status"] in ("queued", "running", "deployed", "refused"), status
        ms = sorted(1000 * s for s in latencies)
        p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
        print(f"\nserve load: {len(ms)} requests from {len(TENANTS)} tenants "
              f"({len(sessions)} concurrent clients, one upload each) while job "
              f"{status['status']} at {status['stage']} {status['step']}/"
              f"{status['total_steps']}: latency p50 "
              f"{statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, max {ms[-1]:.1f} ms")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
