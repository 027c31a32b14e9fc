"""One job through the pipeline: its run config (the provider's base run, the tenant's task,
defense and seed, the upload as the fine-tuning data, the gate's judge and evaluation sets),
the run (resumed from its own checkpoints when a worker died), then the gate's report."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from hftlab.serve.config import ServiceConfig
from hftlab.serve.gate import decide, write_plots
from hftlab.utils import atomic_write_text

REPORT = "report.json"


def job_dir(config: ServiceConfig, job_id: str) -> Path:
    return config.state / "jobs" / job_id


def run_settings(config: ServiceConfig, job: dict[str, Any]) -> list[str]:
    """The ``key=value`` items that turn the base run into this job's run."""
    folder = job_dir(config, job["id"])
    rows = sum(1 for _ in (folder / "upload.jsonl").open(encoding="utf-8"))
    gate = config.gate
    settings: dict[str, Any] = {
        "seed": job["seed"],
        "defense": job["defense"],
        "defense_args": config.defense_args.get(job["defense"], {}),
        "attack": "service_upload",
        "attack_args": {},
        "finetune.task": job["task"],
        "finetune.harmful_data": {"kind": "service_upload", "path": str(folder.resolve() /
                                                                         "upload.jsonl")},
        "finetune.n": rows,
        "finetune.poison_ratio": 0.0,
        "checkpoint_every": config.checkpoint_every,
        "cache_dir": str((config.state / "cache").resolve()),
        "eval.judge": gate.judge,
        "eval.harmful": gate.harmful_eval,
    }
    if gate.task_eval:
        settings["eval.task"] = gate.task_eval
    return [*config.run_overrides, *(f"{k}={json.dumps(v)}" for k, v in settings.items())]


def job_config(config: ServiceConfig, job: dict[str, Any]) -> Any:
    from hftlab.config import load_config
    from hftlab.serve.hooks import register

    register()
    return load_config(config.base_config, run_settings(config, job))


def run_job(config: ServiceConfig, job: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the job's pipeline and the gate; the report (also written to the job
    folder, with its plots)."""
    from hftlab.pipeline import run_pipeline

    folder = job_dir(config, job["id"])
    metrics = run_pipeline(job_config(config, job), folder / "run")
    evidence = decide(metrics.to_dict(), config.gate)
    report = {
        "screening": json.loads(job.get("screening") or "{}"),
        **evidence,
        "policy": config.public_policy(),
        "plots": write_plots(evidence, config.gate, folder / "plots"),
    }
    atomic_write_text(folder / REPORT, json.dumps(report, indent=1))
    return report


def read_report(config: ServiceConfig, job_id: str) -> dict[str, Any] | None:
    path = job_dir(config, job_id) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def adapter_zip(config: ServiceConfig, job_id: str) -> Path:
    """The deployed adapter (the fine-tuning stage's model folder, and the repair's where a
    repair ran) as one zip file, built once."""
    folder = job_dir(config, job_id)
    target = folder / "adapter.zip"
    if not target.is_file():
        partial = folder / ".adapter.zip.part"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for stage in ("finetune", "post_finetune"):
                model = folder / "run" / stage / "model"
                for path in sorted(model.rglob("*")) if model.is_dir() else []:
                    if path.is_file():
                        archive.write(path, f"{stage}/{path.relative_to(model)}")
        partial.replace(target)
    return target


class Generator:
    """The deployed model of one job, loaded once, answering prompts greedily."""

    def __init__(self, config: ServiceConfig, job: dict[str, Any]) -> None:
        from hftlab.context import RunContext
        from hftlab.stage_models import deployed_model

        self.ctx = RunContext(job_config(config, job), job_dir(config, job["id"]) / "run")
        self.model = deployed_model(self.ctx).to(self.ctx.device).eval()

    def __call__(self, prompt: str, max_new_tokens: int = 64) -> str:
        from hftlab.evaluate import generate

        return generate(self.model, self.ctx.formatter, [prompt], max_new_tokens, 1,
                        self.ctx.device, self.ctx.autocast)[0]
