"""A worker process: claim the oldest queued job (or one whose worker stopped heart-beating),
run it, record the gate's decision; repeat. A thread renews the lease every
``poll_seconds`` and copies the pipeline's live progress (stage, step, total, ETA) into the
job's row. A worker killed mid-job leaves the row ``running`` with a stale heartbeat; the next
worker takes it over after ``lease_seconds`` and the pipeline resumes from its checkpoints."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path

from hftlab.serve.config import ServiceConfig
from hftlab.serve.runner import job_dir
from hftlab.serve.store import Store, open_store

log = logging.getLogger(__name__)
PARENT_ENV = "HFTLAB_SERVE_PARENT"  # set by `hftlab serve` for the workers it starts


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def progress_fields(run_dir: Path) -> dict[str, object]:
    """What the pipeline's progress component shows now, as job columns; between two bars,
    the first stage of the run folder that has not finished, with the count of the bar that
    ended last (a bar shorter than the poll interval is still counted)."""
    from hftlab.pipeline import MARKER, STAGES
    from hftlab.progress import current, latest

    bar = current()
    if bar is None:
        pending = [s for s in STAGES if not (run_dir / s / MARKER).exists()]
        fields: dict[str, object] = {"stage": pending[0] if pending else "gate"}
        ended = latest()
        if ended is not None:
            fields.update(step=int(ended.n), total_steps=int(ended.total))
        return fields
    eta = bar.eta()
    return {"stage": bar.desc.split(" (")[0], "step": int(bar.n), "total_steps": int(bar.total),
            "eta_seconds": None if eta is None else round(eta, 1)}


class Heartbeat(threading.Thread):
    """Renews a job's lease and reports its progress until stopped; a worker that finds its
    lease taken over exits at once, so two workers never write one run folder."""

    def __init__(self, config: ServiceConfig, job_id: str, name: str) -> None:
        super().__init__(daemon=True)
        self.config, self.job_id, self.name_ = config, job_id, name
        self.stopped = threading.Event()

    def run(self) -> None:
        store = open_store(self.config)
        try:
            while not self.stopped.wait(self.config.poll_seconds):
                fields = progress_fields(job_dir(self.config, self.job_id) / "run")
                if not store.heartbeat(self.job_id, self.name_, **fields):
                    log.error("job %s was taken over by another worker; stopping", self.job_id)
                    os._exit(3)
        finally:
            store.close()


def work_once(config: ServiceConfig, store: Store, name: str) -> bool:
    """Claim and run one job; False when none was waiting."""
    from hftlab.progress import forget
    from hftlab.serve.runner import run_job

    job = store.claim(name, config.lease_seconds)
    if job is None:
        return False
    log.info("job %s (tenant %s): claimed, attempt %s", job["id"], job["tenant"],
             job["attempts"])
    forget()  # the previous job's last bar is not this one's progress
    beat = Heartbeat(config, job["id"], name)
    beat.start()
    try:
        report = run_job(config, job)
    except Exception as exc:  # any failure is the job's, recorded; the worker goes on
        log.error("job %s failed: %s", job["id"], traceback.format_exc(limit=3))
        beat.stopped.set()
        beat.join()
        store.finish(job["id"], name, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        return True
    beat.stopped.set()
    beat.join()
    deployed = report["decision"]["deployed"]
    final = progress_fields(job_dir(config, job["id"]) / "run")
    store.heartbeat(job["id"], name, **{**final, "stage": "done", "eta_seconds": 0})
    store.finish(job["id"], name, "deployed" if deployed else "refused",
                 decision=report["decision"])
    log.info("job %s: %s", job["id"], "deployed" if deployed else "refused")
    return True


def run_worker(config: ServiceConfig, exit_when_idle: bool = False) -> None:
    """Serve the queue until killed (``exit_when_idle``: until it is empty)."""
    store = open_store(config)
    name = worker_name()
    log.info("worker %s on %s", name, config.database)
    parent = os.environ.get(PARENT_ENV)
    while True:
        if not work_once(config, store, name):
            if exit_when_idle:
                return
            if parent and os.getppid() != int(parent):
                log.info("worker %s: its server is gone; exiting", name)
                return
            time.sleep(config.poll_seconds)
