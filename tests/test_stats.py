"""The statistics behind `hftlab compare`, against hand computations and scipy/statsmodels."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats as scipy_stats

from hftlab.stats import (
    NEWCOMBE,
    SHARED,
    WELCH,
    Z95,
    compare,
    summarize,
    t95,
    two_proportions,
    welch,
    wilson,
)


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def test_z95_is_the_normal_quantile() -> None:
    assert Z95 == pytest.approx(scipy_stats.norm.ppf(0.975), abs=1e-12)


def test_wilson_matches_the_closed_form() -> None:
    # 0 of 10: the upper bound is z²/(n + z²)
    z2 = Z95**2
    assert wilson(0, 10) == (0.0, pytest.approx(round(100 * z2 / (10 + z2), 2)))
    lo, hi = wilson(15, 300)
    assert (lo, hi) == (pytest.approx(3.05, abs=0.01), pytest.approx(8.08, abs=0.01))
    for k, n in ((1, 7), (150, 300), (299, 300), (300, 300), (12, 872)):
        low, high = wilson_by_hand(k, n)
        assert wilson(k, n) == (pytest.approx(round(100 * max(0, low), 2), abs=0.011),
                                pytest.approx(round(100 * min(1, high), 2), abs=0.011))
    assert math.isnan(wilson(0, 0)[0])


def test_t_quantiles_are_students_at_every_df() -> None:
    # hand values (tables): 12.706 at 1 df, 4.303 at 2, 2.042 at 30; 2.021 at 40, 1.984 at 100
    for df, want in ((1, 12.7062), (2, 4.3027), (30, 2.0423), (40, 2.0211), (100, 1.9840)):
        assert t95(df) == pytest.approx(want, abs=1e-4)
    assert t95(40) > Z95 + 0.06  # no fallback to the normal above 30 df
    assert t95(3) > t95(3.5) > t95(4)  # Welch's df need not be whole
    assert t95(0) == math.inf and t95(float("nan")) == math.inf


def test_summary_over_seeds_uses_the_t_interval() -> None:
    s = summarize([17.67, 16.0, 13.0])
    assert s.mean == pytest.approx(15.5567, abs=1e-3)
    assert s.std == pytest.approx(statistics.stdev([17.67, 16.0, 13.0]))
    half = 4.302653 * s.std / math.sqrt(3)
    assert s.ci == (pytest.approx(s.mean - half), pytest.approx(s.mean + half))
    assert str(summarize([5.0])) == "5.0" and summarize([5.0]).ci is None
    many = [float(v % 7) for v in range(41)]  # 40 df: Student's t, not the normal
    wide = summarize(many)
    half = 2.021075 * wide.std / math.sqrt(41)
    assert wide.ci[1] - wide.mean == pytest.approx(half, rel=1e-6)


def test_welch_interval_by_hand_and_by_scipy() -> None:
    a, b = [10.0, 12.0, 14.0], [20.0, 21.0, 25.0]
    va, vb = 4.0 / 3, 7.0 / 3  # sample variances 4 and 7, over n = 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    d = welch(a, b)
    assert d.diff == pytest.approx(-10.0) and d.test == WELCH
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert d.ci == (pytest.approx(-10 - half), pytest.approx(-10 + half))
    scipy_ci = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d.ci == (pytest.approx(scipy_ci.low), pytest.approx(scipy_ci.high))
    assert d.significant and 3 < df < 4


def test_no_interval_where_every_seed_gave_one_value() -> None:
    """Seeds that share the quantity (one cached alignment's seconds per step) have no
    seed-to-seed variation: Δ without an interval, never significant."""
    d = welch([4.8, 4.8, 4.8], [33.6, 33.6, 33.6])
    assert d.diff == pytest.approx(-28.8) and d.ci is None and d.test == SHARED
    assert not d.significant
    assert compare([4.8, 4.8], [33.6, 33.6], 300, 300).ci is None
    # one side varies: Welch's interval from that side alone
    one = welch([0.0, 0.0, 0.0], [5.0, 6.0, 7.0])
    assert one.test == WELCH and one.ci is not None and one.significant
    t = scipy_stats.t.ppf(0.975, 2)  # df = n − 1 of the side that varies
    assert one.ci == (pytest.approx(-6 - t / math.sqrt(3)), pytest.approx(-6 + t / math.sqrt(3)))


def newcombe_by_hand(k_a: int, n_a: int, k_b: int, n_b: int) -> tuple[float, float]:
    """Newcombe (1998) method 10: the difference's bounds from the two Wilson intervals."""
    pa, pb = k_a / n_a, k_b / n_b
    (la, ua), (lb, ub) = wilson_by_hand(k_a, n_a), wilson_by_hand(k_b, n_b)
    d = pa - pb
    return (100 * (d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2)),
            100 * (d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)))


def test_one_seed_falls_back_to_newcombes_interval() -> None:
    d = compare([50.0], [20.0], 100, 100)
    assert d.test == NEWCOMBE and d.test.startswith("two-proportion")
    assert d.diff == pytest.approx(30.0)
    assert d.ci == pytest.approx(newcombe_by_hand(50, 100, 20, 100), abs=1e-9)
    assert d.significant
    assert not two_proportions(10, 100, 11, 100).significant
    # at the edge (0 of 300 against 3 of 300) the interval stays inside what is possible
    edge = two_proportions(0, 300, 3, 300)
    assert edge.ci == pytest.approx(newcombe_by_hand(0, 300, 3, 300), abs=1e-9)
    assert -100 <= edge.ci[0] < edge.diff < edge.ci[1] <= 100
    # a side with several seeds pools its prompts: 2 seeds × 100 prompts
    pooled = compare([40.0, 50.0], [20.0], 100, 100)
    assert pooled.ci == pytest.approx(newcombe_by_hand(90, 200, 20, 100), abs=1e-9)
