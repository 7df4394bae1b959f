"""What the figures and the prediction checks share: fits, per-cell tables, captions, figure helpers.

:class:`Fit` and its least-squares fits (log-log slopes, linear loss rates), the
reduction of a sweep's per-round table to one row per cell (:func:`per_cell`) and over
seeds (:func:`seed_stats`), the configuration caption every figure carries, and the
shared figure helpers (:func:`new_figure`, :func:`save_figure`). The figure modules
(:mod:`fedavg_relu.experiments.plots`, :mod:`fedavg_relu.experiments.explanations`) and
the checks (:mod:`fedavg_relu.experiments.predictions`, ``kernel``, ``stepsize``) import
from here, so none of them imports another to get these. This module does not import flwr.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedavg_relu.core.config import RunConfig

#: Columns the analyses derive from the recorded metrics (not names a run records; tests/test_schema.py
#: checks that every other metric name spelt in experiments/ and scripts/render_docs.py is the schema's).
DERIVED_COLUMNS = (r"loss-ratio-per-(round|step)(/.*)?", r"ntk-change-(last|r\d*)", r"ntk-change/.*", "clients-per-round")
#: Columns of a sweep table that are not configuration (per-cell bookkeeping).
CELL_COLUMNS = ("group", "cell-id", "run-dir")
#: Configuration columns always named in a caption when constant, even at their default.
ALWAYS_SHOWN = ("model-family", "dataset", "depth", "width", "local-steps", "learning-rate", "lr-scaling",
                "batch-size", "num-partitions", "partitioner", "num-server-rounds")
#: Columns never shown in captions (bookkeeping, not science).
NEVER_SHOWN = ("output-dir", "run-name", "save-model", "round-timeout", "tensorboard", "resume",
               "drift-metrics", "gradient-dissimilarity", "strategy", "drift-nonlinear", "client-metrics")
#: Which groups of a theory sweep each figure reads (see ``sweeps/theory-*.toml``).
WIDTH_GROUP, TAU_GROUP, NONIID_GROUP = "width", "tau", "non-iid"


# --- fits -----------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """A least-squares line ``v = intercept + slope * u`` and its coefficient of determination."""

    slope: float
    intercept: float
    r2: float
    n: int  # points used

    @property
    def rate(self) -> float:
        """``exp(slope)``: for a fit of log(loss) against rounds, the per-round loss ratio."""
        return math.exp(self.slope)


def _line_fit(u: np.ndarray, v: np.ndarray) -> Fit:
    ok = np.isfinite(u) & np.isfinite(v)
    u, v = u[ok], v[ok]
    if len(u) < 2 or np.ptp(u) == 0:
        return Fit(math.nan, math.nan, math.nan, int(len(u)))
    slope, intercept = np.polyfit(u, v, 1)
    resid = v - (intercept + slope * u)
    total = float(np.sum((v - v.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / total if total > 0 else 1.0
    return Fit(float(slope), float(intercept), r2, int(len(u)))


def fit_loglog_slope(x: Iterable[float], y: Iterable[float]) -> Fit:
    """Slope of ``log y`` against ``log x`` (least squares; non-positive or non-finite points dropped).

    For a power law ``y = C * x**a``, ``log y = log C + a * log x`` is a straight
    line in ``log x``: the fitted slope is the exponent ``a`` and the intercept
    ``log C`` (natural logs), with r2 = 1. E.g. ``y = 3 * x**-0.5`` at
    x = 1, 4, 16 gives y = 3, 1.5, 0.75 and slope -0.5 (each factor 4 in x
    halves y: log(1/2) / log(4) = -0.5).
    """
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    keep = (x > 0) & (y > 0)
    return _line_fit(np.log(np.where(keep, x, np.nan)), np.log(np.where(keep, y, np.nan)))


def fit_linear_rate(rounds: Iterable[float], loss: Iterable[float], floor: float = 1e-12) -> Fit:
    """Linear-convergence fit: ``log loss = log C + r * log rho``; ``Fit.rate`` is rho.

    Linear convergence ``F(W^r) = C * rho**r`` makes ``log F`` a straight line in
    r with slope ``log rho``; so ``exp(slope)`` is the per-round loss ratio rho
    and r2 measures how straight the line is. Points at or below ``floor``
    (numerical floor) are dropped. E.g. F = 8, 4, 2, 1 at r = 0..3 gives
    slope log(1/2), rho = 0.5, r2 = 1.
    """
    r, f = np.asarray(list(rounds), float), np.asarray(list(loss), float)
    keep = f > floor
    return _line_fit(np.where(keep, r, np.nan), np.log(np.where(keep, f, np.nan)))


# --- tables ----------------------------------------------------------------------
def config_keys(table: pd.DataFrame) -> list[str]:
    """The run-config columns of a sweep table."""
    known = RunConfig().to_mapping()
    return [c for c in table.columns if c in known]


def config_caption(table: pd.DataFrame, vary: Sequence[str] = (), width: int = 110) -> str:
    """A title naming the configuration of ``table``'s rows, wrapped at ``width`` characters.

    Constant configuration columns are listed as ``key=value`` (those at their
    default only if in :data:`ALWAYS_SHOWN`); columns that vary, and any in
    ``vary``, as ``key ∈ {v1, v2, ...}``; ``seed`` as ``seeds: n``.
    """
    defaults = RunConfig().to_mapping()
    fixed, varied = [], []
    for key in config_keys(table):
        if key in NEVER_SHOWN:
            continue
        values = sorted(pd.unique(table[key].dropna()), key=lambda v: (str(type(v)), v))
        if key == "seed":
            varied.append(f"seeds: {len(values)}")
            continue
        if len(values) > 1 or key in vary:
            varied.append(f"{key} ∈ {{{', '.join(_fmt(v) for v in values)}}}")
        elif len(values) == 1:
            value = values[0]
            if key in ALWAYS_SHOWN or not _equal(value, defaults[key]):
                if key == "batch-size" and value == 0:
                    value = "full"
                elif key == "dirichlet-alpha" and "partitioner" in table and set(table["partitioner"]) != {"dirichlet"}:
                    continue
                elif key.startswith("synthetic-") and "dataset" in table and set(table["dataset"]) != {"synthetic"}:
                    continue
                fixed.append(f"{key}={_fmt(value)}")
    text = ", ".join(fixed + varied)
    return "\n".join(textwrap.wrap(text, width=width, break_on_hyphens=False))


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (isinstance(b, float) and math.isclose(float(a), b))
    except (TypeError, ValueError):
        return False


def with_loss_curve(metrics: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` plus ``train-objective``: F(W^r) for r = 0..R on the clients' data.

    Round r >= 1 records F(W^r) as ``global-loss``; round 0 (the initial model)
    has no client measurement, so F(W^0) is taken from round 1's ``loss-before``
    (the clients' loss at the model they received, W^0).
    """
    out = metrics.copy()
    out["train-objective"] = out["global-loss"] if "global-loss" in out else np.nan
    if "loss-before" in out:
        first = out[out["round"] == 1].set_index("cell-id")["loss-before"]
        mask = out["round"] == 0
        out.loc[mask, "train-objective"] = out.loc[mask, "cell-id"].map(first).to_numpy()
    return out


