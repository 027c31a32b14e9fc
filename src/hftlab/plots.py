"""The pictures of ``hftlab report``: the fine-tuning curves (the survey's forgetting vs
revitalisation) and the hidden-state drift per layer, for one run or per sweep cell, and every
sweep plot at once (:func:`sweep_plots`; the sweep-only plots are in :mod:`hftlab.plot_sweep`,
what all plots share in :mod:`hftlab.plot_base`). Each function returns :class:`Plot` objects:
a title, a caption saying how to read the picture, and the PNG bytes."""

from __future__ import annotations

import math
from collections.abc import Callable

from hftlab.plot_base import (
    BASELINE_COLOUR,
    INSTALL_HINT,
    Group,
    Plot,
    available,
    facet_title,
    facets,
    legend,
    legend_label,
    n_text,
    new_figure,
    png,
    spread,
)
from hftlab.plot_compare import attack_bars_plot, defense_bars_plot
from hftlab.plot_labels import what_varies
from hftlab.plot_sweep import harmful_vs_poison_plot, overhead_plot, tradeoff_plot
from hftlab.run_metrics import CurvePoint, RunMetrics

__all__ = ["INSTALL_HINT", "Plot", "available", "curves_plot", "drift_plot", "run_plots",
           "sweep_plots"]

Loss = Callable[[CurvePoint], "float | None"]
LOSSES: tuple[tuple[Loss, str, str], ...] = (
    (lambda c: c.alignment_loss, "alignment loss", "held-out refusals; rising = forgetting"),
    (lambda c: c.harmful_loss, "harmful loss",
     "held-out harmful answers; falling = revitalisation"),
    (lambda c: c.task_loss, "task loss", "the user's benign rows; falling = the task is learnt"),
)
LOSS_UNIT = "cross-entropy (nats/token)"


def _curve(runs: list[RunMetrics], loss: Loss) -> tuple[list[int], list[list[float]]]:
    """Steps every run recorded ``loss`` at, and each run's values at those steps."""
    per_run = [{c.step: loss(c) for c in m.curves if loss(c) is not None} for m in runs]
    per_run = [r for r in per_run if r]
    if not per_run:
        return [], []
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    return steps, [[r[s] for s in steps] for r in per_run]  # type: ignore[misc]


def curves_plot(groups: list[Group], title: str, caption: str) -> Plot | None:
    losses = [loss for loss in LOSSES if any(_curve(g.runs, loss[0])[0] for g in groups)]
    if not losses:
        return None
    panels = facets(groups)
    fig = new_figure(4.1 * len(losses), 0.6 + 3.0 * len(panels))
    axes = fig.subplots(len(panels), len(losses), squeeze=False)
    for row, facet in enumerate(panels):
        for col, (loss, name, meaning) in enumerate(losses):
            ax = axes[row][col]
            for group in (g for g in groups if g.facet == facet):
                steps, rows = _curve(group.runs, loss)
                if not steps:
                    continue
                mean, low, high = spread(rows)
                ax.plot(steps, mean, marker="o", markersize=3, color=group.colour,
                        label=legend_label(group, groups))
                if len(rows) > 1:
                    ax.fill_between(steps, low, high, color=group.colour, alpha=0.15,
                                    linewidth=0)
            head = f"{name}\n({meaning})" if row == 0 else name
            ax.set_title(f"{head}\n{facet_title(facet)}".strip(), fontsize=9)
            ax.set_xlabel("fine-tuning step (optimizer steps)")
            ax.set_ylabel(LOSS_UNIT)
            ax.ticklabel_format(axis="y", useOffset=False)  # show the losses, not offsets
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    legend(fig, [ax for row in axes for ax in row])
    return Plot("curves", title, caption, png(fig))


def _layers(m: RunMetrics) -> list[float]:
    return m.drift.per_layer if m.drift else []


