"""Bootstrap intervals for the slopes and ratios of the prediction checks.

Every number the predictions table judges is a statistic of a few runs (seeds) per
design point (a width m, a number of local steps τ), and of a few clients per run
when the metric is a per-client mean. The interval of a statistic comes from a
two-level nonparametric bootstrap:

1. at every design point, the seeds are drawn with replacement (as many as there
   are), independently at each point (a *stratified* bootstrap: the regression
   design, the widths, stays fixed);
2. for a per-client metric, inside every drawn run its clients are drawn with
   replacement too (the same clients in every round: a client is one unit) and
   the run's value is recomputed from them: the mean over the rounds of the
   p-weighted client mean, ``Σ n_k v_k / Σ n_k`` over the drawn clients.

The statistic (a log-log slope of the seed means, a ratio of geometric means) is
recomputed on each of ``num_draws`` draws and the interval is the percentile
interval: the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the draws.

What it covers and what it does not. The interval measures how much the statistic
moves when other seeds (and other clients) had been drawn. It does not measure a
misfit of the power law itself: a log-log curve that bends gives a slope that
depends on the range of widths, however many seeds are run. With 3 seeds per point
the percentile bootstrap is also optimistic: the bootstrap variance of a mean of n
draws is ``(n − 1)/n`` times the usual estimate ``s²/n`` (2/3 for n = 3), and
Student's quantile for 2 degrees of freedom (4.30) is far above the normal 1.96 that
a percentile interval implicitly uses. Resampling the seeds independently at each
width ignores that one seed shares its data set across widths; where a seed's data
make every width's value high or low together, that common offset cancels in the
slope, so the stratified interval is the wider (conservative) of the two choices.

Each interval is seeded from :data:`SEED` and its own name, so it does not depend
on the order in which the intervals are computed.

This module does not import flwr.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Draws per interval, the interval's level and the base seed of every interval's generator.
NUM_DRAWS, LEVEL, SEED = 2000, 0.95, 0


@dataclass(frozen=True)
class ClientPanel:
    """One run's per-client values: ``values[r, k]`` of client k in round r, with weights ``weights[r, k]`` (n_k).

    The run's value is the mean over rounds of the weighted client mean; a missing
    entry (a client that did not report that round) is NaN with weight 0.
    """

    values: np.ndarray  # (rounds, clients)
    weights: np.ndarray  # (rounds, clients)

    def __post_init__(self) -> None:
        if np.shape(self.values) != np.shape(self.weights) or np.ndim(self.values) != 2:
            raise ValueError(f"values {np.shape(self.values)} and weights {np.shape(self.weights)}: "
                             "expected two arrays of the same (rounds, clients) shape")

    def value(self) -> float:
        """Mean over rounds of ``Σ_k w_k v_k / Σ_k w_k`` (the recorded per-round p-weighted mean)."""
        return float(self.resampled(np.arange(self.values.shape[1])[None, :])[0])

    def resampled(self, clients: np.ndarray) -> np.ndarray:
        """The run's value for each row of ``clients`` (``(draws, k)`` client indices): shape ``(draws,)``."""
        v = self.values[:, clients]  # (rounds, draws, k)
        w = np.where(np.isfinite(v), self.weights[:, clients], 0.0)
        total = w.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_round = np.where(total > 0, np.nansum(np.where(w > 0, v, 0.0) * w, axis=-1) / total, np.nan)
            return np.nanmean(per_round, axis=0) if per_round.shape[0] else np.full(clients.shape[0], np.nan)


Unit = float | ClientPanel


@dataclass(frozen=True)
class Interval:
    """A closed interval ``[low, high]`` (NaN ends when it could not be computed)."""

    low: float
    high: float

    @property
    def known(self) -> bool:
        """Both ends are finite numbers."""
        return math.isfinite(self.low) and math.isfinite(self.high)

    def format(self, fmt: str = "+.3f") -> str:
        """``[low, high]`` with both ends in ``fmt``."""
        return f"[{self.low:{fmt}}, {self.high:{fmt}}]"

    def __str__(self) -> str:
        return self.format()


