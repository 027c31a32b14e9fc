"""Point labels that overlap neither each other nor the markers: each label takes the first
free spot on rings of growing radius around its point (a deterministic greedy search in pixel
space), joined to its point by a thin line when it had to move away."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ANGLES = (20, 160, -20, -160, 60, 120, -60, -120, 90, -90, 0, 180)
RADII = (7, 14, 24, 36, 50, 66, 84, 104, 126, 150, 180, 215, 255)
GAP = 2.0  # pixels kept free around a label


def _box(anchor_x: float, anchor_y: float, angle: float, width: float,
         height: float) -> tuple[float, float, float, float]:
    """The label's (x0, y0, x1, y1) when it hangs off ``anchor`` in direction ``angle``."""
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x0 = anchor_x if cos > 0.3 else anchor_x - width if cos < -0.3 else anchor_x - width / 2
    y0 = anchor_y if sin > 0.3 else anchor_y - height if sin < -0.3 else anchor_y - height / 2
    return x0, y0, x0 + width, y0 + height


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0]) + GAP
    height = min(a[3], b[3]) - max(a[1], b[1]) + GAP
    return width * height if width > 0 and height > 0 else 0.0


def place_labels(ax: Any, points: Sequence[tuple[float, float]], texts: Sequence[str],
                 marker_px: float = 7.0, fontsize: float = 8) -> list[Any]:
    """Annotate each data point with its text without overlaps; returns the annotations.

    The figure's layout is fixed first (a later layout pass would move the axes under the
    labels), so call this after everything else that changes the layout is drawn."""
    fig = ax.figure
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pixels = [tuple(ax.transData.transform(p)) for p in points]
    taken = [(x - marker_px, y - marker_px, x + marker_px, y + marker_px) for x, y in pixels]
    order = sorted(range(len(points)), key=lambda i: (-pixels[i][1], pixels[i][0]))
    annotations: list[Any] = [None] * len(points)
    for i in order:
        probe = ax.text(0, 0, texts[i], fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        x, y = pixels[i]
        best, best_cost, moved = None, math.inf, False
        for radius in RADII:
            for angle in ANGLES:
                ax_ = x + radius * math.cos(math.radians(angle))
                ay = y + radius * math.sin(math.radians(angle))
                box = _box(ax_, ay, angle, extent.width, extent.height)
                outside = (max(0.0, frame.x0 - box[0]) + max(0.0, box[2] - frame.x1)
                           + max(0.0, frame.y0 - box[1]) + max(0.0, box[3] - frame.y1))
                cost = sum(_overlap(box, t) for t in taken) + 1000 * outside
                if cost < best_cost:
                    best, best_cost, moved = box, cost, radius > RADII[1]
                if cost == 0:
                    break
            if best_cost == 0:
                break
        assert best is not None
        taken.append(best)
        annotations[i] = ax.annotate(
            texts[i], points[i], xytext=(best[0] - x, best[1] - y), textcoords="offset pixels",
            ha="left", va="bottom", fontsize=fontsize, zorder=5,
            arrowprops=dict(arrowstyle="-", color="#777777", linewidth=0.6, shrinkA=0,
                            shrinkB=marker_px * 0.6) if moved else None)
    return annotations
