"""Small statistics for the survey's metrics: a Wilson interval for one run's rate (k of n
prompts), mean ± std and a t interval across seeds, and the tests ``hftlab compare`` uses to
say whether a defense differs from sft (Welch's t across seeds; Newcombe's interval for a
difference of two proportions when a cell has one seed, which ignores seed-to-seed variation
and says so). The quantiles and intervals come from scipy and statsmodels; scipy and
statsmodels load on first use, so ``import hftlab.stats`` stays cheap."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)
WELCH = "welch"
NEWCOMBE = "two-proportion Newcombe (one seed)"
# both cells' seeds all gave one value (seeds that share one cached alignment share its
# timings and scores): no seed-to-seed variation to test against
SHARED = "none (every seed gave the same value)"


def t95(df: float) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (Welch's df need not be
    whole); infinite when there is no degree of freedom."""
    if not df > 0:
        return math.inf
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials, as percentages (two decimals)."""
    if n <= 0:
        return (math.nan, math.nan)
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(k, n, alpha=2 * float(norm.sf(z)), method="wilson")
    return (round(100 * max(0.0, float(low)), 2), round(100 * min(1.0, float(high)), 2))


def rate_interval(percent: float, n: int) -> list[float]:
    """95% Wilson interval of a percentage measured on n prompts."""
    return list(wilson(round(percent / 100 * n), n))


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
    """Mean, sample std and the 95% t interval of the mean (no interval for one value)."""
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
    """``a − b`` with its 95% interval (None: nothing to test, see :data:`SHARED`) and the
    test that produced it."""

    diff: float
    ci: tuple[float, float] | None
    test: str

    @property
    def significant(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)


def welch(a: list[float], b: list[float]) -> Difference:
    """Difference of means across seeds with the Welch–Satterthwaite t interval
    (statsmodels' ``CompareMeans.tconfint_diff(usevar="unequal")``); no interval when
    neither side varies (the seeds share the value)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return Difference(diff, None, SHARED)
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    low, high = CompareMeans(DescrStatsW(a), DescrStatsW(b)).tconfint_diff(
        alpha=0.05, usevar="unequal")
    return Difference(diff, (float(low), float(high)), WELCH)


def two_proportions(k_a: int, n_a: int, k_b: int, n_b: int) -> Difference:
    """Difference of two rates (percent) with Newcombe's hybrid score interval (from the two
    Wilson intervals; statsmodels' ``confint_proportions_2indep(method="newcomb")``): prompt-
    level sampling only, no seed variation. Unlike the Wald interval it keeps its coverage
    near 0 % and 100 %, where defended models' harmful scores sit."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    low, high = confint_proportions_2indep(k_a, n_a, k_b, n_b, method="newcomb",
                                           compare="diff", alpha=0.05)
    diff = 100 * (k_a / n_a - k_b / n_b)
    return Difference(diff, (100 * float(low), 100 * float(high)), NEWCOMBE)


def compare(a: list[float], b: list[float], n_a: int, n_b: int) -> Difference:
    """``mean(a) − mean(b)`` for percentages measured on n_a / n_b prompts per run: Welch
    when both sides have two or more seeds, else the pooled two-proportion interval."""
    if len(a) >= 2 and len(b) >= 2:
        return welch(a, b)
    k_a = round(sum(a) / 100 * n_a)
    k_b = round(sum(b) / 100 * n_b)
    return two_proportions(k_a, n_a * len(a), k_b, n_b * len(b))
