"""Tests of fedavg_relu.experiments.predictions on the hand-made table of _theory_tables (laws derived there)."""

from __future__ import annotations

import math

import pytest
from _theory_tables import theory_tables

from fedavg_relu.experiments.predictions import (
    check_all,
    check_central_gap,
    check_distance,
    check_drift_smoothness,
    check_flips,
    check_linear_convergence,
    check_local_steps,
    checks_markdown,
)


def test_linear_convergence_rate_and_fit():
    """F = 0.8^r at every width: rho = 0.8 with r2 = 1 at the widest (1024) and narrowest (64) width, early = late = 0.8."""
    metrics, _ = theory_tables()
    check = check_linear_convergence(metrics)
    assert check.measured["rho-widest"] == pytest.approx(0.8)
    assert check.measured["r2-widest"] == pytest.approx(1.0)
    assert check.measured["width-widest"] == 1024 and check.measured["width-narrowest"] == 64
    assert check.measured["rho-early"] == pytest.approx(0.8)  # (F(2)/F(1))^(1/1), k = 4 // 3 = 1
    assert check.measured["rho-late"] == pytest.approx(0.8)  # (F(4)/F(3))^(1/1)
    assert check.agrees is True


def test_distance_slope_is_minus_one_half():
    """distance = 2 m^-1/2 (seed spread symmetric in log space): slope -0.5; relative 0.1/m: slope -1."""
    metrics, _ = theory_tables()
    check = check_distance(metrics)
    assert check.measured["slope"] == pytest.approx(-0.5)
    assert check.measured["slope-relative"] == pytest.approx(-1.0)
    assert check.agrees is True


def test_flip_slopes():
    """Both flip fractions are c m^-1/2: slopes -0.5 and -0.5: agrees."""
    metrics, _ = theory_tables()
    check = check_flips(metrics)
    assert check.measured["slope-init"] == pytest.approx(-0.5)
    assert check.measured["slope-local"] == pytest.approx(-0.5)
    assert check.agrees is True


def test_drift_and_smoothness_slopes():
    """relative drift constant (slope 0), smoothness 0.01 m (slope 1), eta x smoothness constant (slope 0)."""
    metrics, _ = theory_tables()
    check = check_drift_smoothness(metrics)
    assert check.measured["slope-relative-drift"] == pytest.approx(0.0, abs=1e-9)
    assert check.measured["slope-smoothness"] == pytest.approx(1.0)
    assert check.measured["slope-smoothness-lr"] == pytest.approx(0.0, abs=1e-9)
    assert check.agrees is True


def test_local_steps_tradeoff_numbers():
    """F = exp(-0.1 r sqrt(tau)), R = 4: per round exp(-0.4); per 4 steps exp(0.2); divergence slope 1.5, drift 0.5.

    sqrt(divergence) = 0.1 tau^0.75, so its slope between tau = 2 and 4 is 0.75 (sub-linear).
    """
    metrics, _ = theory_tables()
    check = check_local_steps(metrics)
    m = check.measured
    assert m["loss-ratio-per-round/lr=1"] == pytest.approx(math.exp(-0.4))
    assert m["loss-ratio-per-step/lr=1"] == pytest.approx(math.exp(0.2))
    assert m["budget-steps/lr=1"] == 4
    assert m["slope-divergence/lr=1"] == pytest.approx(1.5)
    assert m["slope-drift/lr=1"] == pytest.approx(0.5)
    assert m["slope-distance-largest-tau/lr=1"] == pytest.approx(0.75)
    assert check.agrees is True


def test_local_steps_disagrees_when_drift_falls_with_tau():
    """Flip the drift law to tau^-0.5: the drift slope is -0.5 < 0, so the check disagrees."""
    metrics, _ = theory_tables()
    tau = metrics["group"] == "tau"
    metrics.loc[tau, "gradient-drift-mean"] = metrics.loc[tau, "local-steps"] ** -0.5
    check = check_local_steps(metrics)
    assert check.measured["slope-drift/lr=1"] == pytest.approx(-0.5)
    assert check.agrees is False


def test_central_gap_slopes():
    """central-distance = m^-1/2 (slope -0.5), relative and loss gap constant (slope 0, ratio 1): agrees."""
    _, cells = theory_tables()
    check = check_central_gap(cells)
    assert check.measured["slope-distance"] == pytest.approx(-0.5)
    assert check.measured["slope-relative-distance"] == pytest.approx(0.0, abs=1e-9)
    assert check.measured["slope-loss-gap"] == pytest.approx(0.0, abs=1e-9)
    assert check.measured["loss-gap-ratio-widest-narrowest"] == pytest.approx(1.0)
    assert check.agrees is True


def test_missing_groups_are_not_measured():
    """A table without a tau group: prediction 5 is 'not measured', the others still agree."""
    metrics, cells = theory_tables()
    checks = check_all(metrics[metrics["group"] != "tau"], cells)
    assert [c.verdict for c in checks] == ["agrees"] * 4 + ["not measured", "agrees"]


def test_markdown_table_has_one_row_per_prediction():
    """Header, separator and six rows."""
    metrics, cells = theory_tables()
    lines = checks_markdown(check_all(metrics, cells)).strip().splitlines()
    assert len(lines) == 8
    assert lines[2].startswith("| 1 |") and lines[-1].startswith("| 6 |")


def _client_rows(metrics, values=(0.5, 1.5)):
    """Per-client rows of the width group: 2 clients of 10 examples, relative drift 0.5 and 1.5 in every round."""
    import pandas as pd

    rows = []
    for cell_id in metrics[metrics["group"] == "width"]["cell-id"].unique():
        for r in range(1, 5):
            for k, v in enumerate(values):
                rows.append({"cell-id": cell_id, "round": r, "client": k, "num-examples": 10, "relative-gradient-drift": v})
    return pd.DataFrame(rows)


def test_intervals_without_clients_are_points_for_exact_laws():
    """Seeds are exact copies (except the log-symmetric spread of distance at m = 64): the intervals of the exact
    laws are points at the slope, and the verdicts are the point verdicts."""
    metrics, cells = theory_tables()
    checks = check_all(metrics, cells)
    flips = checks[2].intervals["slope-init"]
    assert (flips.low, flips.high) == pytest.approx((-0.5, -0.5))
    assert [c.verdict for c in checks] == ["agrees"] * 6
    assert checks[1].intervals["slope"].low < -0.5 < checks[1].intervals["slope"].high  # the spread at m = 64


def test_clients_widen_a_per_client_interval_to_undetermined():
    """Clients with relative drift 0.5 and 1.5 (mean 1, the table's value): a run drawn with both clients
    repeated has drift 0.5 or 1.5, so the drift slope's draws range over +-(log 3)/(log 16) = +-0.396 (the
    extremes at m = 64 and 1024) and the interval straddles the rule's -0.15: prediction 4 is undetermined,
    though its point slope is 0 and every other clause holds throughout."""
    metrics, cells = theory_tables()
    check = check_drift_smoothness(metrics, _client_rows(metrics))
    interval = check.intervals["slope-relative-drift"]
    assert check.measured["slope-relative-drift"] == pytest.approx(0.0, abs=1e-9)
    assert -0.396 <= interval.low < -0.15 and 0.15 < interval.high <= 0.396
    assert check.agrees is True and check.verdict == "undetermined"
    smooth = check.intervals["slope-smoothness"]  # no per-client column for it: seeds only, a point
    assert (smooth.low, smooth.high) == pytest.approx((1.0, 1.0))