def generator(name: str, seed: int = SEED) -> np.random.Generator:
    """A generator seeded from ``seed`` and ``name``: the same draws for the same interval, in any order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def unit_values(units: Sequence[Unit]) -> np.ndarray:
    """The point value of each unit (a float as it is, a panel's :meth:`ClientPanel.value`)."""
    return np.array([u.value() if isinstance(u, ClientPanel) else float(u) for u in units], float)


def draw_units(units: Sequence[Unit], num_draws: int, rng: np.random.Generator) -> np.ndarray:
    """``(num_draws, len(units))`` bootstrap values: seeds drawn with replacement, a panel's clients too.

    Slot j of draw b holds unit ``i = idx[b, j]`` (drawn uniformly); a float unit gives
    its value, a panel its value over clients drawn with replacement for that slot.
    """
    if not len(units):
        raise ValueError("units=[]: expected at least one run to resample")
    if num_draws < 1:
        raise ValueError(f"num_draws={num_draws}: expected >= 1")
    n = len(units)
    idx = rng.integers(0, n, size=(num_draws, n))
    out = np.empty((num_draws, n))
    for i, unit in enumerate(units):
        hit = idx == i
        if not hit.any():
            continue
        if isinstance(unit, ClientPanel):
            k = unit.values.shape[1]
            clients = rng.integers(0, k, size=(int(hit.sum()), k))
            out[hit] = unit.resampled(clients)
        else:
            out[hit] = float(unit)
    return out


def _mean_log(values: np.ndarray) -> np.ndarray:
    """Mean of log over the last axis, non-positive values left out (NaN when none is positive)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(values > 0, np.log(np.where(values > 0, values, 1.0)), np.nan)
        count = np.isfinite(logs).sum(axis=-1)
        return np.where(count > 0, np.nansum(logs, axis=-1) / np.maximum(count, 1), np.nan)


def ols_slopes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``v[..., i]`` on ``u[i]`` for every leading index (NaN points left out)."""
    u = np.broadcast_to(np.asarray(u, float), v.shape)
    ok = np.isfinite(u) & np.isfinite(v)
    count = ok.sum(axis=-1)
    u0, v0 = np.where(ok, u, 0.0), np.where(ok, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = u0.sum(-1, keepdims=True) / np.maximum(count, 1)[..., None]
        vb = v0.sum(-1, keepdims=True) / np.maximum(count, 1)[..., None]
        du = np.where(ok, u0 - ub, 0.0)
        sxx = (du * du).sum(-1)
        slope = (du * np.where(ok, v0 - vb, 0.0)).sum(-1) / sxx
    return np.where((count >= 2) & (sxx > 0), slope, np.nan)


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> Interval:
    """The ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the finite draws."""
    if not 0 < level < 1:
        raise ValueError(f"level={level}: expected a number in (0, 1)")
    finite = np.asarray(draws, float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return Interval(math.nan, math.nan)
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(low), float(high))


def loglog_slope_draws(groups: Mapping[float, Sequence[Unit]], num_draws: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap draws ``(num_draws,)`` of the slope of log(geometric seed mean) against log x.

    ``groups`` maps each design point x (> 0) to its runs. The point estimate that
    these draws scatter around is the slope of the same fit on the units' values,
    the slope :func:`fedavg_relu.experiments.plots.fit_loglog_slope` gives on the seed
    means of :func:`fedavg_relu.experiments.plots.seed_stats` with ``log=True``.
    """
    xs = sorted(groups)
    if any(x <= 0 for x in xs):
        raise ValueError(f"design points {xs}: expected positive x for a log-log slope")
    means = np.column_stack([_mean_log(draw_units(groups[x], num_draws, rng)) for x in xs])
    return ols_slopes(np.log(np.asarray(xs, float)), means)


def bootstrap_loglog_slope(groups: Mapping[float, Sequence[Unit]], name: str, num_draws: int = NUM_DRAWS,
                           level: float = LEVEL, seed: int = SEED) -> Interval:
    """The percentile interval of the log-log slope (:func:`loglog_slope_draws`), seeded by ``name``."""
    return percentile_interval(loglog_slope_draws(groups, num_draws, generator(name, seed)), level)


def bootstrap_ratio(numerator: Sequence[Unit], denominator: Sequence[Unit], name: str, num_draws: int = NUM_DRAWS,
                    level: float = LEVEL, seed: int = SEED) -> Interval:
    """Interval of (geometric mean of ``numerator``) / (geometric mean of ``denominator``), each side drawn alone."""
    rng = generator(name, seed)
    top = _mean_log(draw_units(numerator, num_draws, rng))
    bottom = _mean_log(draw_units(denominator, num_draws, rng))
    return percentile_interval(np.exp(top - bottom), level)


def bootstrap_curve_fit(curves: np.ndarray, rounds: np.ndarray, name: str, num_draws: int = NUM_DRAWS,
                        level: float = LEVEL, seed: int = SEED) -> tuple[Interval, Interval]:
    """Intervals of ``rho = exp(slope)`` and r² of the line through the seed mean of ``log curves``.

    ``curves`` is ``(seeds, rounds)`` of positive values (a loss by round); the seeds
    are drawn with replacement and the line fitted to the mean of their logs, as
    :func:`fedavg_relu.experiments.plots.fit_linear_rate` fits the seed mean.
    """
    curves = np.asarray(curves, float)
    rng = generator(name, seed)
    idx = rng.integers(0, curves.shape[0], size=(num_draws, curves.shape[0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.where(curves > 0, curves, np.nan))
    mean = np.nanmean(logs[idx], axis=1)  # (draws, rounds)
    r = np.asarray(rounds, float)
    slope = ols_slopes(r, mean)
    ok = np.isfinite(mean)
    count = np.maximum(ok.sum(-1), 1)
    vbar = np.nansum(mean, -1) / count
    rbar = np.where(ok, r, 0.0).sum(-1) / count
    fitted = vbar[:, None] + slope[:, None] * (r[None, :] - rbar[:, None])
    resid = np.nansum((mean - fitted) ** 2, -1)
    total = np.nansum((mean - vbar[:, None]) ** 2, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(total > 0, 1 - resid / total, 1.0)
    return percentile_interval(np.exp(slope), level), percentile_interval(r2, level)
