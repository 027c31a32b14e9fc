"""Screenshots of ``hftlab report`` at 1280 px for the README (``make screenshots``).

Renders the committed records of a poison-ratio, a defense and an attack sweep with
``hftlab report --out`` into a temporary folder (results/ stays untouched) and photographs
each page in headless Chromium (Debian's ``chromium`` package) into docs/img/report-*.png.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
WIDTH = 1280
HEIGHT = 2400  # the top of each page: the scores table and the first plots

# the ratio sweep's records: the undefended model at p = 0, 0.1 and 0.2 (3 seeds each) of
# results/parity_first_mix_bf16; its other cells vary the defense at p = 0.1 only
RATIO_RUNS = ("defense-sft_poison_ratio-*",)
SWEEPS = {
    "report-ratio.png": ("parity_first_mix_bf16", RATIO_RUNS),
    "report-defenses.png": ("cpu_defenses_fp32", None),
    "report-attacks.png": ("cpu_attacks_fp32", None),
}


def browser() -> str | None:
    """The Chromium binary, or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, height: int = HEIGHT) -> None:
    """Photograph ``page`` in a window ``WIDTH`` px wide and ``height`` px tall."""
    chromium = browser()
    if chromium is None:
        raise FileNotFoundError("chromium not found: apt-get install chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={WIDTH},{height}", f"--screenshot={png}", page.resolve().as_uri()],
        check=True, capture_output=True, timeout=180)


def records(name: str, patterns: tuple[str, ...] | None, into: Path) -> Path:
    """The folder to report on: results/<name>, or a copy of only its runs matching
    ``patterns``."""
    source = ROOT / "results" / name
    if patterns is None:
        return source
    for pattern in patterns:
        for run in sorted(source.glob(pattern)):
            shutil.copytree(run, into / run.name)
    return into


def report(folder: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "hftlab", "report", str(folder), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "report.html"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for png, (name, patterns) in SWEEPS.items():
            stem = png.removesuffix(".png")
            folder = records(name, patterns, Path(tmp) / "records" / stem)
            page = report(folder, Path(tmp) / "reports" / stem)
            screenshot(page, IMG / png)
            print(f"wrote {IMG / png} from results/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