def per_cell(metrics: pd.DataFrame, reducers: Mapping[str, str]) -> pd.DataFrame:
    """One row per (group, cell): its configuration and each metric reduced over rounds.

    ``reducers`` maps a metric to ``"final"`` (the last round), ``"first"``
    (round 1, the first round with client measurements: every cell starts it
    from its W^0), ``"mean"`` (mean over rounds >= 1) or ``"max"``.
    """
    keys = [c for c in ("group", "cell-id") if c in metrics] + config_keys(metrics)
    rows = []
    for _, frame in metrics.groupby(["group", "cell-id"], sort=False):
        frame = frame.sort_values("round")
        row = frame.iloc[-1][keys].to_dict()
        trained = frame[frame["round"] >= 1]
        for metric, how in reducers.items():
            values = pd.to_numeric(frame[metric], errors="coerce") if metric in frame else pd.Series(dtype=float)
            if how == "final":
                row[metric] = float(values.iloc[-1]) if len(values) else math.nan
            elif how == "first":
                first = pd.to_numeric(trained[metric], errors="coerce") if metric in trained else pd.Series(dtype=float)
                row[metric] = float(first.iloc[0]) if len(first) else math.nan
            elif how in ("mean", "max"):
                tv = pd.to_numeric(trained[metric], errors="coerce") if metric in trained else pd.Series(dtype=float)
                row[metric] = float(getattr(tv, how)()) if len(tv) else math.nan
            else:
                raise ValueError(f"reducer {how!r} for {metric}: expected final, first, mean or max")
        rows.append(row)
    return pd.DataFrame(rows)


