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
    legend,
    n_text,
    new_figure,
    pareto_front,
    png,
    short,
)
from hftlab.run_metrics import RunMetrics, StageTiming
from hftlab.stats import summarize, wilson


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
            low, high = _interval(group, values)
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
    ax.legend(title="defense", fontsize=8)
    fig.suptitle(title, fontsize=11)
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


def _interval(group: Group, values: list[float]) -> tuple[float, float]:
    if len(values) >= 2:
        ci = summarize(values).ci
        assert ci is not None
        return ci
    final = group.runs[0].final
    if final.harmful_score_ci95:
        low, high = final.harmful_score_ci95
        return float(low), float(high)
    n = int(final.n_eval_harmful or 0)
    return wilson(round(values[0] / 100 * n), n) if n else (values[0], values[0])


def tradeoff_plot(groups: list[Group]) -> Plot | None:
    """Harmful score against fine-tune accuracy: one marker per cell, its runs as dots,
    and the Pareto front."""
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
                   label=group.name)
        # cells on (nearly) the same spot share one label instead of overprinting
        spot = (round(harm * 2) / 2, round(acc * 2) / 2)
        labels.setdefault(spot, []).append(f"{short(group.label, 34)} (n={len(runs)})")
    middle = (min(h for h, _ in means) + max(h for h, _ in means)) / 2
    for (harm, acc), texts in labels.items():
        right = harm > middle  # labels in the right half go left, so none leaves the axes
        ax.annotate("\n".join(texts), (harm, acc), textcoords="offset points",
                    xytext=(-9 if right else 9, 6), ha="right" if right else "left",
                    va="bottom", fontsize=8)
    if front:
        xs = [means[i][0] for i in front]
        ys = [means[i][1] for i in front]
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, zorder=2,
                label="Pareto front")
        ax.scatter(xs, ys, s=190, facecolors="none", edgecolors="black", linewidths=1.3,
                   zorder=4)
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
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    front_names = ", ".join(groups[i].label for i in front)
    caption = (
        "Each large marker is a cell's mean over its seeds; the small faint dots are its single "
        "runs. Up and to the left is better: less harmful, more accurate. Ringed markers "
        f"joined by the dashed line are the Pareto front ({front_names}): no other cell is both "
        "less harmful and at least as accurate."
    )
    return Plot("tradeoff", title, caption, png(fig))


Value = Callable[[RunMetrics], "float | None"]
Panel = tuple[str, str, list[tuple[str, Value]]]


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
    defense, pooled over poison ratios and seeds."""
    names = list(dict.fromkeys(g.name for g in groups))
    pooled = {name: [m for g in groups if g.name == name for m in g.runs] for name in names}
    colours = {g.name: g.colour for g in groups}
    every = [m for runs in pooled.values() for m in runs]
    panels: list[Panel] = [
        ("time per optimizer step", "seconds per step", [
            ("alignment", _stage("align", lambda t: t.seconds_per_step)),
            ("fine-tuning", _stage("finetune", lambda t: t.seconds_per_step))]),
        ("peak host memory (RSS)", "GB", [
            ("after alignment", _gb(_stage("align", lambda t: t.peak_rss_mb))),
            ("after fine-tuning", _gb(_stage("finetune", lambda t: t.peak_rss_mb)))]),
    ]
    if any(_stage("finetune", lambda t: t.peak_gpu_mb)(m) is not None
           for m in every):  # runs on GPUs: the stage's own peak
        panels[1] = ("peak accelerator memory", "GB", [
            ("alignment", _gb(_stage("align", lambda t: t.peak_gpu_mb))),
            ("fine-tuning", _gb(_stage("finetune", lambda t: t.peak_gpu_mb)))])
    repair_seconds = _stage("post_finetune", lambda t: t.seconds)
    if max((repair_seconds(m) or 0.0 for m in every), default=0.0) >= 0.05:
        panels.append(("post-fine-tuning repair", "seconds", [("repair", repair_seconds)]))
    if not any(f(m) is not None for _, _, bars in panels for _, f in bars for m in every):
        return None
    fig = new_figure(4.3 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, unit, bars) in zip(axes, panels):
        width = 0.8 / len(names)
        for index, name in enumerate(names):
            for position, (_, value_of) in enumerate(bars):
                values = [v for v in (value_of(m) for m in pooled[name]) if v is not None]
                if not values:
                    continue
                mean = statistics.fmean(values)
                x = position + (index - (len(names) - 1) / 2) * width
                ax.bar(x, mean, width * 0.92, color=colours[name],
                       yerr=[[max(0.0, mean - min(values))], [max(0.0, max(values) - mean)]]
                       if len(values) > 1  # clamped: fmean may round past equal values
                       else None, capsize=2, label=name if position == 0 else None)
                ax.annotate(f"{mean:.3g}", (x, max(values)), textcoords="offset points",
                            xytext=(0, 2), ha="center", fontsize=7)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars])
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, axis="y")
    runs_n = [len(runs) for runs in pooled.values()]
    device = sorted({str(m.device) for m in every})
    title = f"Cost per defense ({n_text(runs_n, 'run')} each, device {', '.join(device)})"
    fig.suptitle(title, fontsize=11)
    legend(fig, list(axes))
    caption = (
        "Bars: mean over each defense's runs (all poison ratios and seeds); whiskers: min–max. "
        "Alignment time comes from the run that trained the aligned model (runs that reuse a "
        "cached one report its timing). Peak memory is the whole process's resident host "
        "memory up to the end of that stage, so it includes the stages before it (and, with "
        "`hftlab sweep --workers`, the worker's earlier runs); GPU memory is not recorded."
    )
    return Plot("overhead", title, caption, png(fig))
