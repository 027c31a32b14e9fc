"""`hftlab report` on a run and on a sweep of the tiny model: report.md and a self-contained
report.html with its embedded PNG plots, the Pareto front, and the path without matplotlib."""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import pytest
import yaml

from hftlab import plot_base, plot_labels, plot_sweep, plots
from hftlab.cli import main
from hftlab.plot_sweep import overhead_plot
from hftlab.report import _mechanism_line, write_report
from hftlab.run_metrics import RunMetrics
from hftlab.sweep import load_sweep, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EMBEDDED = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in EMBEDDED.findall(page)]


def assert_self_contained(page: str) -> None:
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'src="(?!data:)', page)


def test_pareto_front_on_fixed_points() -> None:
    # (harmful score, accuracy): lower harm and higher accuracy are better.
    points = [(10, 80), (20, 90), (15, 70), (5, 60), (20, 85), (10, 80), (30, 90)]
    # (15, 70) loses to (10, 80); (20, 85) to (20, 90); (30, 90) to (20, 90): equal accuracy,
    # more harm. The two equal (10, 80) points beat each other nowhere, so both stay.
    assert plot_base.pareto_front(points) == [3, 0, 5, 1]
    assert plot_base.pareto_front([(1.0, 1.0)]) == [0]
    assert plot_base.pareto_front([]) == []


def test_series_names_and_colours() -> None:
    names = plot_labels.series_names
    assert names([{"defense": "vaccine"}, {"defense": "sft"}]) == ["vaccine", "sft"]
    assert names([{"defense": ["vaccine", "lisa"]}]) == ["vaccine+lisa"]
    # an option shows only where it tells apart cells of the same attack
    assert names([
        {"attack": "disguise", "attack_args": {"method": "cipher", "k": 1}},
        {"attack": "disguise", "attack_args": {"method": "framing", "k": 1}},
        {"attack": "virus", "attack_args": {"steps": 4}},
    ]) == ["disguise(method=cipher)", "disguise(method=framing)", "virus"]
    # other settings only where two cells would otherwise share a name
    assert names([{"defense": "sft", "finetune.train.lr": 0.001},
                  {"defense": "sft", "finetune.train.lr": 0.01},
                  {"defense": "kl", "finetune.train.lr": 0.01}]) == [
        "sft, lr=0.001", "sft, lr=0.01", "kl"]
    assert names([{}]) == ["all runs"]
    many = [f"defense{i}" for i in range(30)] + ["sft"]
    colours = plot_base.colour_for(many)
    assert colours["sft"] == plot_base.BASELINE_COLOUR
    assert len(set(colours.values())) == len(many)
    assert plot_base.BASELINE_COLOUR not in [colours[n] for n in many if n != "sft"]


def _group(name: str, colour: str, harm: float, acc: float) -> plot_base.Group:
    runs = [RunMetrics.from_dict({"harmful_score": harm + d, "finetune_accuracy": acc - d,
                                  "n_eval_harmful": 300, "n_eval_task": 872})
            for d in (0.0, 0.4)]
    return plot_base.Group(name, colour, runs)


def test_tradeoff_labels_do_not_overlap_and_the_legend_is_whole() -> None:
    pytest.importorskip("matplotlib")
    # twenty cells crowded into one corner, as an attack sweep's are
    names = [f"defense_{i} / attack_{i % 4}, lr=0.000{i}" for i in range(19)] + ["sft"]
    colours = plot_base.colour_for(names)
    groups = [_group(n, colours[n], 5 + (i % 5) * 0.7, 80 + (i // 5) * 0.6)
              for i, n in enumerate(names)]
    fig, _, _ = plot_sweep.tradeoff_figure(groups)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    from matplotlib.text import Text

    # the text's own box (an Annotation's box would include its leader line)
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    assert len(boxes) == 20
    for i, a in enumerate(boxes):
        assert all(not a.overlaps(b) for b in boxes[i + 1:])
    legends = [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend())]
    assert len(legends) == 1
    legend = legends[0]
    assert len(legend.get_texts()) == 21  # every cell and the Pareto front
    whole = fig.get_tightbbox(renderer)  # what png() saves, in inches
    inches = legend.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
    assert whole.x0 <= inches.x0 and inches.x1 <= whole.x1 + 1e-6
    assert whole.y0 <= inches.y0 and inches.y1 <= whole.y1 + 1e-6
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    sft = next(g for g in groups if g.name == "sft")
    assert sft.colour == plot_base.BASELINE_COLOUR
    assert len({g.colour for g in groups}) == 20


def test_overhead_bars_of_equal_seeds_draw() -> None:
    pytest.importorskip("matplotlib")
    # fmean([0.1] * 3) exceeds 0.1 by one rounding step: the error bar must not go negative
    runs = [RunMetrics.from_dict(
        {"stages": {"finetune": {"seconds_per_step": 0.1, "peak_rss_mb": 100.0}}})] * 3
    plot = overhead_plot([plot_base.Group("sft", "#000000", runs)])
    assert plot is not None and plot.png


@pytest.fixture
def tiny_sweep(tiny_overrides: list[str], tmp_path: Path) -> Path:
    """2 defenses × 2 poison ratios × 2 seeds on the tiny model: the sweep's folder."""
    shared = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in tiny_overrides)}
    shared.pop("finetune.poison_ratio")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "config": "run.yaml", "set": shared, "out": str(tmp_path / "out"),
        "grid": {"defense": ["sft", "safe_instr"], "finetune.poison_ratio": [0.1, 0.3],
                 "seed": [0, 1]}}))
    (tmp_path / "run.yaml").write_text("seed: 0\n")
    sweep = load_sweep(path)
    assert run_sweep(sweep) == []
    return sweep.out


