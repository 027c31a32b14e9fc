"""The queue's contract, run against a SQLite store (test_serve_queue.py) and a real Postgres
server (test_serve_postgres.py): the same checks on the same SQL."""

from __future__ import annotations

import threading
import time

from hftlab.serve.store import Store, new_id


def add_jobs(store: Store, count: int, tenant: str = "acme") -> list[str]:
    ids = []
    for i in range(count):
        job_id = new_id()
        store.add_job(tenant, job_id, "u1", "sst2", "sft", i, {"rows": 1})
        ids.append(job_id)
        time.sleep(0.001)  # distinct creation times: the claim order is the queue order
    return ids


def check_claims_in_order_and_once(store: Store) -> None:
    ids = add_jobs(store, 3)
    assert store.claim("w1", 30)["id"] == ids[0]
    assert store.claim("w2", 30)["id"] == ids[1]
    assert store.claim("w3", 30)["id"] == ids[2]
    assert store.claim("w4", 30) is None


def check_concurrent_claims_never_share_a_job(store_factory) -> None:
    ids = add_jobs(store_factory(), 24)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        store = store_factory()
        while (job := store.claim(name, 30)) is not None:
            with lock:
                claimed.append(job["id"])
        store.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


def check_stale_lease_is_reclaimed(store: Store) -> None:
    (job_id,) = add_jobs(store, 1)
    assert store.claim("dead", 30)["id"] == job_id
    assert store.heartbeat(job_id, "dead", stage="finetune", step=2, total_steps=4)
    assert store.claim("w2", 30) is None  # the lease is fresh
    time.sleep(0.3)
    job = store.claim("w2", 0.2)  # older than the lease: taken over
    assert job["id"] == job_id and job["attempts"] == 2 and job["stage"] == "finetune"
    assert not store.heartbeat(job_id, "dead")  # the old worker learns it lost the job
    assert not store.finish(job_id, "dead", "failed", error="late")
    assert store.finish(job_id, "w2", "deployed", decision={"deployed": True, "reasons": []})
    done = store.job("acme", job_id)
    assert done["status"] == "deployed" and done["error"] is None
    assert store.claim("w3", 0.0) is None  # a finished job is never claimed again
    assert store.job("globex", job_id) is None


def check_uploads_are_per_tenant(store: Store) -> None:
    store.add_upload("acme", "u9", "a.jsonl", 3, 1, 2, "/nowhere")
    assert [u["id"] for u in store.uploads("acme")] == ["u9"]
    assert store.uploads("globex") == [] and store.upload("globex", "u9") is None
    assert not store.delete_upload("globex", "u9")
    assert store.delete_upload("acme", "u9")
