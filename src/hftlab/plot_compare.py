"""Bars that compare the cells of a sweep side by side: the harmful score and the fine-tune
accuracy per defense (a defense sweep) or per attack, one bar per defense (an attack sweep),
with 95% intervals. Horizontal bars keep every name readable however many cells there are."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from hftlab.plot_base import (
    BASELINE,
    BASELINE_COLOUR,
    Group,
    Plot,
    colour_for,
    interval,
    legend,
    n_text,
    new_figure,
    png,
)
from hftlab.plot_labels import only, without

DEFENSE_KEYS = ("defense", "defense_args")
PANELS = (("harmful score %\n(lower is safer)", True),
          ("fine-tune accuracy %\n(higher is better)", False))


def _bar(ax: Any, y: float, height: float, group: Group, harmful: bool, colour: str,
         label: str | None = None) -> None:
    values = group.harmful_scores if harmful else group.accuracies
    if not values:
        return
    mean = statistics.fmean(values)
    low, high = interval(group, values, harmful)
    ax.barh(y, mean, height, color=colour, label=label,
            xerr=[[max(0.0, mean - low)], [max(0.0, high - mean)]], capsize=2,
            error_kw={"linewidth": 0.8})
    ax.annotate(f"{mean:.1f}", (max(high, mean), y), textcoords="offset points",
                xytext=(3, 0), va="center", fontsize=7)


def _axes(rows: Sequence[str], height_per_row: float) -> tuple[Any, list[Any]]:
    fig = new_figure(9.5, 1.2 + height_per_row * len(rows))
    axes = list(fig.subplots(1, len(PANELS), sharey=True))
    for ax, (title, _) in zip(axes, PANELS):
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 112)  # percentages, with room for the value beside a full bar
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(rows)), rows, fontsize=8)
    axes[0].invert_yaxis()
    return fig, axes


def defense_bars_plot(groups: list[Group]) -> Plot | None:
    """One row per cell, sorted by harmful score; sft's mean as a grey line across."""
    groups = sorted((g for g in groups if g.harmful_scores), key=lambda g: (
        statistics.fmean(g.harmful_scores), g.name))
    if len(groups) < 2:
        return None
    fig, axes = _axes([g.name for g in groups], 0.3)
    for ax, (_, harmful) in zip(axes, PANELS):
        for row, group in enumerate(groups):
            _bar(ax, row, 0.7, group, harmful, group.colour)
        base = [g for g in groups if g.name == BASELINE]
        values = base and (base[0].harmful_scores if harmful else base[0].accuracies)
        if values:
            ax.axvline(statistics.fmean(values), color=BASELINE_COLOUR,
                       linestyle="--", linewidth=1)
    seeds = [len(g.harmful_scores) for g in groups]
    title = f"Harmful score and accuracy per cell ({n_text(seeds)} each)"
    fig.suptitle(title, fontsize=11)
    caption = (
        "Bars: the mean over seeds; whiskers: the 95% t interval over seeds (for one seed, the "
        "Wilson interval over the prompts). Sorted from the least to the most harmful; the "
        "dashed grey line is sft, the no-defense baseline: a defense helps where its harmful "
        "bar ends left of it at an accuracy close to sft's."
    )
    return Plot("defense_bars", title, caption, png(fig))


def attack_bars_plot(groups: list[Group]) -> Plot | None:
    """One row per attack (with its options), one bar per defense within the row."""
    groups = [g for g in groups if g.harmful_scores]
    if not groups:
        return None
    attacks = without(groups, DEFENSE_KEYS)
    defenses = only(groups, DEFENSE_KEYS)
    rows = list(dict.fromkeys(attacks))
    names = sorted(set(defenses), key=lambda n: (n != BASELINE, n))
    colours = colour_for(names)
    fig, axes = _axes(rows, 0.16 + 0.22 * len(names))
    height = 0.8 / len(names)
    for ax, (_, harmful) in zip(axes, PANELS):
        for group, attack, defense in zip(groups, attacks, defenses):
            index = names.index(defense)
            y = rows.index(attack) + (index - (len(names) - 1) / 2) * height
            first = attack == next(a for a, d in zip(attacks, defenses) if d == defense)
            _bar(ax, y, height * 0.92, group, harmful, colours[defense],
                 defense if first and harmful else None)
    legend(fig, axes, title="defense", always=True)
    seeds = [len(g.harmful_scores) for g in groups]
    title = f"Harmful score and accuracy per attack ({n_text(seeds)} each)"
    fig.suptitle(title, fontsize=11)
    caption = (
        "One row per attack (with the settings that set it apart), one bar per defense; bars: "
        "the mean over seeds, whiskers: the 95% t interval over seeds (for one seed, the Wilson "
        "interval over the prompts). sft, the no-defense baseline, is grey: an attack breaks a "
        "defense where the defense's harmful bar reaches sft's."
    )
    return Plot("attack_bars", title, caption, png(fig))