def seed_stats(table: pd.DataFrame, x: str, y: str, log: bool = False) -> pd.DataFrame:
    """Mean, std and count of ``y`` over the rows (seeds) at each ``x`` (of log10 y when ``log``).

    Columns: ``x``, ``center``, ``low``, ``high`` (in y's units: mean ± std, or
    10**(mean ± std) of log10 y), ``n``.
    """
    values = pd.to_numeric(table[y], errors="coerce")
    frame = pd.DataFrame({x: table[x].to_numpy(), "v": values.to_numpy()}).dropna()
    if log:
        frame = frame[frame["v"] > 0]
        frame["v"] = np.log10(frame["v"])
    stats = frame.groupby(x)["v"].agg(["mean", "std", "count"]).reset_index().sort_values(x)
    std = stats["std"].fillna(0.0)
    center, low, high = stats["mean"], stats["mean"] - std, stats["mean"] + std
    if log:
        center, low, high = 10**center, 10**low, 10**high
    return pd.DataFrame({x: stats[x].to_numpy(), "center": center.to_numpy(), "low": low.to_numpy(),
                         "high": high.to_numpy(), "n": stats["count"].to_numpy()})


# --- drawing ---------------------------------------------------------------------
def new_figure(ncols: int = 1, width: float = 5.2, height: float = 4.0) -> tuple[Figure, list]:
    """A Figure (Agg canvas) with ``ncols`` axes side by side."""
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _band(ax, stats: pd.DataFrame, x: str, label: str, color=None, marker: str = "o") -> None:
    line = ax.plot(stats[x], stats["center"], marker=marker, ms=4, label=label, color=color)[0]
    if (stats["n"] > 1).any():
        ax.fill_between(stats[x], stats["low"], stats["high"], alpha=0.2, color=line.get_color(), linewidth=0)


def _at_least_a_decade(ax) -> None:
    """Widen a log y-axis to span at least a factor 10, so that a flat curve looks flat."""
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        center = math.sqrt(low * high)
        ax.set_ylim(center / math.sqrt(10), center * math.sqrt(10))


def _title(fig: Figure, what: str, table: pd.DataFrame, vary: Sequence[str] = ()) -> None:
    chars = int(fig.get_figwidth() * 14)  # ~14 characters per inch at 8.5 pt
    what = textwrap.fill(what, width=chars)  # a long title wraps instead of running off the figure
    fig.suptitle(f"{what}\n{config_caption(table, vary, width=chars)}", fontsize=8.5)


def save_figure(fig: Figure, path: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 110) -> list[Path]:
    """Save ``fig`` as ``path.<format>`` for each of ``formats``; return the files."""
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = stem.parent / f"{stem.name}.{fmt}"  # not with_suffix: names may hold dots (fig5_..._lr0.1)
        fig.savefig(target, dpi=dpi)
        out.append(target)
    return out
