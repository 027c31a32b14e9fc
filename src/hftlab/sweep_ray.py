"""``hftlab sweep --backend ray``: each run of a sweep as a Ray task with declared resources.

The guarantees of the local backend hold: a run whose alignment is not cached yet waits for the
one run that trains it (:class:`hftlab.sweep.AlignmentOrder`); finished runs are skipped (rerun
to resume); a failed run is recorded and the others go on. A run whose worker or node is lost is
retried by Ray (``max_retries``); the retry runs the same run folder, so the pipeline resumes
from that folder's stage markers and training checkpoints. Run folders and caches must be on a
filesystem every node sees at the same path; nothing travels through Ray's object store.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hftlab.config import ConfigError
from hftlab.sweep import (
    AlignmentOrder,
    PlannedRun,
    Sweep,
    _describe,
    alignment_group,
    execute_run,
    record_failures,
    run_progress,
    start_sweep,
)

#: The sweep's folder of attempts: per run a ``<name>.jsonl`` that each attempt (task start)
#: appends a line to: node, process, how far the run had got. Not in the run folder, which
#: holds only what the pipeline writes.
ATTEMPTS = "ray_attempts"
#: Environment passed on to every task: where the data, caches and models are found.
ENV_PREFIXES = ("HFTLAB_", "HF_", "TRANSFORMERS_", "TORCH_HOME")
UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local Ray instance; "auto": the running cluster
    num_cpus: float | None = None  # per run; default 1 (or the sweep file's `resources`)
    num_gpus: float | None = None  # per run; default 0
    memory: str | int | None = None  # per run, bytes or "16GB"; default: not declared
    max_retries: int = 3  # retries after a lost worker or node (not after a failed run)


def parse_memory(value: str | int | float) -> int:
    """Bytes from ``16GB``, ``512MiB``, ``2g`` or a number of bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?)?b?\s*", str(value).lower())
    if not match:
        raise ConfigError(f"memory {value!r}: give bytes or a size such as 16GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2) or ""])


def task_resources(sweep: Sweep, options: RayOptions) -> dict[str, Any]:
    """The resources each run declares: the options, else the sweep file's, else 1 CPU."""
    declared = dict(sweep.resources)
    for key in ("num_cpus", "num_gpus", "memory"):
        if getattr(options, key) is not None:
            declared[key] = getattr(options, key)
    resources: dict[str, Any] = {"num_cpus": float(declared.get("num_cpus", 1)),
                                 "num_gpus": float(declared.get("num_gpus", 0))}
    if declared.get("memory") is not None:
        resources["memory"] = parse_memory(declared["memory"])
    if resources["num_cpus"] <= 0 and resources["num_gpus"] <= 0:
        raise ConfigError("each run needs num_cpus > 0 or num_gpus > 0")
    return resources


def run_cell(config_path: str, overrides: list[str], run_dir: str, log_path: str, cwd: str,
             env: dict[str, str], threads: int) -> str:
    """One run inside a Ray worker: the driver's working folder and environment (relative data
    and cache paths resolve as they would locally), one line in ``log_path``, then the
    pipeline, which resumes from whatever an earlier attempt left in the run folder."""
    import ray

    os.environ.update(env)
    if Path(cwd).is_dir():
        os.chdir(cwd)
    attempt = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
               "raylet_pid": os.getppid(), "started": time.time(),
               "progress": run_progress(Path(run_dir))}
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as handle:
        handle.write(json.dumps(attempt) + "\n")
    return execute_run(config_path, overrides, run_dir, threads)


def describe_error(exc: BaseException) -> str:
    """One line for a failed task: the run's own exception, or what Ray lost."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError) and exc.cause is not None:
        return _describe(exc.cause)
    if isinstance(exc, (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                        rex.TaskUnschedulableError)):
        return (f"{type(exc).__name__}: the run's worker or node was lost after every retry; "
                "rerun the sweep to resume it from its checkpoint")
    return _describe(exc)


def run_sweep_ray(sweep: Sweep, options: RayOptions) -> list[tuple[str, str]]:
    """Run every unfinished run as a Ray task; returns (run name, error) for the failed ones."""
    import ray

    resources = task_resources(sweep, options)
    todo = start_sweep(sweep)
    if not todo:
        return record_failures(sweep, [])
    plan = AlignmentOrder([(run, *alignment_group(sweep, run)) for run in todo])
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    cwd = os.getcwd()
    threads = max(1, int(resources["num_cpus"]))  # torch uses what the task declared
    started_here = not ray.is_initialized()
    if started_here:
        local = {"include_dashboard": False} if options.address is None else {}
        ray.init(address=options.address, log_to_driver=True, **local)
    # max_calls=1: a fresh worker process per run, so each run's recorded peak memory is its
    # own (as with the local pool) and a run's models are freed when it ends
    remote = ray.remote(max_calls=1, max_retries=options.max_retries,
                        retry_exceptions=False, **resources)(run_cell)
    failures: list[tuple[str, str]] = []
    try:
        def submit(batch: list[PlannedRun]) -> dict[Any, PlannedRun]:
            return {remote.remote(str(sweep.config), r.overrides,
                                  str(sweep.run_dir(r).resolve()),
                                  str(attempts_path(sweep, r).resolve()), cwd, env, threads): r
                    for r in batch}

        pending = submit(plan.start())
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                run = pending.pop(ref)
                try:
                    ray.get(ref)
                    print(f"done {run.name}", flush=True)
                    ok = True
                except Exception as exc:  # one failed run must not stop the sweep
                    failures.append((run.name, describe_error(exc)))
                    ok = False
                pending.update(submit(plan.finished(run, ok)))
    finally:
        if started_here:
            ray.shutdown()
    return record_failures(sweep, failures)


def attempts_path(sweep: Sweep, run: PlannedRun) -> Path:
    return sweep.out / ATTEMPTS / f"{run.name}.jsonl"


def attempts(sweep: Sweep, run: PlannedRun) -> list[dict[str, Any]]:
    """The attempts recorded for a run (one per Ray task start), oldest first."""
    path = attempts_path(sweep, run)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
