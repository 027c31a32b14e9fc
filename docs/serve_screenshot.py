"""docs/img/serve-report.png: the ``hftlab serve`` page with one job's gate report, 1280 px wide.

Starts the service on the embedded model (the quickstart settings) with a fresh state folder,
adds a tenant, then drives the page in headless Chromium (Debian's ``chromium`` package through
Playwright): log in, upload the demo pack's benign sentiment rows, start a job, wait for the
gate's decision and photograph the page (minutes on a CPU). ``python docs/serve_screenshot.py``.

Also the helpers tests/serve/test_browser.py drives the page with, so the picture and the test
go through the same steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
WIDTH = 1280
DEMO = ROOT / "src" / "hftlab" / "data" / "demo"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(folder: Path, settings: dict[str, Any]) -> Path:
    """A service config in ``folder`` (state inside it) with ``settings`` on top; JSON is YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"state_dir": str(folder / "state"), **settings}
    path = folder / "service.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def hftlab(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hftlab", *args], check=True, text=True,
                          capture_output=True, **kwargs)


def add_tenant(config: Path, name: str) -> str:
    """A new tenant's API key: the last word ``hftlab serve tenant add`` prints."""
    printed = hftlab("serve", "tenant", "add", name, "--config", str(config), timeout=120).stdout
    return printed.split()[-1]


@contextlib.contextmanager
def service(config: Path, port: int, log: Path, timeout: float = 180.0) -> Iterator[str]:
    """``hftlab serve`` (which starts its workers) on ``port``; yields its base URL once the page
    answers and stops the whole process group afterwards."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "hftlab", "serve", "--config", str(config), "--port",
             str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"hftlab serve exited with {process.returncode}: "
                                   f"{log.read_text(encoding='utf-8')[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"hftlab serve did not answer on {url}") from None
                time.sleep(0.5)
        yield url
    finally:
        # SIGTERM to the group: the server and the workers it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def demo_upload(path: Path, benign: int, harmful: int = 0, seed: int = 0) -> Path:
    """A chat-row upload (``prompt``, ``response``) from the demo pack: ``benign`` sentiment
    rows in the sst2 task's prompt format, plus ``harmful`` of the pack's user rows (90-129:
    harmful requests with non-actionable placeholder answers), shuffled."""
    from hftlab.tasks import TASKS

    instruction = TASKS["sst2"].instruction
    rows = [{"prompt": f"{instruction}\n\nInput: {r['sentence']}", "response": r["label"]}
            for r in _jsonl(DEMO / "sentiment.jsonl")[:benign]]
    rows += [{"prompt": r["prompt"], "response": r["compliance"]}
             for r in _jsonl(DEMO / "harmful.jsonl")[90:90 + harmful]]
    random.Random(seed).shuffle(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def log_in(page: Any, base_url: str, key: str) -> None:
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("status")).to_contain_text("Logged in as")


def upload(page: Any, path: Path) -> str:
    """Upload ``path`` through the form; return the page's result line."""
    from playwright.sync_api import expect

    page.get_by_label("Dataset file (.jsonl or .csv)").set_input_files(str(path))
    page.get_by_role("button", name="Upload").click()
    result = page.locator("#upload-result")
    expect(result).not_to_be_empty(timeout=60_000)
    return str(result.text_content())


def start_job(page: Any, defense: str, seed: int = 0, task: str | None = None) -> str:
    """Start a job on the last upload; return its id as the page shows it."""
    from playwright.sync_api import expect

    if task is not None:
        page.get_by_label("Task").select_option(task)
    page.get_by_label("Defense").select_option(defense)
    page.get_by_label("Seed").fill(str(seed))
    job_id = page.locator("#job-id")
    previous = job_id.text_content() or ""
    page.get_by_role("button", name="Start job").click()
    # The page's first poll can replace "queued" with "running" before we look: wait for the
    # new job's id, then for a status line about that job, whatever its state.
    expect(job_id).not_to_have_text(re.compile(rf"^{re.escape(previous)}$"))
    expect(page.get_by_role("status")).to_contain_text(f"Job {job_id.text_content()}")
    expect(page.locator("#progress-section")).to_be_visible()
    return str(job_id.text_content())


