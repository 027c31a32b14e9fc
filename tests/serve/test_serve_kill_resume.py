"""kill -9 a worker process mid fine-tuning; a second worker takes the job over once its lease
is stale, resumes it from the pipeline's checkpoints, and the job ends with the same metrics as
an uninterrupted job on the same upload and seed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from hftlab.serve.auth import create_key
from hftlab.serve.store import open_store
from tests.serve.serve_helpers import (
    auth,
    demo_rows,
    service_config,
    start_job,
    start_worker,
    upload,
    write_config,
)

FINETUNE_STEPS = 24


def comparable(metrics: dict) -> dict:
    """Metrics without wall-clock fields."""
    return {k: v for k, v in metrics.items() if k not in ("stages",)}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_serve_worker_killed_mid_finetuning_resumes_to_the_same_metrics(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from hftlab.serve.app import create_app

    config = service_config(tmp_path / "state", tiny_model_dir, lease_seconds=2,
                            gate={"interval": "point", "max_hs_increase": 100,
                                  "harmful_eval": {"kind": "demo_harmful_prompts",
                                                   "offset": 130, "n": 6}})
    config.run_overrides.append(f"finetune.train.max_steps={FINETUNE_STEPS}")
    path = write_config(config, tmp_path / "service.yaml")
    store = open_store(config)
    key = create_key(store, "acme")
    client = TestClient(create_app(config, store))
    made = upload(client, key, demo_rows(12, 4))
    killed = start_job(client, key, made["id"], seed=3)
    run = config.state / "jobs" / killed["id"] / "run"
    latest = run / "finetune" / "checkpoint" / "latest.json"

    first = start_worker(path, log=tmp_path / "worker1.log")
    try:
        wait_for(lambda: latest.is_file() or first.poll() is not None, 240,
                 "the first fine-tuning checkpoint")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.wait(timeout=30)
    assert not (run / "finetune" / "stage.json").exists(), "killed after fine-tuning ended"
    job = client.get(f"/api/jobs/{killed['id']}", headers=auth(key)).json()
    assert job["status"] == "running"  # a dead worker leaves the job as it was

    reference = start_job(client, key, made["id"], seed=3)
    time.sleep(config.lease_seconds + 0.5)  # the killed worker's lease runs out
    second = start_worker(path, "--exit-when-idle", log=tmp_path / "worker2.log")
    assert second.wait(timeout=400) == 0, (tmp_path / "worker2.log").read_text()[-2000:]

    done = {j["id"]: j for j in client.get("/api/jobs", headers=auth(key)).json()}
    assert done[killed["id"]]["status"] == done[reference["id"]]["status"] == "deployed"
    assert store.job("acme", killed["id"])["attempts"] == 2
    stage = json.loads((run / "finetune" / "stage.json").read_text())
    assert stage["resumed_from_step"] >= 1 and stage["steps"] == FINETUNE_STEPS
    metrics = [json.loads((config.state / "jobs" / j / "run" / "metrics.json").read_text())
               for j in (killed["id"], reference["id"])]
    assert comparable(metrics[0]) == comparable(metrics[1])
    reports = [client.get(f"/api/jobs/{j}/report", headers=auth(key)).json()
               for j in (killed["id"], reference["id"])]
    assert reports[0]["harmful_score"] == reports[1]["harmful_score"]