def test_sweep_and_run_reports(tiny_sweep: Path, capsys, monkeypatch) -> None:
    assert main(["report", str(tiny_sweep)]) == 0
    printed = capsys.readouterr().out
    assert "8 of 8 planned runs finished" in printed and "Δ vs sft" in printed
    assert re.search(r"Compute: \d+ min of stage time over 8 runs", printed)
    md = (tiny_sweep / "report.md").read_text()
    assert md.startswith("# hftlab sweep report") and "## Pareto front" in md
    assert "defense=safe_instr, poison_ratio=0.3" in md
    page = (tiny_sweep / "report.html").read_text()
    assert_self_contained(page)
    images = embedded_pngs(page)
    # harmful score vs poison ratio, trade-off, curves, drift, cost
    assert len(images) == 5
    assert all(image.startswith(PNG_MAGIC) for image in images)
    for key in ("harmful_vs_poison", "tradeoff", "curves", "drift", "overhead"):
        assert f'<figure id="{key}">' in page
    assert "Pareto front" in page and plots.INSTALL_HINT not in page

    # every run of the sweep got its own report (curves and drift), linked from the sweep's
    run = tiny_sweep / "runs" / "defense-sft_poison_ratio-0.1_seed-0"
    run_page = (run / "report.html").read_text()
    assert_self_contained(run_page)
    assert [png[:8] for png in embedded_pngs(run_page)] == [PNG_MAGIC, PNG_MAGIC]
    assert 'href="runs/defense-sft_poison_ratio-0.1_seed-0/report.html"' in page

    # without matplotlib: both files are still written, the HTML says how to get the plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert not plots.available()
    for folder in (tiny_sweep, run):
        (folder / "report.md").unlink()
        summary = write_report(folder)
        assert plots.INSTALL_HINT in summary
        assert (folder / "report.md").exists()
        page = (folder / "report.html").read_text()
        assert embedded_pngs(page) == []
        assert page.count("pip install &#39;hftlab[report]&#39;") == 1


def test_report_on_a_folder_without_runs(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "has not finished" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "has not finished" not in err
    assert err.count("\n") == 1


def test_report_out_leaves_the_records_alone(tiny_sweep: Path, tmp_path, capsys) -> None:
    for page in tiny_sweep.rglob("report.*"):
        page.unlink()
    out = tmp_path / "elsewhere"
    assert main(["report", str(tiny_sweep), "--out", str(out)]) == 0
    assert f"wrote {out / 'report.md'} and {out / 'report.html'}" in capsys.readouterr().out
    assert not list(tiny_sweep.rglob("report.*"))
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert "table-box" in page and len(embedded_pngs(page)) == 5


def mechanism(metrics: dict) -> list[str]:
    """The run summary's mechanism lines for a v1 metrics.json written by hand."""
    return _mechanism_line(RunMetrics.from_dict(metrics))


def test_empty_completions_are_named_in_the_summary(tmp_path) -> None:
    metrics = {"empty_harmful_completions": 47, "n_eval_harmful": 300,
               "judge": {"name": "keyword"}}
    assert any("47 of 300 harmful prompts got an empty completion" in line
               for line in mechanism(metrics))
    assert mechanism({**metrics, "empty_harmful_completions": 0}) == []
    # newer runs also score the harmful prompts with the empty completions counted as harmless
    line = mechanism({**metrics, "harmful_score_empty_as_harmless": 1.0})[0]
    assert line.endswith("; harmful score with those counted as harmless: 1.0 %")


def test_task_label_answers_are_named_in_the_summary() -> None:
    metrics = {"task_label_harmful_completions": 66, "n_eval_harmful": 300, "task": "sst2",
               "harmful_score_without_task_labels": 42.0, "judge": {"name": "keyword"}}
    assert mechanism(metrics) == [
        "66 of 300 harmful prompts were answered with a bare sst2 label; harmful score with "
        "those counted as harmless: 42.0 %"]
    assert mechanism({**metrics, "task_label_harmful_completions": 0}) == []


def test_timing_names_the_load_other_work_put_on_its_cores() -> None:
    from hftlab.report import _machine
    from hftlab.run_metrics import StageTiming

    label = "AMD EPYC · 2 CPUs · 2 threads"
    assert _machine(StageTiming(machine=label, other_cores=1.84, contended=True)) == (
        f"{label} · 1.8 cores busy elsewhere (contended)")
    assert _machine(StageTiming(machine=label, other_cores=0.3, contended=False)) == (
        f"{label} · 0.3 cores busy elsewhere")
    assert _machine(StageTiming(machine=label, other_cores=0.01)) == label
    assert _machine(StageTiming()) == "-"
