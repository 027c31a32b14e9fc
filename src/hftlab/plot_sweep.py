"""The sweep-only plots of ``hftlab report``: harmful score against the poison ratio, the
harmful score / accuracy trade-off with its Pareto front, and the cost of each defense."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from hftlab.plot_base import (
    Group,
    Plot,
    facets,
    interval,
    legend,
    n_text,
    new_figure,
    pareto_front,
    png,
    short,
)
from hftlab.plot_repel import place_labels
from hftlab.run_metrics import RunMetrics, StageTiming


def harmful_vs_poison_plot(groups: list[Group]) -> Plot | None:
    """Harmful score against the poison ratio, one line per defense, 95% intervals."""
    if len(facets(groups)) < 2 or None in facets(groups):
        return None
    names = list(dict.fromkeys(g.name for g in groups))
    width = max((b - a for a, b in _pairs(sorted({g.facet for g in groups}))), default=0.1)
    fig = new_figure(8.5, 5.0)
    ax = fig.subplots()
    one_seed = False
    for index, name in enumerate(names):
        line = sorted((g for g in groups if g.name == name and g.harmful_scores),
                      key=lambda g: g.facet)
        shift = (index - (len(names) - 1) / 2) * width * 0.04  # dodge overlapping bars
        xs, ys, below, above = [], [], [], []
        for group in line:
            values = group.harmful_scores
            mean = statistics.fmean(values)
            low, high = interval(group, values)
            one_seed = one_seed or len(values) < 2
            xs.append(group.facet + shift)
            ys.append(mean)
            below.append(max(0.0, mean - low))
            above.append(max(0.0, high - mean))
        ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3,
                    color=line[0].colour if line else None, label=name)
    seeds = [len(g.harmful_scores) for g in groups if g.harmful_scores]
    prompts = groups[0].runs[0].final.n_eval_harmful
    title = (f"Harmful score vs poison ratio ({n_text(seeds)} per point, "
             f"{prompts} harmful prompts per run)")
    ax.set_xlabel("poison ratio p (harmful rows / all rows of the user's data)")
    ax.set_ylabel(f"harmful score (% of {prompts} harmful prompts)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    legend(fig, [ax], title="series", always=True)
    caption = (
        "Each point is the mean harmful score over seeds at one poison ratio; lower is safer. "
        "Error bars: 95% t interval over seeds"
        + ("; for one-seed points, the Wilson interval over the harmful prompts" if one_seed
           else "")
        + ". A defense works where its line stays below sft's as p grows (points are nudged "
        "sideways so the bars do not overlap)."
    )
    return Plot("harmful_vs_poison", title, caption, png(fig))


def _pairs(values: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(values, values[1:]))


def tradeoff_figure(groups: list[Group]) -> tuple[Any, str, str] | None:
    """The trade-off figure, its title and its caption (see :func:`tradeoff_plot`)."""
    groups = [g for g in groups if g.harmful_scores and g.accuracies]
    if not groups:
        return None
    means = [(statistics.fmean(g.harmful_scores), statistics.fmean(g.accuracies))
             for g in groups]
    front = pareto_front(means)
    fig = new_figure(8.5, 5.6)
    ax = fig.subplots()
    labels: dict[tuple[float, float], list[str]] = {}
    for group, (harm, acc) in zip(groups, means):
        runs = [m.final for m in group.runs if m.final.harmful_score is not None
                and m.final.finetune_accuracy is not None]
        ax.scatter([f.harmful_score for f in runs], [f.finetune_accuracy for f in runs],
                   s=14, color=group.colour, alpha=0.35, linewidths=0)
        ax.scatter([harm], [acc], s=70, color=group.colour, edgecolors="white", zorder=3,
                   label=group.legend)
        # cells on (nearly) the same spot share one label instead of overprinting
        spot = (round(harm * 2) / 2, round(acc * 2) / 2)
        labels.setdefault(spot, []).append(short(group.label, 34))
    if front:
        xs = [means[i][0] for i in front]
        ys = [means[i][1] for i in front]
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, zorder=2,
                label="Pareto front")
        ax.scatter(xs, ys, s=190, facecolors="none", edgecolors="black", linewidths=1.3,
                   zorder=4)
    ax.margins(x=0.12, y=0.12)  # room for the labels around the outermost points
    # both axes are percentages: never show impossible values around the data
    ax.set_xlim(max(ax.get_xlim()[0], -2.0), min(ax.get_xlim()[1], 102.0))
    ax.set_ylim(max(ax.get_ylim()[0], -2.0), min(ax.get_ylim()[1], 102.0))
    seeds = [len(g.harmful_scores) for g in groups]
    final = groups[0].runs[0].final
    title = (f"Safety / utility trade-off per cell ({n_text(seeds)} per cell; "
             f"{final.n_eval_harmful} harmful, {final.n_eval_task} task prompts)")
    ax.set_xlabel(f"harmful score (% of {final.n_eval_harmful} harmful prompts; "
                  "lower is safer)")
    ax.set_ylabel(f"fine-tune accuracy (% of {final.n_eval_task} task prompts)")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    legend(fig, [ax], always=True)
    place_labels(ax, list(labels), ["\n".join(texts) for texts in labels.values()])
    front_names = ", ".join(groups[i].label for i in front)
    caption = (
        "Each large marker is a cell's mean over its seeds; the small faint dots are its single "
        "runs. Up and to the left is better: less harmful, more accurate. Ringed markers "
        f"joined by the dashed line are the Pareto front ({front_names}): no other cell is both "
        "less harmful and at least as accurate. A thin line joins a label that had to move "
        "away from its marker."
    )
    return fig, title, caption


def tradeoff_plot(groups: list[Group]) -> Plot | None:
    """Harmful score against fine-tune accuracy: one marker per cell, its runs as dots,
    and the Pareto front."""
    drawn = tradeoff_figure(groups)
    if drawn is None:
        return None
    fig, title, caption = drawn
    return Plot("tradeoff", title, caption, png(fig))


Value = Callable[[RunMetrics], "float | None"]


def _stage(stage: str, get: Callable[[StageTiming], float | None]) -> Value:
    """A stage's timing value of a run (None when the stage or the value is absent)."""
    def value(metrics: RunMetrics) -> float | None:
        timing = metrics.stages.get(stage)
        found = None if timing is None else get(timing)
        return None if found is None else float(found)
    return value