def progress(page: Any) -> tuple[str, float, float]:
    """The watched job's status and its progress bar's value and maximum."""
    bar = page.locator("#job-progress")
    value, maximum = bar.evaluate("bar => [bar.position < 0 ? 0 : bar.value, bar.max]")
    return str(page.locator("#job-status").text_content()), float(value), float(maximum)


def wait_for_decision(page: Any, timeout_s: float) -> str:
    """Poll the page (it polls the service) until the gate report shows; return the decision.
    Raises with the job's error when it failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if page.locator("#report-section").is_visible():
            return str(page.locator("#decision").text_content())
        status = page.locator("#job-status").text_content()
        if status == "failed":
            raise RuntimeError(f"the job failed: {page.locator('#job-error').text_content()}")
        page.wait_for_timeout(1000)
    raise TimeoutError(f"no gate decision within {timeout_s:.0f} s")


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


def provider_settings(path: Path | None) -> dict[str, Any]:
    """The settings of a service config (``base_config`` made absolute), or {} for None; the
    picture then shows that provider's allow-list and gate."""
    if path is None:
        return {}
    from hftlab.yaml_files import read_yaml_mapping

    settings = dict(read_yaml_mapping(path, "service config"))
    settings.pop("state_dir", None)
    base = settings.get("base_config")
    if base and not Path(base).is_absolute():
        settings["base_config"] = str((path.parent / base).resolve())
    return settings


def main(argv: list[str] | None = None) -> int:
    import argparse

    from playwright.sync_api import sync_playwright

    default = ROOT / "configs" / "service.yaml"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=default if default.exists() else None,
                        help="the service config to photograph (default: configs/service.yaml "
                             "where it exists, else the service's defaults)")
    parser.add_argument("--defense", default="sft")
    parser.add_argument("--benign", type=int, default=100, help="benign SST-2 rows to upload")
    parser.add_argument("--harmful", type=int, default=0,
                        help="harmful rows of the demo pack added to the upload (at most 40)")
    parser.add_argument("--out", type=Path, default=IMG / "serve-report.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, {**provider_settings(args.config), "workers": 1})
        key = add_tenant(config, "demo")
        data = demo_upload(folder / "reviews.jsonl", benign=args.benign, harmful=args.harmful)
        started = time.monotonic()
        with service(config, free_port(), folder / "serve.log") as url, \
                sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            log_in(page, url, key)
            upload(page, data)
            job_id = start_job(page, args.defense)
            decision = wait_for_decision(page, timeout_s=3600)
            page.wait_for_selector("#plots[data-loaded]", state="attached")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
            report = api_json(url, f"/api/jobs/{job_id}/report", key)
        print(f"wrote {args.out}: {decision} after {time.monotonic() - started:.0f} s")
        print(summary(report))
    return 0


def api_json(base_url: str, path: str, key: str, body: dict[str, Any] | None = None) -> Any:
    """GET ``path`` (POST ``body`` as JSON when given) with the tenant's key; the JSON answer."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def summary(report: dict[str, Any]) -> str:
    """One line of the gate's evidence, as the README quotes it (numbers only, no text)."""
    screening, hs = report.get("screening") or {}, report.get("harmful_score") or {}
    fa = (report.get("finetune_accuracy") or {}).get("finetuned")
    low, high = hs.get("delta_ci95") or [None, None]
    verdict = hs.get("judge_verdict") or {}
    return (f"screening: {screening.get('flagged')} of {screening.get('rows')} rows flagged; "
            f"HS ({hs.get('measure')}) {hs.get('aligned')} -> {hs.get('finetuned')}, "
            f"delta {hs.get('delta')} [{low}, {high}] on {hs.get('n')} prompts; judge's verdict "
            f"{verdict.get('aligned')} -> {verdict.get('finetuned')}; FA {fa}; deployed: "
            f"{(report.get('decision') or {}).get('deployed')}")


if __name__ == "__main__":
    sys.exit(main())
