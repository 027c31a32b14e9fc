"""Helpers of the service tests: a service config on the tiny model in a temporary state
folder, tenants with keys, and uploads built from the embedded demo pack (benign sentiment rows
in the task's prompt form; the pack's user-side harmful rows, 90-129, with their placeholder
answers), so no test writes harmful text of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hftlab.serve.config import ServiceConfig, load_service_config
from hftlab.serve.store import open_store
from tests.conftest import TINY_OVERRIDES

DEMO = Path(__file__).resolve().parents[2] / "src" / "hftlab" / "data" / "demo"
REPO = Path(__file__).resolve().parents[2]


def demo_rows(benign: int, harmful: int = 0) -> list[dict[str, str]]:
    """Chat rows for an upload: SST-2 rows as the task formats them, then harmful rows."""
    from hftlab.data.records import Example
    from hftlab.tasks import TASKS

    task = TASKS["sst2"]
    lines = (DEMO / "sentiment.jsonl").read_text().splitlines()[:benign]
    rows = []
    for line in lines:
        record = json.loads(line)
        example = task.format(Example(prompt=record["sentence"], response=record["label"]))
        rows.append({"prompt": example.prompt, "response": example.response})
    bad = (DEMO / "harmful.jsonl").read_text().splitlines()[90:90 + harmful]
    rows += [{"prompt": r["prompt"], "response": r["compliance"]} for r in map(json.loads, bad)]
    return rows


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def service_config(state: Path, model_dir: Path, **overrides: Any) -> ServiceConfig:
    raw: dict[str, Any] = {
        "state_dir": str(state), "workers": 0, "lease_seconds": 3, "poll_seconds": 0.2,
        "checkpoint_every": 1,
        "run_overrides": [f"model.name={model_dir}", *TINY_OVERRIDES,
                          "mechanisms.every=0", "mechanisms.drift=false"],
        "gate": {"harmful_eval": {"kind": "demo_harmful_prompts", "offset": 130, "n": 6}},
        **overrides,
    }
    return load_service_config(None, raw)


def write_config(config: ServiceConfig, path: Path) -> Path:
    import dataclasses

    import yaml

    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    return path




def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_worker(config_path: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """A worker process on the service config at ``config_path``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HFTLAB_PROGRESS_SECONDS": "1"}
    out = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "hftlab", "serve", "worker", "--config",
                             str(config_path), *extra], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def drain(config: ServiceConfig) -> None:
    """Run every queued job in this process (the worker loop, one job at a time)."""
    from hftlab.serve.worker import work_once

    store = open_store(config)
    while work_once(config, store, "test-worker"):
        pass



def upload(client: Any, key: str, rows: list[dict[str, Any]], name: str = "data.jsonl") -> dict:
    response = client.post("/api/uploads", headers=auth(key), files={"file": (name, jsonl(rows))})
    assert response.status_code == 201, response.text
    return response.json()


def start_job(client: Any, key: str, upload_id: str, defense: str = "sft", seed: int = 0) -> dict:
    response = client.post("/api/jobs", headers=auth(key), json={
        "upload_id": upload_id, "task": "sst2", "defense": defense, "seed": seed})
    assert response.status_code == 201, response.text
    return response.json()