def _gb(value: Value) -> Value:
    def gb(metrics: RunMetrics) -> float | None:
        mb = value(metrics)
        return None if mb is None else mb / 1024
    return gb


def overhead_plot(groups: list[Group]) -> Plot | None:
    """Seconds per optimizer step (alignment, fine-tuning), peak memory and repair time per
    series, pooled over poison ratios and seeds: one row of bars per series."""
    names = list(dict.fromkeys(g.name for g in groups))
    pooled = {name: [m for g in groups if g.name == name for m in g.runs] for name in names}
    colours = {g.name: g.colour for g in groups}
    every = [m for runs in pooled.values() for m in runs]
    memory = "peak_gpu_mb" if any(_stage("finetune", lambda t: t.peak_gpu_mb)(m) is not None
                                  for m in every) else "peak_rss_mb"
    what = "accelerator memory" if memory == "peak_gpu_mb" else "host memory (RSS)"
    panels: list[tuple[str, Value]] = [
        ("alignment\nseconds per step", _stage("align", lambda t: t.seconds_per_step)),
        ("fine-tuning\nseconds per step", _stage("finetune", lambda t: t.seconds_per_step)),
        (f"peak {what}\nafter alignment, GB",
         _gb(_stage("align", lambda t: getattr(t, memory)))),
        (f"peak {what}\nafter fine-tuning, GB",
         _gb(_stage("finetune", lambda t: getattr(t, memory)))),
    ]
    repair_seconds = _stage("post_finetune", lambda t: t.seconds)
    if max((repair_seconds(m) or 0.0 for m in every), default=0.0) >= 0.05:
        panels.append(("post-fine-tuning\nrepair, seconds", repair_seconds))
    panels = [p for p in panels if any(p[1](m) is not None for m in every)]
    if not panels:
        return None
    fig = new_figure(2.2 * len(panels) + 1.6, 1.1 + 0.26 * len(names))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    rows = range(len(names))
    for ax, (panel, value_of) in zip(axes, panels):
        top = 0.0
        for row, name in zip(rows, names):
            values = [v for v in (value_of(m) for m in pooled[name]) if v is not None]
            if not values:
                continue
            mean = statistics.fmean(values)
            top = max(top, max(values))
            ax.barh(row, mean, 0.7, color=colours[name],
                    xerr=[[max(0.0, mean - min(values))], [max(0.0, max(values) - mean)]]
                    if len(values) > 1  # clamped: fmean may round past equal values
                    else None, capsize=2)
            ax.annotate(f"{mean:.3g}", (max(values), row), textcoords="offset points",
                        xytext=(3, 0), va="center", fontsize=7)
        ax.set_xlim(0, top * 1.35 or 1.0)  # room for the value beside the longest bar
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(list(rows), names, fontsize=8)
    axes[0].invert_yaxis()
    runs_n = [len(runs) for runs in pooled.values()]
    device = sorted({str(m.device) for m in every})
    title = f"Cost per series ({n_text(runs_n, 'run')} each, device {', '.join(device)})"
    fig.suptitle(title, fontsize=11)
    caption = (
        "Bars: mean over each series' runs (all poison ratios and seeds); whiskers: min–max. "
        "Alignment time comes from the run that trained the aligned model (runs that reuse a "
        "cached one report its timing). Peak host memory is the whole process's resident "
        "memory up to the end of that stage, so it includes the stages before it (and, with "
        "`hftlab sweep --workers`, the worker's earlier runs)."
    )
    return Plot("overhead", title, caption, png(fig))
