"""What every plot of ``hftlab report`` shares: the :class:`Plot` it returns, the :class:`Group`
of runs a line or marker stands for, matplotlib access, colours, facets, legends and the Pareto
front.

matplotlib is optional (``pip install 'hftlab[report]'``) and imported only when a plot is
drawn; figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot, so
nothing depends on a display or on pyplot's global state."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hftlab.compare import Cell
from hftlab.run_metrics import RunMetrics

INSTALL_HINT = (
    "Plots need matplotlib, which is not installed: pip install 'hftlab[report]' "
    "(or pip install matplotlib), then rerun `hftlab report`."
)
POISON = "finetune.poison_ratio"
DPI = 110
BASELINE_COLOUR = "#404040"  # sft, the no-defense baseline, is always dark grey
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f"]


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
    runs: list[RunMetrics]
    facet: Any = None  # the poison ratio, when the sweep varies it
    seeds: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name if self.facet is None else f"{self.name}, p={self.facet}"

    @property
    def legend(self) -> str:
        """The series name with its number of runs: what a line or marker averages."""
        return f"{self.name} (n={len(self.runs)})"

    @property
    def harmful_scores(self) -> list[float]:
        return [float(m.final.harmful_score) for m in self.runs
                if m.final.harmful_score is not None]

    @property
    def accuracies(self) -> list[float]:
        return [float(m.final.finetune_accuracy) for m in self.runs
                if m.final.finetune_accuracy is not None]


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


def new_figure(width: float, height: float) -> Any:
    return _figure_class()(figsize=(width, height), layout="constrained")


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


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


def n_text(counts: Sequence[int], unit: str = "seed") -> str:
    low, high = min(counts), max(counts)
    span = str(low) if low == high else f"{low}–{high}"
    return f"n = {span} {unit}{'' if span == '1' else 's'}"


def short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def spread(rows: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean, min and max of equally long rows (one per run), position by position."""
    columns = list(zip(*rows))
    return ([statistics.fmean(c) for c in columns], [min(c) for c in columns],
            [max(c) for c in columns])


def facets(groups: list[Group]) -> list[Any]:
    seen: list[Any] = []
    for group in groups:
        if group.facet not in seen:
            seen.append(group.facet)
    return sorted(seen, key=lambda v: (v is None, v if isinstance(v, (int, float)) else 0))


def facet_title(facet: Any) -> str:
    return "" if facet is None else f"poison ratio p = {facet}"


def legend_label(group: Group, groups: list[Group]) -> str:
    """``sft (n=3)``; without n where every facet has its own panel (n may differ there)."""
    return group.legend if len(facets(groups)) == 1 else group.name


def legend(fig: Any, axes: list[Any]) -> None:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if len(labels) > 1:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5),
                   frameon=False)
