"""Small statistics for the survey's metrics: a Wilson interval for one run's rate (k of n
prompts), mean ± std and a t interval across seeds, and the tests ``hftlab compare`` uses to
say whether a defense differs from sft (Welch's t across seeds; a two-proportion z test when a
cell has one seed, which ignores seed-to-seed variation and says so)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Z95 = 1.959964
# two-sided 95% quantiles of Student's t by degrees of freedom (1-30); beyond: the normal's
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060,
       2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: float) -> float:
    """Two-sided 95% Student-t quantile (df rounded down, so the interval errs wide)."""
    if df < 1:
        return math.inf
    whole = int(df)
    return T95[whole - 1] if whole <= len(T95) else Z95


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials, as percentages."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2))


@dataclass
class Summary:
    """Mean, sample std and 95% t interval of one metric over seeds."""

    n: int
    mean: float
    std: float | None
    ci: tuple[float, float] | None

    def __str__(self) -> str:
        if self.std is None:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f}"

    def as_dict(self) -> dict[str, object]:
        return {"n": self.n, "mean": round(self.mean, 3),
                "std": None if self.std is None else round(self.std, 3),
                "ci95": None if self.ci is None else [round(c, 3) for c in self.ci]}


def summarize(values: list[float]) -> Summary:
    if not values:
        raise ValueError("summarize needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Summary(1, mean, None, None)
    std = statistics.stdev(values)
    half = t95(len(values) - 1) * std / math.sqrt(len(values))
    return Summary(len(values), mean, std, (mean - half, mean + half))


@dataclass
class Difference:
    """``a − b`` with its 95% interval and the test that produced it."""

    diff: float
    ci: tuple[float, float]
    test: str

    @property
    def significant(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0


def welch(a: list[float], b: list[float]) -> Difference:
    """Difference of means across seeds with the Welch–Satterthwaite t interval."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(diff, (diff, diff), "welch")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t95(df) * se
    return Difference(diff, (diff - half, diff + half), "welch")


def two_proportions(k_a: int, n_a: int, k_b: int, n_b: int) -> Difference:
    """Difference of two rates (percent) with the normal (Wald) interval: prompt-level
    sampling only, no seed variation."""
    pa, pb = k_a / n_a, k_b / n_b
    se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    diff = 100 * (pa - pb)
    half = 100 * Z95 * se
    return Difference(diff, (diff - half, diff + half), "two-proportion z (one seed)")


def compare(a: list[float], b: list[float], n_a: int, n_b: int) -> Difference:
    """``mean(a) − mean(b)`` for percentages measured on n_a / n_b prompts per run: Welch
    when both sides have two or more seeds, else the pooled two-proportion test."""
    if len(a) >= 2 and len(b) >= 2:
        return welch(a, b)
    k_a = round(sum(a) / 100 * n_a)
    k_b = round(sum(b) / 100 * n_b)
    return two_proportions(k_a, n_a * len(a), k_b, n_b * len(b))
