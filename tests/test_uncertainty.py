"""Tests of fedavg_relu.experiments.uncertainty: bootstrap intervals on data whose intervals are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedavg_relu.experiments.predictions import Check, Condition
from fedavg_relu.experiments.uncertainty import (
    ClientPanel,
    Interval,
    bootstrap_curve_fit,
    bootstrap_loglog_slope,
    bootstrap_ratio,
    draw_units,
    generator,
    loglog_slope_draws,
    percentile_interval,
)

E = math.e


def test_two_point_slope_has_the_enumerated_distribution():
    """x = 1: y = {1, 1}; x = e: y = {e^-1, 1}. log x differs by 1, so slope = mean of the 2 drawn logs at x = e.

    The two draws at x = e give log-means -1 (both e^-1: p = 1/4), -1/2 (one each: 1/2), 0 (1/4); the
    2.5 % and 97.5 % quantiles are therefore -1 and 0 (each end has 1/4 > 2.5 % of the mass).
    """
    groups = {1.0: [1.0, 1.0], E: [E**-1, 1.0]}
    draws = loglog_slope_draws(groups, 8000, generator("two-point"))
    values, counts = np.unique(np.round(draws, 9), return_counts=True)
    assert list(values) == [-1.0, -0.5, 0.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.02)
    interval = bootstrap_loglog_slope(groups, "two-point")
    assert (interval.low, interval.high) == pytest.approx((-1.0, 0.0))


def test_ols_slope_interval_matches_the_analytic_one():
    """log y = 1 - 0.5 log x + sigma eps at k = 8 widths 2^0..2^7, n = 400 seeds each, sigma = 0.4.

    The slope is fitted through the k seed means of log y, each with variance sigma^2 / n, so
    Var(slope) = sigma^2 / (n Sxx) with Sxx = sum_i (log x_i - mean)^2 (the OLS formula with the
    mean's variance in place of the noise's). The bootstrap draws n values from each width's n:
    its variance of a mean is s^2 (n - 1) / n^2 ~ sigma^2 / n, so its 95 % interval is close to
    slope +- 1.96 sigma / sqrt(n Sxx) (to the Monte Carlo error of 2000 draws and of s^2: < 10 %).
    """
    rng = np.random.default_rng(7)
    widths = 2.0 ** np.arange(8)
    n, sigma = 400, 0.4
    groups = {float(x): list(np.exp(1 - 0.5 * np.log(x) + sigma * rng.standard_normal(n))) for x in widths}
    sxx = float(np.sum((np.log(widths) - np.log(widths).mean()) ** 2))
    half = 1.96 * sigma / math.sqrt(n * sxx)
    means = [np.mean(np.log(groups[float(x)])) for x in widths]
    slope = float(np.polyfit(np.log(widths), means, 1)[0])
    interval = bootstrap_loglog_slope(groups, "analytic")
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.1)
    assert (interval.low + interval.high) / 2 == pytest.approx(slope, abs=0.1 * half)


def test_interval_covers_the_true_slope_about_95_percent_of_the_time():
    """300 data sets (k = 5 widths, n = 12 seeds, sigma = 0.3, true slope -0.5): coverage near 0.95.

    The percentile bootstrap of a mean uses the variance s^2 (n - 1) / n^2, so its nominal 1.96 acts
    like 1.96 sqrt(11/12) = 1.88: expected coverage about 0.94 (normal errors). With 300 data sets the
    binomial standard deviation is 0.014, so the coverage lies in [0.89, 0.985] except by bad luck of 3 sd.
    """
    rng = np.random.default_rng(11)
    widths = 2.0 ** np.arange(6, 11)
    hits = 0
    for trial in range(300):
        groups = {float(x): list(np.exp(-0.5 * np.log(x) + 0.3 * rng.standard_normal(12))) for x in widths}
        interval = bootstrap_loglog_slope(groups, f"coverage-{trial}", num_draws=800)
        hits += interval.low <= -0.5 <= interval.high
    assert 0.89 <= hits / 300 <= 0.985


def test_three_seeds_under_cover():
    """With n = 3 seeds the same experiment covers clearly less than 95 % (the caveat in the module docstring).

    The bootstrap variance of a mean of 3 is 2/3 of s^2 / 3, and s^2 has only 2 degrees of freedom: the
    intervals are too short. 300 data sets, k = 5 widths: coverage below 0.93 (about 0.85 expected).
    """
    rng = np.random.default_rng(12)
    widths = 2.0 ** np.arange(6, 11)
    hits = 0
    for trial in range(300):
        groups = {float(x): list(np.exp(-0.5 * np.log(x) + 0.3 * rng.standard_normal(3))) for x in widths}
        interval = bootstrap_loglog_slope(groups, f"three-{trial}", num_draws=800)
        hits += interval.low <= -0.5 <= interval.high
    assert hits / 300 < 0.93


def test_client_panel_value_and_resampling():
    """One round, clients with values 1 and 3 and weights 1 and 3: value (1 + 9) / 4 = 2.5.

    Drawing the 2 clients with replacement gives {1, 1} -> 1, {3, 3} -> 3 (p = 1/4 each) and one of each
    -> 2.5 (p = 1/2): the weighted mean of the drawn clients.
    """
    panel = ClientPanel(np.array([[1.0, 3.0]]), np.array([[1.0, 3.0]]))
    assert panel.value() == pytest.approx(2.5)
    draws = draw_units([panel], 8000, generator("panel"))[:, 0]
    values, counts = np.unique(np.round(draws, 9), return_counts=True)
    assert list(values) == [1.0, 2.5, 3.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.02)


def test_client_panel_mean_over_rounds_skips_missing_clients():
    """Round 1: clients 2 and 4 (weights 1, 1) -> 3; round 2: client 0 missing (NaN, weight 0), client 1 = 6 -> 6.

    The run's value is the mean over rounds, (3 + 6) / 2 = 4.5.
    """
    panel = ClientPanel(np.array([[2.0, 4.0], [np.nan, 6.0]]), np.array([[1.0, 1.0], [0.0, 1.0]]))
    assert panel.value() == pytest.approx(4.5)


def test_ratio_interval_of_geometric_means():
    """Numerator {4, 4}, denominator {1, 4}: the ratio of geometric means is 4 / gm(draws) in {4, 2, 1}.

    The denominator's two draws are {1, 1} (p 1/4, ratio 4), {1, 4} (1/2, ratio 2), {4, 4} (1/4, ratio 1):
    the interval is [1, 4].
    """
    interval = bootstrap_ratio([4.0, 4.0], [1.0, 4.0], "ratio")
    assert (interval.low, interval.high) == pytest.approx((1.0, 4.0))


def test_curve_fit_interval_is_a_point_for_identical_seeds():
    """Every seed has F = 0.8^r: every draw fits rho = 0.8 with r2 = 1."""
    rounds = np.arange(1, 6)
    curves = np.vstack([0.8**rounds] * 3)
    rho, r2 = bootstrap_curve_fit(curves, rounds, "curve")
    assert (rho.low, rho.high) == pytest.approx((0.8, 0.8))
    assert (r2.low, r2.high) == pytest.approx((1.0, 1.0))


def test_intervals_are_seeded_by_name():
    """The same name draws the same interval in any order; another name draws another one."""
    rng = np.random.default_rng(3)
    groups = {float(x): list(rng.lognormal(size=3)) for x in (1, 2, 4, 8)}
    first = bootstrap_loglog_slope(groups, "a")
    bootstrap_loglog_slope(groups, "b")
    assert bootstrap_loglog_slope(groups, "a") == first
    assert bootstrap_loglog_slope(groups, "b") != first


def test_condition_judges_an_interval_three_ways():
    """Band [-0.7, -0.3]: [-0.6, -0.4] inside (True), [-0.2, -0.1] outside (False), [-0.8, -0.5] straddles (None)."""
    band = Condition("slope", -0.7, -0.3, closed=True)
    assert band.judge(Interval(-0.6, -0.4)) is True
    assert band.judge(Interval(-0.2, -0.1)) is False
    assert band.judge(Interval(-0.8, -0.5)) is None
    assert band.judge(Interval(-0.9, -0.1)) is None  # covers the whole band: both sides possible
    below = Condition("slope", high=0.0)  # slope < 0, open
    assert below.judge(Interval(0.0, 0.2)) is False  # 0 itself fails an open bound
    assert below.judge(Interval(math.nan, 0.1)) is None


def test_check_verdict_is_three_way():
    """A slope of -0.5 judged by [-0.7, -0.3]: interval inside -> agrees; straddling -> undetermined;
    a slope of -0.8 with its interval below -0.7 -> disagrees; no intervals -> the point verdict."""
    def check(value, low, high):
        c = Check(7, "p", measured={"slope": value}, conditions=[Condition("slope", -0.7, -0.3, closed=True)])
        c.decide()
        if low is not None:
            c.intervals = {"slope": Interval(low, high)}
        return c

    assert check(-0.5, -0.6, -0.4).verdict == "agrees"
    assert check(-0.5, -0.75, -0.4).verdict == "undetermined"
    assert check(-0.8, -0.85, -0.76).verdict == "disagrees"
    assert check(-0.8, None, None).verdict == "disagrees"
    assert check(-0.8, -0.85, -0.76).with_interval("slope") == "-0.800 [-0.850, -0.760]"


def test_bad_input_is_named():
    """Empty runs, a level outside (0, 1), mismatched panel shapes and non-positive widths are refused."""
    with pytest.raises(ValueError, match=r"units=\[\]"):
        draw_units([], 10, generator("x"))
    with pytest.raises(ValueError, match="num_draws=0"):
        draw_units([1.0], 0, generator("x"))
    with pytest.raises(ValueError, match="level=1.5"):
        percentile_interval(np.ones(3), 1.5)
    with pytest.raises(ValueError, match=r"values \(1, 2\) and weights \(1, 3\)"):
        ClientPanel(np.ones((1, 2)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="positive x"):
        bootstrap_loglog_slope({0.0: [1.0], 1.0: [1.0]}, "x")
