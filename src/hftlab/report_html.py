"""The building blocks of ``hftlab report``'s files: the jinja2 templates of the HTML pages
(``hftlab/templates``, autoescaped) and the tables they show, the plots section of
``report.md``, and number formatting shared by the run and the sweep report."""

from __future__ import annotations

import base64
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from hftlab import plot_base
from hftlab.plot_base import Plot
from hftlab.stats import wilson

log = logging.getLogger(__name__)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_interval(value: float | None, ci: Sequence[float] | None, n: int | None) -> str:
    """``12.3 [9.1, 16.0]``: a percentage with its stored 95% interval, else the Wilson
    interval over its n prompts, else the value alone."""
    if value is None:
        return "—"
    if not ci and n:
        ci = wilson(round(float(value) / 100 * int(n)), int(n))
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"


@dataclass
class Table:
    """A table of a report page: cells before column ``numeric_from`` are labels, the rest
    right-aligned numbers; a cell is escaped unless it is :class:`markupsafe.Markup`."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    numeric_from: int = 1
    row_classes: Sequence[str] | None = None
    titles: Sequence[str] | None = None  # hover text of each row's first cell


def prose(text: str) -> Markup:
    """Escaped text with `code` spans."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _data_uri(plot: Plot) -> str:
    return "data:image/png;base64," + base64.b64encode(plot.png).decode("ascii")


@functools.cache
def _environment() -> Environment:
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                              autoescape=True, undefined=StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)
    environment.filters["prose"] = prose
    environment.filters["data_uri"] = _data_uri
    return environment


def render(template: str, **context: Any) -> str:
    """A page from ``templates/<template>`` (every value escaped unless it is Markup)."""
    return _environment().get_template(template).render(**context) + "\n"


def draw(make: Callable[[], list[Plot]]) -> tuple[list[Plot], list[str]]:
    """The plots, and notes for what could not be drawn (no matplotlib, or a plot that
    failed: the report is still written, a long run is never lost to a plotting error)."""
    if not plot_base.available():
        return [], [plot_base.INSTALL_HINT]
    try:
        return make(), []
    except Exception as exc:
        log.warning("plots failed: %s", exc, exc_info=True)
        return [], [f"The plots failed: {exc}"]


def plots_md(drawn: list[Plot], notes: list[str]) -> list[str]:
    """The plots section of ``report.md``: the titles of the plots in ``report.html``."""
    if drawn:
        return ["## Plots", "", "In `report.html` (self-contained, open it in a browser):", "",
                *(f"- {p.title}" for p in drawn), ""]
    if not plot_base.available():
        return [f"Plots: {plot_base.INSTALL_HINT}", ""]
    return ["Plots: none drawn (see report.html).", ""] if notes else []