def drift_plot(groups: list[Group], title: str, caption: str) -> Plot | None:
    groups = [g for g in groups if any(_layers(m) for m in g.runs)]
    if not groups:
        return None
    panels = facets(groups)
    columns = min(len(panels), 3)
    rows_n = math.ceil(len(panels) / columns)
    fig = new_figure(9.0 if columns == 1 else 4.3 * columns, 0.6 + 3.6 * rows_n)
    axes = fig.subplots(rows_n, columns, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, facet in zip(flat, panels):
        for group in (g for g in groups if g.facet == facet):
            layers = [_layers(m) for m in group.runs if _layers(m)]
            depth = min(len(r) for r in layers)
            mean, low, high = spread([r[:depth] for r in layers])
            ax.plot(range(depth), mean, marker="o", markersize=2.5, color=group.colour,
                    label=legend_label(group, groups))
            if len(layers) > 1:
                ax.fill_between(range(depth), low, high, color=group.colour, alpha=0.15,
                                linewidth=0)
        ax.set_title(facet_title(facet), fontsize=9)
        ax.set_xlabel("layer (0 = embedding output)")
        ax.set_ylabel("mean L2 distance per token")
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    legend(fig, flat)
    return Plot("drift", title, caption, png(fig))


def run_plots(metrics: RunMetrics) -> list[Plot]:
    """The fine-tuning curves and the drift per layer of one finished run."""
    group = Group(metrics.defense or "run", BASELINE_COLOUR, [metrics])
    seed = f"seed {metrics.seed}"
    plots = [
        curves_plot(
            [group],
            f"Fine-tuning curves: {group.name}, {seed} (one run)",
            "Losses of the model being fine-tuned, measured every few optimizer steps on fixed "
            "held-out sets. The survey's two failure mechanisms: a rising alignment loss means "
            "the refusals learnt in alignment are forgotten; a falling harmful loss means "
            "harmful answers are revitalised. The task loss shows the fine-tuning itself.",
        ),
        drift_plot(
            [group],
            f"Hidden-state drift per layer: {group.name}, {seed} (one run)",
            "Mean L2 distance between the hidden states of the aligned model and of the "
            "fine-tuned model on held-out harmful prompts (the alignment data's prompts), per "
            "layer. Higher = fine-tuning moved the aligned representation further (the "
            "survey's harmful embedding drift). The last layer is after the model's final "
            "normalisation, hence its smaller scale.",
        ),
    ]
    return [p for p in plots if p is not None]


def sweep_plots(groups: list[Group]) -> list[Plot]:
    """The sweep plots for what the sweep varies and the runs have data for: harmful score
    against the poison ratio where the ratio is swept, bars per defense where only the defense
    is, bars per attack where the attack is; the trade-off, curves, drift and cost always."""
    seeds = [len(g.runs) for g in groups]
    varies = what_varies(groups)
    plots = [
        harmful_vs_poison_plot(groups) if varies.ratio else None,
        defense_bars_plot(groups) if varies.defense and not (varies.ratio or varies.attack)
        else None,
        attack_bars_plot(groups) if varies.attack else None,
        tradeoff_plot(groups),
        curves_plot(
            groups,
            f"Fine-tuning curves per cell (mean over {n_text(seeds)}; shaded: min–max)",
            "Losses of the model being fine-tuned on fixed held-out sets, one line per cell. "
            "Forgetting: the alignment loss rises; revitalisation: the harmful loss falls. A "
            "defense that works keeps its alignment loss flat and its harmful loss high while "
            "the task loss still falls. Panels share no y-axis: read the shape, then the values.",
        ),
        drift_plot(
            groups,
            f"Hidden-state drift per layer (mean over {n_text(seeds)}; shaded: min–max)",
            "Mean L2 distance, per layer, between the aligned and the fine-tuned model's hidden "
            "states on held-out harmful prompts. Lower = the defense kept the aligned "
            "representation in place (the survey's harmful embedding drift; Vaccine targets "
            "it). The last layer is after the model's final normalisation, hence its smaller "
            "scale.",
        ),
        overhead_plot(groups),
    ]
    return [p for p in plots if p is not None]
