"""`make screenshots`: a report photographed in headless Chromium at 1280 px (skipped where
Debian's chromium package is not installed)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from hftlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs" / "screenshots.py")
assert spec and spec.loader
screenshots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screenshots)


@pytest.mark.skipif(screenshots.browser() is None, reason="chromium is not installed")
def test_report_screenshot_is_1280_wide_and_not_blank(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    records = tmp_path / "records"
    study = ROOT / "results" / "parity_first_mix_bf16"
    for run in sorted(study.glob("defense-sft_poison_ratio-0.[01]_*")):
        shutil.copytree(run, records / run.name)
    assert main(["report", str(records), "--out", str(tmp_path / "out")]) == 0
    png = tmp_path / "page.png"
    screenshots.screenshot(tmp_path / "out" / "report.html", png, height=900)
    with image.open(png) as picture:
        assert picture.size == (1280, 900)
        colours = picture.convert("L").getextrema()
    assert colours[0] < 100 and colours[1] > 200  # text on a white page, not a blank one
