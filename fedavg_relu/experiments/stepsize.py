"""Prediction 5 located: where the round-1 drift stops growing with τ, against the theorem's step-size range.

Deng et al.'s analysis takes a local step size η ≲ c / (τ L), L the smoothness along the
trajectory. Here L is measured, not assumed: ``L̂`` is the effective smoothness
‖∇f_k(W_k) − ∇f_k(W^1)‖ / ‖W_k − W^1‖ in round 1 of the grid's gentlest cell (the smallest
η̃ τ, where W_k is closest to W^0, so the ratio is closest to the local smoothness at W^0),
geometric mean over its seeds. A cell (η̃, τ) lies in the range when ``η τ L̂ ≤ c`` with
η = η̃ d / m (``effective-learning-rate``); c = 1 here (the theorem's constant is not given).

The drift clause of prediction 5 (round-1 drift grows with τ) is then judged on each
consecutive pair of τ at each η̃: the log-log slope of the drift between τ_i and τ_{i+1}
with its 95 % bootstrap interval (seeds, and clients from ``clients.csv``), and the pair
counts as inside the range when its larger τ is inside.

This module does not import flwr.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedavg_relu.experiments import uncertainty
from fedavg_relu.experiments.analysis import fit_loglog_slope, per_cell
from fedavg_relu.experiments.predictions import run_units

#: The constant c of η ≲ c / (τ L) used to draw the range.
RANGE_CONSTANT = 1.0


def first_round_cells(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: its configuration, ``effective-learning-rate`` and round-1 drift, divergence and smoothness."""
    return per_cell(metrics, {"gradient-drift-mean": "first", "model-divergence": "first",
                              "effective-smoothness-mean": "first", "effective-learning-rate": "final"})


def measured_smoothness(cells: pd.DataFrame) -> float:
    """``L̂``: the round-1 effective smoothness of the cell with the smallest η̃ τ (geometric mean over seeds)."""
    product = cells["learning-rate"] * cells["local-steps"]
    gentlest = cells[product == product.min()]
    return float(np.exp(np.log(gentlest["effective-smoothness-mean"].astype(float)).mean()))


def local_slopes(metrics: pd.DataFrame, clients: pd.DataFrame | None = None, c: float = RANGE_CONSTANT) -> pd.DataFrame:
    """Per η̃ and consecutive pair of τ: the round-1 drift slope with its interval, η τ L̂ and inside/outside.

    Columns: ``learning-rate``, ``tau-low``, ``tau-high``, ``slope``, ``low``, ``high``, ``eta-tau-L``
    (η τ_high L̂), ``inside`` (η τ_high L̂ ≤ c), ``judged`` (agrees / disagrees / undetermined for slope > 0).
    """
    cells = first_round_cells(metrics)
    smooth = measured_smoothness(cells)
    rows = []
    for lr, frame in cells.groupby("learning-rate"):
        taus = sorted(int(t) for t in frame["local-steps"].unique())
        eta = float(frame["effective-learning-rate"].iloc[0])
        for lo, hi in zip(taus, taus[1:], strict=False):
            pair = frame[frame["local-steps"].isin([lo, hi])]
            groups = run_units(pair, "local-steps", "gradient-drift-mean", clients, first=True)
            interval = uncertainty.bootstrap_loglog_slope(groups, f"5/grid/lr={lr:g}/{lo}-{hi}")
            means = {t: float(np.exp(np.mean(np.log(uncertainty.unit_values(groups[float(t)]))))) for t in (lo, hi)}
            slope = fit_loglog_slope([lo, hi], [means[lo], means[hi]]).slope
            judged = "agrees" if interval.low > 0 else "disagrees" if interval.high < 0 else "undetermined"
            rows.append({"learning-rate": float(lr), "tau-low": lo, "tau-high": hi, "slope": slope, "low": interval.low,
                         "high": interval.high, "eta-tau-L": eta * hi * smooth, "inside": bool(eta * hi * smooth <= c),
                         "judged": judged})
    return pd.DataFrame(rows)


def range_summary(local: pd.DataFrame) -> dict[str, float]:
    """Counts of the pairs' verdicts inside and outside the range, and the largest η̃ τ inside it."""
    out: dict[str, float] = {}
    for where, frame in (("inside", local[local["inside"]]), ("outside", local[~local["inside"]])):
        for verdict in ("agrees", "disagrees", "undetermined"):
            out[f"{where}-{verdict}"] = int((frame["judged"] == verdict).sum())
        out[f"{where}-pairs"] = int(len(frame))
    inside = local[local["inside"]]
    out["largest-eta-tau-inside"] = float((inside["learning-rate"] * inside["tau-high"]).max()) if len(inside) else math.nan
    return out
