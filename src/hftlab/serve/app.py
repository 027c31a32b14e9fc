"""The HTTP API (FastAPI) and the web page. Every ``/api/`` route takes the caller's tenant
from ``Authorization: Bearer <key>`` (401 without a valid one) and reads or writes only that
tenant's rows: another tenant's object is 404, exactly like one that does not exist."""

from __future__ import annotations

import json
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from hftlab.serve.auth import tenant_for_key
from hftlab.serve.config import ServiceConfig
from hftlab.serve.store import FINISHED, JOB_FIELDS, UPLOAD_FIELDS, Store, new_id, open_store
from hftlab.serve.uploads import UploadError, parse_upload, screen_upload, training_rows
from hftlab.utils import atomic_write_text

WEB = Path(__file__).parent / "web"
PLOT_NAMES = ("harmful_score.png", "delta_hs.png")


class JobRequest(BaseModel):
    upload_id: str
    task: str
    defense: str
    seed: int = 0


class GenerateRequest(BaseModel):
    prompt: str
    max_new_tokens: int = 64


def job_view(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in JOB_FIELDS}


def upload_view(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in UPLOAD_FIELDS}


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant whose key the request carries; 401 without a valid one."""
    scheme, _, key = (authorization or "").partition(" ")
    store = request.app.state.store
    name = tenant_for_key(store, key.strip()) if scheme.lower() == "bearer" else None
    if name is None:
        raise HTTPException(401, "a valid API key is needed: Authorization: Bearer <key>",
                            headers={"WWW-Authenticate": "Bearer"})
    return name


Tenant = Annotated[str, Depends(caller)]


def create_app(config: ServiceConfig, store: Store | None = None) -> FastAPI:
    """The service's app; ``store``: an open store (default: the one the config names)."""
    from hftlab.serve.runner import adapter_zip, job_dir, read_report

    db = store or open_store(config)
    app = FastAPI(title="hftlab serve", docs_url=None, redoc_url=None)
    app.state.store, app.state.config = db, config
    generators: OrderedDict[str, Any] = OrderedDict()
    generator_lock = threading.Lock()
    uploads_dir = config.state / "uploads"

    def own_job(name: str, job_id: str) -> dict[str, Any]:
        job = db.job(name, job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    def own_upload(name: str, upload_id: str) -> dict[str, Any]:
        upload = db.upload(name, upload_id)
        if upload is None:
            raise HTTPException(404, "no such upload")
        return upload

    def finished(job: dict[str, Any], wanted: tuple[str, ...] = FINISHED) -> None:
        if job["status"] not in wanted:
            raise HTTPException(409, f"the job is {job['status']}; this needs it "
                                     f"{' or '.join(wanted)}")

    @app.get("/api/me")
    def me(name: Tenant) -> dict[str, Any]:
        return {"tenant": name}

    @app.get("/api/options")
    def options(name: Tenant) -> dict[str, Any]:
        return {"tasks": config.tasks, "defenses": config.defenses,
                "gate": config.public_policy(),
                "screening": config.screening.public(),
                "limits": {"max_upload_bytes": config.limits.max_upload_bytes,
                           "max_rows": config.limits.max_rows}}

    @app.post("/api/uploads", status_code=201)
    def add_upload(name: Tenant, file: Annotated[UploadFile, File()]) -> Any:
        filename = Path(file.filename or "upload").name
        data = file.file.read(config.limits.max_upload_bytes + 1)
        try:
            parsed = screen_upload(parse_upload(filename, data, config.limits),
                                   config.screening, config.tasks)
        except UploadError as exc:
            return JSONResponse({"detail": {"file": filename, "errors": [
                e.as_dict() for e in exc.errors]}}, status_code=422)
        rows = training_rows(parsed, config.screening)
        upload_id = new_id()
        uploads_dir.mkdir(parents=True, exist_ok=True)
        path = uploads_dir / f"{upload_id}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        row = db.add_upload(name, upload_id, filename, len(parsed.rows), parsed.flagged,
                            len(rows), str(path))
        return upload_view(row)

    @app.get("/api/uploads")
    def list_uploads(name: Tenant) -> list[dict[str, Any]]:
        return [upload_view(r) for r in db.uploads(name)]

    @app.get("/api/uploads/{upload_id}")
    def get_upload(name: Tenant, upload_id: str) -> dict[str, Any]:
        return upload_view(own_upload(name, upload_id))

    @app.delete("/api/uploads/{upload_id}", status_code=204)
    def delete_upload(name: Tenant, upload_id: str) -> None:
        upload = own_upload(name, upload_id)
        db.delete_upload(name, upload_id)
        Path(upload["path"]).unlink(missing_ok=True)  # jobs keep their own copy

    @app.post("/api/jobs", status_code=201)
    def add_job(name: Tenant, request: JobRequest) -> dict[str, Any]:
        upload = own_upload(name, request.upload_id)
        if request.task not in config.tasks:
            raise HTTPException(422, f"task {request.task!r} is not offered; choose one of "
                                     f"{', '.join(config.tasks)}")
        if request.defense not in config.defenses:
            raise HTTPException(422, f"defense {request.defense!r} is not on the provider's "
                                     f"allow-list: {', '.join(config.defenses)}")
        if upload["kept"] < 1:
            raise HTTPException(422, "the screening left no row of this upload to train on")
        job_id = new_id()
        folder = job_dir(config, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(upload["path"], folder / "upload.jsonl")
        screening = {"rows": upload["rows"], "flagged": upload["flagged"],
                     "kept": upload["kept"], **config.screening.public()}
        return job_view(db.add_job(name, job_id, upload["id"], request.task, request.defense,
                                   request.seed, screening))

    @app.get("/api/jobs")
    def list_jobs(name: Tenant) -> list[dict[str, Any]]:
        return [job_view(r) for r in db.jobs(name)]

    @app.get("/api/jobs/{job_id}")
    def get_job(name: Tenant, job_id: str) -> dict[str, Any]:
        return job_view(own_job(name, job_id))

    @app.get("/api/jobs/{job_id}/report")
    def get_report(name: Tenant, job_id: str) -> dict[str, Any]:
        job = own_job(name, job_id)
        finished(job, ("deployed", "refused"))
        report = read_report(config, job_id)
        if report is None:
            raise HTTPException(409, "the job's report is not written yet")
        report["plots"] = [f"/api/jobs/{job_id}/plots/{p}" for p in report.get("plots", [])]
        return report

    @app.get("/api/jobs/{job_id}/plots/{plot}")
    def get_plot(name: Tenant, job_id: str, plot: str) -> FileResponse:
        own_job(name, job_id)
        path = job_dir(config, job_id) / "plots" / plot
        if plot not in PLOT_NAMES or not path.is_file():
            raise HTTPException(404, "no such plot")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/jobs/{job_id}/adapter")
    def get_adapter(name: Tenant, job_id: str) -> FileResponse:
        finished(own_job(name, job_id), ("deployed",))
        return FileResponse(adapter_zip(config, job_id), media_type="application/zip",
                            filename=f"adapter-{job_id}.zip")

    @app.post("/api/jobs/{job_id}/generate")
    def post_generate(name: Tenant, job_id: str, request: GenerateRequest) -> dict[str, Any]:
        job = own_job(name, job_id)
        finished(job, ("deployed",))
        from hftlab.serve.runner import Generator

        with generator_lock:  # one model in memory at a time, one prompt at a time
            if job_id not in generators:
                generators.clear()
                generators[job_id] = Generator(config, job)
            completion = generators[job_id](request.prompt, min(request.max_new_tokens, 256))
        return {"completion": completion}

    WEB.mkdir(exist_ok=True)
    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        page = WEB / "index.html"
        if not page.is_file():
            raise HTTPException(404, "the web page is not installed")
        return FileResponse(page)

    return app
