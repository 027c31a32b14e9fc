"""What every plot of ``hftlab report`` shares: the :class:`Plot` it returns, the :class:`Group`
of runs a line or marker stands for, matplotlib access, colours, facets, legends and the Pareto
front.

matplotlib is optional (``pip install 'hftlab[report]'``) and imported only when a plot is
drawn; figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot, so
nothing depends on a display or on pyplot's global state."""

from __future__ import annotations

import colorsys
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hftlab.run_metrics import RunMetrics
from hftlab.stats import summarize, wilson

INSTALL_HINT = (
    "Plots need matplotlib, which is not installed: pip install 'hftlab[report]' "
    "(or pip install matplotlib), then rerun `hftlab report`."
)
POISON = "finetune.poison_ratio"
DPI = 110
BASELINE = "sft"
BASELINE_COLOUR = "#7f7f7f"  # sft, the no-defense baseline, is always this grey
# tab10 and tab20's light half without their greys, then tab20b's dark hues: 23 colours that
# stay apart from each other and from the reserved grey
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
           "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31",
           "#843c39", "#7b4173"]
LEGEND_FONT = 8


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
    settings: dict[str, Any] = field(default_factory=dict)  # the cell's varying settings

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
    # drawn at the saving DPI, so label positions measured in pixels hold in the PNG
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure_class()(figsize=(width, height), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)  # a renderer to measure text with (label placement)
    return fig


def png(fig: Any) -> bytes:
    """The figure as PNG, cropped to everything drawn: a legend outside the axes is kept
    whole."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.12)
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


def colour_for(names: Sequence[str]) -> dict[str, str]:
    """A colour per distinct name, by sorted name so that a name keeps its colour however the
    runs were ordered; sft gets the reserved grey. Past the palette, evenly spaced hues."""
    others = sorted({n for n in names if n != BASELINE})
    extra = len(others) - len(COLOURS)
    hues = [colorsys.hsv_to_rgb((i + 0.5) / extra, 0.75, 0.8) for i in range(max(extra, 0))]
    palette = COLOURS + ["#" + "".join(f"{round(c * 255):02x}" for c in rgb) for rgb in hues]
    colours = dict(zip(others, palette))
    if BASELINE in names:
        colours[BASELINE] = BASELINE_COLOUR
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


def legend(fig: Any, axes: list[Any], title: str | None = None, always: bool = False) -> Any:
    """One legend for all panels, outside the axes (never over the data): to the right of the
    top-right panel, below the figure's title, or below the panels where it would take more
    than a third of the width; None for a single entry unless ``always``."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels and not label.startswith("_"):
                handles.append(handle)
                labels.append(label)
    if len(labels) < (1 if always else 2):
        return None
    column = max(map(len, labels)) * LEGEND_FONT * 0.6 + 28  # points per legend column
    rows = max(4, int(fig.get_figheight() * 72 / (LEGEND_FONT * 1.75)) - 3)
    ncols = math.ceil(len(labels) / rows)
    width = fig.get_figwidth() * 72
    style = dict(title=title, fontsize=LEGEND_FONT, title_fontsize=LEGEND_FONT, frameon=False)
    if ncols * column > 0.3 * width:  # beside the axes it would squeeze them: go below
        ncols = max(1, min(len(labels), int(width // column)))
        # a taller figure for the legend's rows, so the panels keep their height
        rows_below = math.ceil(len(labels) / ncols) + (1 if title else 0)
        fig.set_figheight(fig.get_figheight() + rows_below * LEGEND_FONT * 1.5 / 72 + 0.2)
        return fig.legend(handles, labels, loc="outside lower center", ncols=ncols, **style)
    spots = [(ax.get_subplotspec(), ax) for ax in axes if ax.get_visible()]
    corner = max(spots, key=lambda s: (-s[0].rowspan.start, s[0].colspan.stop))[1]
    return corner.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                         borderaxespad=0.0, ncols=ncols, **style)


def interval(group: Group, values: list[float], harmful: bool = True) -> tuple[float, float]:
    """The 95% interval of a group's harmful scores (or accuracies): the t interval over its
    seeds, or for one run its stored interval, else the Wilson interval over its prompts."""
    if len(values) >= 2:
        ci = summarize(values).ci
        assert ci is not None
        return ci
    final = group.runs[0].final
    stored = final.harmful_score_ci95 if harmful else final.finetune_accuracy_ci95
    if stored:
        low, high = stored
        return float(low), float(high)
    n = int((final.n_eval_harmful if harmful else final.n_eval_task) or 0)
    return wilson(round(values[0] / 100 * n), n) if n else (values[0], values[0])
