"""The pictures of ``hftlab report``: PNG plots of one run (the survey's forgetting vs
revitalisation curves, hidden-state drift per layer) and of a sweep (harmful score vs poison
ratio, the harmful score / accuracy trade-off with its Pareto front, curves and drift per
cell, the cost of each defense).

matplotlib is optional (``pip install 'hftlab[report]'``) and imported only when a plot is
drawn; figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot, so
nothing depends on a display or on pyplot's global state. Each function returns
:class:`Plot` objects: a title, a caption saying how to read the picture, and the PNG bytes.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hftlab.compare import Cell
from hftlab.stats import summarize, wilson

INSTALL_HINT = (
    "Plots need matplotlib, which is not installed: pip install 'hftlab[report]' "
    "(or pip install matplotlib), then rerun `hftlab report`."
)
POISON = "finetune.poison_ratio"
DPI = 110
BASELINE_COLOUR = "#404040"  # sft, the no-defense baseline, is always dark grey
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f"]
LOSSES = (
    ("alignment_loss", "alignment loss", "held-out refusals; rising = forgetting"),
    ("harmful_loss", "harmful loss", "held-out harmful answers; falling = revitalisation"),
    ("task_loss", "task loss", "the user's benign rows; falling = the task is learnt"),
)
LOSS_UNIT = "cross-entropy (nats/token)"


@dataclass
class Plot:
    key: str
    title: str
    caption: str
    png: bytes


@dataclass
class Group:
    """Runs drawn as one line or marker: a sweep cell, or a single run."""

    name: str  # the series: the cell's settings other than the poison ratio
    colour: str
    runs: list[dict[str, Any]]  # their metrics.json
    facet: Any = None  # the poison ratio, when the sweep varies it
    seeds: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name if self.facet is None else f"{self.name}, p={self.facet}"

    @property
    def legend(self) -> str:
        """The series name with its number of runs: what a line or marker averages."""
        return f"{self.name} (n={len(self.runs)})"

    def values(self, key: str) -> list[float]:
        return [float(m[key]) for m in self.runs if m.get(key) is not None]


def available() -> bool:
    """Whether matplotlib can be imported (the plots are skipped without it)."""
    try:
        _figure_class()
    except ImportError:
        return False
    return True


def _figure_class() -> type:
    from matplotlib.figure import Figure

    return Figure


def _new_figure(width: float, height: float) -> Any:
    return _figure_class()(figsize=(width, height), layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ helpers


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (harmful score, accuracy) points that no other point beats (lower
    harmful score and higher accuracy are better; equal points both stay), ordered by harmful
    score."""
    front = []
    for i, (harm, acc) in enumerate(points):
        beaten = any(
            h <= harm and a >= acc and (h < harm or a > acc)
            for j, (h, a) in enumerate(points) if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def value_text(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def series_name(label: dict[str, Any]) -> str:
    """``vaccine`` when only the defense varies, else ``defense=vaccine, lr=0.001``."""
    rest = {k: v for k, v in label.items() if k != POISON}
    if not rest:
        return "all runs"
    if list(rest) == ["defense"]:
        return value_text(rest["defense"])
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={value_text(v)}" for k, v in rest.items())


def groups_from_cells(cells: list[Cell]) -> list[Group]:
    """One :class:`Group` per sweep cell, coloured by its series (its settings other than the
    poison ratio), faceted by the poison ratio when the cells vary it."""
    names = [series_name(c.label) for c in cells]
    colours = colour_for(names)
    return [Group(name, colours[name], [r.metrics for r in cell.runs], cell.label.get(POISON),
                  sorted(r.seed for r in cell.runs))
            for name, cell in zip(names, cells)]


def colour_for(names: list[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    palette = iter(COLOURS * (1 + len(names) // len(COLOURS)))
    for name in names:
        if name not in colours:
            colours[name] = BASELINE_COLOUR if name in ("sft", "defense=sft") else next(palette)
    return colours


def _n_text(counts: Sequence[int], unit: str = "seed") -> str:
    low, high = min(counts), max(counts)
    span = str(low) if low == high else f"{low}–{high}"
    return f"n = {span} {unit}{'' if span == '1' else 's'}"


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _spread(rows: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean, min and max of equally long rows (one per run), position by position."""
    columns = list(zip(*rows))
    return ([statistics.fmean(c) for c in columns], [min(c) for c in columns],
            [max(c) for c in columns])


def _facets(groups: list[Group]) -> list[Any]:
    seen: list[Any] = []
    for group in groups:
        if group.facet not in seen:
            seen.append(group.facet)
    return sorted(seen, key=lambda v: (v is None, v if isinstance(v, (int, float)) else 0))


def _facet_title(facet: Any) -> str:
    return "" if facet is None else f"poison ratio p = {facet}"


def _legend_label(group: Group, groups: list[Group]) -> str:
    """``sft (n=3)``; without n where every facet has its own panel (n may differ there)."""
    return group.legend if len(_facets(groups)) == 1 else group.name


def _legend(fig: Any, axes: list[Any]) -> None:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if len(labels) > 1:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5),
                   frameon=False)


# ------------------------------------------------------------------------------ curves


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[list[float]]]:
    """Steps every run recorded ``key`` at, and each run's values at those steps."""
    per_run = [{c["step"]: c[key] for c in (m.get("curves") or []) if c.get(key) is not None}
               for m in runs]
    per_run = [r for r in per_run if r]
    if not per_run:
        return [], []
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    return steps, [[r[s] for s in steps] for r in per_run]


def curves_plot(groups: list[Group], title: str, caption: str) -> Plot | None:
    losses = [loss for loss in LOSSES if any(_curve(g.runs, loss[0])[0] for g in groups)]
    if not losses:
        return None
    facets = _facets(groups)
    fig = _new_figure(4.1 * len(losses), 0.6 + 3.0 * len(facets))
    axes = fig.subplots(len(facets), len(losses), squeeze=False)
    for row, facet in enumerate(facets):
        for col, (key, name, meaning) in enumerate(losses):
            ax = axes[row][col]
            for group in (g for g in groups if g.facet == facet):
                steps, rows = _curve(group.runs, key)
                if not steps:
                    continue
                mean, low, high = _spread(rows)
                ax.plot(steps, mean, marker="o", markersize=3, color=group.colour,
                        label=_legend_label(group, groups))
                if len(rows) > 1:
                    ax.fill_between(steps, low, high, color=group.colour, alpha=0.15,
                                    linewidth=0)
            head = f"{name}\n({meaning})" if row == 0 else name
            ax.set_title(f"{head}\n{_facet_title(facet)}".strip(), fontsize=9)
            ax.set_xlabel("fine-tuning step (optimizer steps)")
            ax.set_ylabel(LOSS_UNIT)
            ax.ticklabel_format(axis="y", useOffset=False)  # show the losses, not offsets
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    _legend(fig, [ax for row in axes for ax in row])
    return Plot("curves", title, caption, _png(fig))


def drift_plot(groups: list[Group], title: str, caption: str) -> Plot | None:
    groups = [g for g in groups if any((m.get("drift") or {}).get("per_layer") for m in g.runs)]
    if not groups:
        return None
    facets = _facets(groups)
    columns = min(len(facets), 3)
    rows_n = math.ceil(len(facets) / columns)
    fig = _new_figure(9.0 if columns == 1 else 4.3 * columns, 0.6 + 3.6 * rows_n)
    axes = fig.subplots(rows_n, columns, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, facet in zip(flat, facets):
        for group in (g for g in groups if g.facet == facet):
            layers = [m["drift"]["per_layer"] for m in group.runs
                      if (m.get("drift") or {}).get("per_layer")]
            depth = min(len(r) for r in layers)
            mean, low, high = _spread([r[:depth] for r in layers])
            ax.plot(range(depth), mean, marker="o", markersize=2.5, color=group.colour,
                    label=_legend_label(group, groups))
            if len(layers) > 1:
                ax.fill_between(range(depth), low, high, color=group.colour, alpha=0.15,
                                linewidth=0)
        ax.set_title(_facet_title(facet), fontsize=9)
        ax.set_xlabel("layer (0 = embedding output)")
        ax.set_ylabel("mean L2 distance per token")
        ax.grid(alpha=0.3)
    for ax in flat[len(facets):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    _legend(fig, flat)
    return Plot("drift", title, caption, _png(fig))


# ------------------------------------------------------------------------------ one run


def run_plots(metrics: dict[str, Any]) -> list[Plot]:
    """The fine-tuning curves and the drift per layer of one finished run."""
    group = Group(metrics.get("defense", "run"), BASELINE_COLOUR, [metrics])
    seed = f"seed {metrics.get('seed')}"
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


# ------------------------------------------------------------------------------ sweeps


def harmful_vs_poison_plot(groups: list[Group]) -> Plot | None:
    """Harmful score against the poison ratio, one line per defense, 95% intervals."""
    if len(_facets(groups)) < 2 or None in _facets(groups):
        return None
    names = list(dict.fromkeys(g.name for g in groups))
    width = max((b - a for a, b in _pairs(sorted({g.facet for g in groups}))), default=0.1)
    fig = _new_figure(8.5, 5.0)
    ax = fig.subplots()
    one_seed = False
    for index, name in enumerate(names):
        line = sorted((g for g in groups if g.name == name and g.values("harmful_score")),
                      key=lambda g: g.facet)
        shift = (index - (len(names) - 1) / 2) * width * 0.04  # dodge overlapping bars
        xs, ys, below, above = [], [], [], []
        for group in line:
            values = group.values("harmful_score")
            mean = statistics.fmean(values)
            low, high = _interval(group, values)
            one_seed = one_seed or len(values) < 2
            xs.append(group.facet + shift)
            ys.append(mean)
            below.append(max(0.0, mean - low))
            above.append(max(0.0, high - mean))
        ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3,
                    color=line[0].colour if line else None, label=name)
    seeds = [len(g.values("harmful_score")) for g in groups if g.values("harmful_score")]
    prompts = groups[0].runs[0].get("n_eval_harmful")
    title = (f"Harmful score vs poison ratio ({_n_text(seeds)} per point, "
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
    return Plot("harmful_vs_poison", title, caption, _png(fig))


def _pairs(values: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(values, values[1:]))


def _interval(group: Group, values: list[float]) -> tuple[float, float]:
    if len(values) >= 2:
        ci = summarize(values).ci
        assert ci is not None
        return ci
    metrics = group.runs[0]
    if metrics.get("harmful_score_ci95"):
        low, high = metrics["harmful_score_ci95"]
        return float(low), float(high)
    n = int(metrics.get("n_eval_harmful") or 0)
    return wilson(round(values[0] / 100 * n), n) if n else (values[0], values[0])


def tradeoff_plot(groups: list[Group]) -> Plot | None:
    """Harmful score against fine-tune accuracy: one marker per cell, its runs as dots,
    and the Pareto front."""
    groups = [g for g in groups if g.values("harmful_score") and g.values("finetune_accuracy")]
    if not groups:
        return None
    means = [(statistics.fmean(g.values("harmful_score")),
              statistics.fmean(g.values("finetune_accuracy"))) for g in groups]
    front = pareto_front(means)
    fig = _new_figure(8.5, 5.6)
    ax = fig.subplots()
    labels: dict[tuple[float, float], list[str]] = {}
    for group, (harm, acc) in zip(groups, means):
        runs = [m for m in group.runs if m.get("harmful_score") is not None
                and m.get("finetune_accuracy") is not None]
        ax.scatter([m["harmful_score"] for m in runs], [m["finetune_accuracy"] for m in runs],
                   s=14, color=group.colour, alpha=0.35, linewidths=0)
        ax.scatter([harm], [acc], s=70, color=group.colour, edgecolors="white", zorder=3,
                   label=group.name)
        # cells on (nearly) the same spot share one label instead of overprinting
        spot = (round(harm * 2) / 2, round(acc * 2) / 2)
        labels.setdefault(spot, []).append(f"{_short(group.label, 34)} (n={len(runs)})")
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
    seeds = [len(g.values("harmful_score")) for g in groups]
    run = groups[0].runs[0]
    title = (f"Safety / utility trade-off per cell ({_n_text(seeds)} per cell; "
             f"{run.get('n_eval_harmful')} harmful, {run.get('n_eval_task')} task prompts)")
    ax.set_xlabel(f"harmful score (% of {run.get('n_eval_harmful')} harmful prompts; "
                  "lower is safer)")
    ax.set_ylabel(f"fine-tune accuracy (% of {run.get('n_eval_task')} task prompts)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    names = ", ".join(groups[i].label for i in front)
    caption = (
        "Each large marker is a cell's mean over its seeds; the small faint dots are its single "
        "runs. Up and to the left is better: less harmful, more accurate. Ringed markers "
        f"joined by the dashed line are the Pareto front ({names}): no other cell is both "
        "less harmful and at least as accurate."
    )
    return Plot("tradeoff", title, caption, _png(fig))


def overhead_plot(groups: list[Group]) -> Plot | None:
    """Seconds per optimizer step (alignment, fine-tuning), peak memory and repair time per
    defense, pooled over poison ratios and seeds."""
    names = list(dict.fromkeys(g.name for g in groups))
    pooled = {name: [m for g in groups if g.name == name for m in g.runs] for name in names}
    colours = {g.name: g.colour for g in groups}

    def stage(metrics: dict[str, Any], name: str, key: str) -> float | None:
        value = (metrics.get("stages") or {}).get(name, {}).get(key)
        return None if value is None else float(value)

    panels: list[tuple[str, str, list[tuple[str, Callable[[dict[str, Any]], float | None]]]]] = [
        ("time per optimizer step", "seconds per step", [
            ("alignment", lambda m: stage(m, "align", "seconds_per_step")),
            ("fine-tuning", lambda m: stage(m, "finetune", "seconds_per_step"))]),
        ("peak host memory (RSS)", "GB", [
            ("after alignment", lambda m: _gb(stage(m, "align", "peak_rss_mb"))),
            ("after fine-tuning", lambda m: _gb(stage(m, "finetune", "peak_rss_mb")))]),
    ]
    if any(stage(m, "finetune", "peak_gpu_mb") is not None
           for runs in pooled.values() for m in runs):  # runs on GPUs: the stage's own peak
        panels[1] = ("peak accelerator memory", "GB", [
            ("alignment", lambda m: _gb(stage(m, "align", "peak_gpu_mb"))),
            ("fine-tuning", lambda m: _gb(stage(m, "finetune", "peak_gpu_mb")))])
    repair = [stage(m, "post_finetune", "seconds") or 0.0 for runs in pooled.values()
              for m in runs]
    if max(repair, default=0.0) >= 0.05:
        panels.append(("post-fine-tuning repair", "seconds", [
            ("repair", lambda m: stage(m, "post_finetune", "seconds"))]))
    if not any(f(m) is not None for _, _, bars in panels for _, f in bars
               for runs in pooled.values() for m in runs):
        return None
    fig = _new_figure(4.3 * len(panels), 4.4)
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
    device = sorted({str(m.get("device")) for runs in pooled.values() for m in runs})
    title = f"Cost per defense ({_n_text(runs_n, 'run')} each, device {', '.join(device)})"
    fig.suptitle(title, fontsize=11)
    _legend(fig, list(axes))
    caption = (
        "Bars: mean over each defense's runs (all poison ratios and seeds); whiskers: min–max. "
        "Alignment time comes from the run that trained the aligned model (runs that reuse a "
        "cached one report its timing). Peak memory is the whole process's resident host "
        "memory up to the end of that stage, so it includes the stages before it (and, with "
        "`hftlab sweep --workers`, the worker's earlier runs); GPU memory is not recorded."
    )
    return Plot("overhead", title, caption, _png(fig))


def _gb(mb: float | None) -> float | None:
    return None if mb is None else mb / 1024


def sweep_plots(groups: list[Group]) -> list[Plot]:
    """Every sweep plot that the runs have data for."""
    seeds = [len(g.runs) for g in groups]
    plots = [
        harmful_vs_poison_plot(groups),
        tradeoff_plot(groups),
        curves_plot(
            groups,
            f"Fine-tuning curves per cell (mean over {_n_text(seeds)}; shaded: min–max)",
            "Losses of the model being fine-tuned on fixed held-out sets, one line per cell. "
            "Forgetting: the alignment loss rises; revitalisation: the harmful loss falls. A "
            "defense that works keeps its alignment loss flat and its harmful loss high while "
            "the task loss still falls. Panels share no y-axis: read the shape, then the values.",
        ),
        drift_plot(
            groups,
            f"Hidden-state drift per layer (mean over {_n_text(seeds)}; shaded: min–max)",
            "Mean L2 distance, per layer, between the aligned and the fine-tuned model's hidden "
            "states on held-out harmful prompts. Lower = the defense kept the aligned "
            "representation in place (the survey's harmful embedding drift; Vaccine targets "
            "it). The last layer is after the model's final normalisation, hence its smaller "
            "scale.",
        ),
        overhead_plot(groups),
    ]
    return [p for p in plots if p is not None]
