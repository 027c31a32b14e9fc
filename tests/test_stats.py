"""The statistics behind `hftlab compare`, against hand computations."""

from __future__ import annotations

import math
import statistics

import pytest

from hftlab.stats import compare, summarize, t95, two_proportions, welch, wilson


def test_wilson_matches_the_closed_form() -> None:
    # 0 of 10: the upper bound is z²/(n + z²)
    z2 = 1.959964**2
    assert wilson(0, 10) == (0.0, pytest.approx(round(100 * z2 / (10 + z2), 2)))
    lo, hi = wilson(15, 300)
    assert (lo, hi) == (pytest.approx(3.05, abs=0.01), pytest.approx(8.08, abs=0.01))
    assert math.isnan(wilson(0, 0)[0])


def test_summary_over_seeds_uses_the_t_interval() -> None:
    s = summarize([17.67, 16.0, 13.0])
    assert s.mean == pytest.approx(15.5567, abs=1e-3)
    assert s.std == pytest.approx(statistics.stdev([17.67, 16.0, 13.0]))
    half = 4.303 * s.std / math.sqrt(3)
    assert s.ci == (pytest.approx(s.mean - half), pytest.approx(s.mean + half))
    assert str(summarize([5.0])) == "5.0" and summarize([5.0]).ci is None


def test_welch_interval_by_hand() -> None:
    a, b = [10.0, 12.0, 14.0], [20.0, 21.0, 25.0]
    va, vb = 4.0 / 3, 7.0 / 3  # sample variances 4 and 7, over n = 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    d = welch(a, b)
    assert d.diff == pytest.approx(-10.0)
    half = t95(df) * math.sqrt(va + vb)
    assert d.ci == (pytest.approx(-10 - half), pytest.approx(-10 + half))
    assert d.significant and int(df) == 3


def test_one_seed_falls_back_to_two_proportions() -> None:
    d = compare([50.0], [20.0], 100, 100)
    assert d.test.startswith("two-proportion")
    se = math.sqrt(0.5 * 0.5 / 100 + 0.2 * 0.8 / 100)
    assert d.ci[0] == pytest.approx(30 - 100 * 1.959964 * se)
    assert d.significant
    assert not two_proportions(10, 100, 11, 100).significant
