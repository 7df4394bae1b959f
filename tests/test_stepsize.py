"""Tests of fedavg_relu.experiments.stepsize: the drift's local slopes and the measured step-size range."""

from __future__ import annotations

import pandas as pd
import pytest
from _theory_tables import _config

from fedavg_relu.experiments.stepsize import first_round_cells, local_slopes, measured_smoothness, range_summary


def _grid() -> pd.DataFrame:
    """A tau group at m = 512, d = 64 (eta = eta-tilde / 8): eta-tilde 0.1 and 1, tau 1, 2, 4, 2 identical seeds.

    Round-1 drift tau^0.5 at eta-tilde 0.1 and tau^-0.5 at 1; effective smoothness 8 in every cell, so
    L-hat = 8 and eta tau L-hat = eta-tilde tau: at 0.1 the pairs end at 0.2 and 0.4 (inside c = 1), at 1 at
    2 and 4 (outside).
    """
    rows = []
    for lr in (0.1, 1.0):
        for tau in (1, 2, 4):
            for seed in (0, 1):
                head = {"group": "tau", "cell-id": f"l{lr}t{tau}s{seed}",
                        **_config(width=512, seed=seed, **{"learning-rate": lr, "local-steps": tau}),
                        "effective-learning-rate": lr * 64 / 512}
                rows.append({**head, "round": 0})
                rows.append({**head, "round": 1, "gradient-drift-mean": tau ** (0.5 if lr < 0.5 else -0.5),
                             "model-divergence": 0.01 * tau, "effective-smoothness-mean": 8.0})
    return pd.DataFrame(rows)


def test_measured_smoothness_is_the_gentlest_cells():
    """The smallest eta-tilde tau is (0.1, 1): its smoothness, 8."""
    assert measured_smoothness(first_round_cells(_grid())) == pytest.approx(8.0)


def test_local_slopes_inside_and_outside_the_range():
    """Inside: slopes +0.5 (agrees); outside: -0.5 (disagrees); eta tau L-hat = eta-tilde tau_high."""
    local = local_slopes(_grid())
    inside = local[local["inside"]]
    assert list(inside["learning-rate"]) == [0.1, 0.1]
    assert inside["slope"].to_numpy() == pytest.approx([0.5, 0.5])
    assert local["eta-tau-L"].to_numpy() == pytest.approx([0.2, 0.4, 2.0, 4.0])
    assert list(local["judged"]) == ["agrees", "agrees", "disagrees", "disagrees"]
    summary = range_summary(local)
    assert (summary["inside-agrees"], summary["outside-disagrees"], summary["outside-undetermined"]) == (2, 2, 0)
    assert summary["largest-eta-tau-inside"] == pytest.approx(0.4)
