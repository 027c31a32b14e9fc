"""The building blocks of ``hftlab report``'s files: HTML tables, embedded figures and the page
around them, the plots section of ``report.md``, and number formatting shared by the run and
the sweep report."""

from __future__ import annotations

import base64
import html
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from hftlab import plot_base
from hftlab.plot_base import Plot
from hftlab.stats import wilson

log = logging.getLogger(__name__)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1120px; padding: 1.5em 2em 4em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.65em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.front td:first-child { font-weight: 600; }
.sig { font-weight: 600; }
figure { margin: 1.8em 0; }
figure img { max-width: 100%; border: 1px solid #e2e2e2; }
figcaption { color: #444; font-size: 0.92em; max-width: 60em; margin-top: 0.4em; }
figure h3 { font-size: 1.05em; margin: 0 0 0.4em; }
.hint { background: #fff4d6; border: 1px solid #e5c86b; padding: 0.6em 0.9em; }
.note { color: #555; font-size: 0.9em; }
details { margin: 1em 0; }
code { white-space: nowrap; background: #f3f3f3; padding: 0 0.2em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


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


def esc(value: Any) -> str:
    return html.escape(str(value))


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
               numeric_from: int = 1, row_classes: Sequence[str] | None = None) -> str:
    """Cells are escaped unless given as ``("raw", html)``; columns from ``numeric_from`` on
    are right-aligned."""
    def cell(i: int, value: Any) -> str:
        text = value[1] if isinstance(value, tuple) and value[:1] == ("raw",) else esc(value)
        return f'<td class="num">{text}</td>' if i >= numeric_from else f"<td>{text}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for number, row in enumerate(rows):
        css = row_classes[number] if row_classes else ""
        attr = f' class="{css}"' if css else ""
        body.append(f"<tr{attr}>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    # the title is drawn in the picture itself, so a copied PNG still says what it shows
    return (f'<figure id="{esc(plot.key)}">'
            f'<img alt="{esc(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{prose(plot.caption)}</figcaption></figure>")


def prose(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def html_page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def draw(make: Callable[[], list[Plot]]) -> tuple[list[Plot], list[str]]:
    """The plots, and HTML notes for what could not be drawn (no matplotlib, or a plot that
    failed: the report is still written, a long run is never lost to a plotting error)."""
    if not plot_base.available():
        return [], [f'<p class="hint">{prose(plot_base.INSTALL_HINT)}</p>']
    try:
        return make(), []
    except Exception as exc:
        log.warning("plots failed: %s", exc, exc_info=True)
        return [], [f'<p class="hint">The plots failed: {esc(exc)}</p>']


def plots_md(drawn: list[Plot], notes: list[str]) -> list[str]:
    """The plots section of ``report.md``: the titles of the plots in ``report.html``."""
    if drawn:
        return ["## Plots", "", "In `report.html` (self-contained, open it in a browser):", "",
                *(f"- {p.title}" for p in drawn), ""]
    if not plot_base.available():
        return [f"Plots: {plot_base.INSTALL_HINT}", ""]
    return ["Plots: none drawn (see report.html).", ""] if notes else []
