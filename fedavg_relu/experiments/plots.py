"""Figures of THEORY.md's predictions, drawn from a sweep's tidy tables.

Input: the per-round table ``metrics.csv`` (and, for the centralized
comparison, the per-cell table ``cells.csv``) written by
:mod:`fedavg_relu.experiments.sweep`, as pandas DataFrames. Every figure's title carries the
configuration that made it: the configuration columns that are constant over
the plotted rows (those that differ from :class:`~fedavg_relu.core.config.RunConfig`'s
defaults, plus the defining ones such as model family, learning rate and τ) and
the values that vary. Error bands are mean ± std over seeds; on a logarithmic
axis they are taken of the log10 values (geometric mean ×/÷ geometric std), so
that a band never crosses zero.

Matplotlib's object API with the Agg canvas is used throughout (no pyplot, no
global backend change), so the module works the same in scripts, tests and
notebooks. This module does not import flwr.

Why this module is longer than most: one function per theory figure, all drawn in one
shared style that would otherwise be scattered.
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


def plot_loss_curves(metrics: pd.DataFrame, hue: str = "width", title: str = "Global loss F(W^r) by round") -> Figure:
    """log F(W^r) against round r, one line (mean ± std over seeds, log scale) per value of ``hue``.

    The legend gives each line's fitted per-round ratio rho (``fit_linear_rate``
    on the seed-mean of log F over rounds 1..R).
    """
    data = with_loss_curve(metrics)
    fig, (ax,) = new_figure(width=6.0, height=4.4)
    for value, frame in data.groupby(hue):
        stats = seed_stats(frame, "round", "train-objective", log=True)
        fit = fit_linear_rate(stats["round"][stats["round"] >= 1], stats["center"][stats["round"] >= 1])
        _band(ax, stats, "round", f"{hue}={_fmt(value)}: ρ={fit.rate:.3f} (r²={fit.r2:.3f})", marker="")
    ax.set_yscale("log")
    ax.set_xlabel("round r")
    ax.set_ylabel("F(W^r) (train, clients' data)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _title(fig, title, data)
    return fig


def plot_scaling(
    cells: pd.DataFrame,
    x: str,
    ys: Sequence[str],
    title: str,
    labels: Mapping[str, str] | None = None,
    logx: bool = True,
    logy: bool = True,
    fit: bool = True,
    reference_slope: float | Mapping[str, float] | None = None,
    ylabel: str | None = None,
    ax_per_y: bool = False,
) -> Figure:
    """Per-cell values of ``ys`` against ``x``: mean ± std over seeds, fitted log-log slopes in the legend.

    ``cells`` has one row per (cell, seed) (e.g. :func:`per_cell` or ``cells.csv``).
    ``reference_slope`` draws a dashed guide line of that slope through the first
    point of the first curve (a mapping ``y -> slope``: through that y's curve).
    ``ax_per_y`` puts each y on its own axes.
    """
    labels = dict(labels or {})
    fig, axes = new_figure(ncols=len(ys) if ax_per_y else 1, width=4.6 if ax_per_y else 5.6, height=4.0)
    for i, y in enumerate(ys):
        ax = axes[i] if ax_per_y else axes[0]
        stats = seed_stats(cells, x, y, log=logy)
        label = labels.get(y, y)
        if fit and logx and logy:
            f = fit_loglog_slope(stats[x], stats["center"])
            label = f"{label}: slope {f.slope:+.2f}"
        _band(ax, stats, x, label)
        ref = reference_slope.get(y) if isinstance(reference_slope, Mapping) else (reference_slope if i == 0 else None)
        if ref is not None and len(stats):
            x0, y0 = float(stats[x].iloc[0]), float(stats["center"].iloc[0])
            xs = np.array([stats[x].min(), stats[x].max()], float)
            ax.plot(xs, y0 * (xs / x0) ** ref, "k--", lw=0.8, label=f"slope {ref:+g} (theory)")
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
            _at_least_a_decade(ax)
        ax.set_xlabel(x)
        ax.set_ylabel(labels.get(y, y) if ax_per_y else (ylabel or ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _title(fig, title, cells)
    return fig


def plot_tau_tradeoff(metrics: pd.DataFrame, title: str = "Local steps τ: communication vs computation") -> Figure:
    """Three panels from a τ sweep: divergence and drift vs τ, loss vs round, loss vs total local steps.

    Left: model divergence Σ p_k‖W_k − W^{r+1}‖², gradient drift and relative
    drift in round 1 (every τ starts that round from the same W^0, so τ is the
    only difference), log-log with fitted slopes. Middle: F(W^r) against rounds
    r. Right: F(W^r) against total local steps r·τ (r >= 1), with the budget
    R·τ_min that every τ reaches marked.
    """
    data = with_loss_curve(metrics)
    cells = per_cell(data, {"model-divergence": "first", "relative-gradient-drift-mean": "first",
                            "gradient-drift-mean": "first"})
    fig, axes = new_figure(ncols=3, width=4.4, height=4.0)
    ax = axes[0]
    for y, label in (("model-divergence", "divergence Σp‖W_k−W‖²"),
                     ("relative-gradient-drift-mean", "relative drift"),
                     ("gradient-drift-mean", "drift ‖∇f_k(W_k)−∇f_k(W)‖")):
        stats = seed_stats(cells, "local-steps", y, log=True)
        f = fit_loglog_slope(stats["local-steps"], stats["center"])
        _band(ax, stats, "local-steps", f"{label}: slope {f.slope:+.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("local steps τ")
    ax.set_title("round 1 (same start W^0 for every τ)", fontsize=8)
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3, which="both")
    data = data.assign(**{"total-local-steps": data["round"] * data["local-steps"]})
    for value, frame in data.groupby("local-steps"):
        for ax, x in ((axes[1], "round"), (axes[2], "total-local-steps")):
            stats = seed_stats(frame if x == "round" else frame[frame["round"] >= 1], x, "train-objective", log=True)
            _band(ax, stats, x, f"τ={value}", marker="." if x != "round" else "")
    budget = int(data["round"].max() * data["local-steps"].min())
    axes[2].axvline(budget, color="k", lw=0.8, ls=":", label=f"budget {budget} steps")
    for ax, label in ((axes[1], "round r"), (axes[2], "total local steps r·τ")):
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("F(W^r)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[2].set_xscale("log")
    _title(fig, title, metrics)
    return fig


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


# --- the theory figures ------------------------------------------------------------
def _group(table: pd.DataFrame, group: str) -> pd.DataFrame:
    return table[table["group"] == group] if "group" in table else table.iloc[0:0]


def theory_figures(
    metrics: pd.DataFrame,
    cells: pd.DataFrame,
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 110,
) -> list[Path]:
    """Draw the six prediction figures of a theory sweep into ``out_dir``; return the files.

    Groups read: ``width`` (predictions 1-4), ``tau`` (5; one figure per
    learning rate), ``non-iid`` (6, needs the sweep's ``central-baseline``). A
    figure whose group is missing is skipped. Then the figures that explain the
    disagreements (:mod:`fedavg_relu.experiments.explanations`): 7a-7c from the width
    group's per-round ``ntk-change``, 5b from a τ group with three or more step sizes.
    """
    out_dir = Path(out_dir)
    paths: list[Path] = []
    width = _group(metrics, WIDTH_GROUP)
    if len(width):
        paths += save_figure(plot_loss_curves(width, "width", "1. Linear convergence: global loss by round"),
                             out_dir / "fig1_loss_vs_round", formats, dpi)
        w = per_cell(width, {"distance-from-init": "final", "relative-distance-from-init": "final",
                             "activation-flips-init": "final", "activation-flips-local": "mean",
                             "relative-gradient-drift-mean": "mean", "gradient-drift-mean": "mean",
                             "effective-smoothness-mean": "mean", "effective-smoothness-lr-mean": "mean"})
        paths += save_figure(plot_scaling(
            w, "width", ["distance-from-init", "relative-distance-from-init"],
            "2. Distance from initialization ‖W^R − W^0‖ at the last round vs width",
            labels={"distance-from-init": "‖W^R − W^0‖", "relative-distance-from-init": "‖W^R − W^0‖ / ‖W^0‖"},
            reference_slope=-0.5, ylabel="distance"), out_dir / "fig2_distance_vs_width", formats, dpi)
        paths += save_figure(plot_scaling(
            w, "width", ["activation-flips-init", "activation-flips-local"],
            "3. ReLU activation flips vs width",
            labels={"activation-flips-init": "flips W^R vs W^0 (last round)",
                    "activation-flips-local": "flips W_k vs W^{r+1} (mean over rounds)"},
            ylabel="fraction of (example, neuron)"), out_dir / "fig3_flips_vs_width", formats, dpi)
        paths += save_figure(plot_scaling(
            w, "width", ["relative-gradient-drift-mean", "effective-smoothness-mean", "effective-smoothness-lr-mean"],
            "4. Gradient drift and effective smoothness vs width (means over rounds)",
            labels={"relative-gradient-drift-mean": "relative drift ‖Δ∇f_k‖/‖∇f_k(W)‖",
                    "effective-smoothness-mean": "effective smoothness ‖Δ∇f_k‖/‖ΔW‖",
                    "effective-smoothness-lr-mean": "η × effective smoothness"},
            ax_per_y=True), out_dir / "fig4_drift_smoothness_vs_width", formats, dpi)
        paths += _mechanism_figures(width, out_dir, formats, dpi)
    tau = _group(metrics, TAU_GROUP)
    rates = sorted(tau["learning-rate"].unique()) if len(tau) else []
    for lr in rates:  # one figure per learning rate (a suffix when there are several)
        name = "fig5_tau_tradeoff" + (f"_lr{lr:g}" if len(rates) > 1 else "")
        paths += save_figure(plot_tau_tradeoff(tau[tau["learning-rate"] == lr],
                                               f"5. Local steps τ: divergence, drift and loss (η̃={lr:g})"),
                             out_dir / name, formats, dpi)
    noniid = _group(cells, NONIID_GROUP)
    if len(noniid) and "central-distance" in noniid:
        paths += save_figure(plot_scaling(
            noniid, "width", ["central-distance", "central-distance-relative", "loss-gap"],
            "6. FedAvg vs centralized GD (same W^0, same total steps) under a non-IID partition, last round",
            labels={"central-distance": "‖W_fed − W_central‖",
                    "central-distance-relative": "‖W_fed − W_central‖ / ‖W_fed − W^0‖",
                    "loss-gap": "F(W_fed) − F(W_central)"},
            reference_slope={"central-distance": -0.5}, ax_per_y=True), out_dir / "fig6_central_gap_vs_width", formats, dpi)
    from fedavg_relu.experiments.explanations import explanation_figures  # it builds on this module

    paths += explanation_figures(metrics, out_dir, formats, dpi)
    return paths


def _has(table: pd.DataFrame, column: str) -> bool:
    return column in table and pd.to_numeric(table[column], errors="coerce").notna().any()


def _mechanism_figures(width: pd.DataFrame, out_dir: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    """Issue 14's figures, drawn when the width group recorded them (``drift-nonlinear``, ``ntk-probe-size`` > 0).

    fig4b: the nonlinear drift fraction (mean over rounds of its p-weighted mean,
    and of its max over clients) vs width; fig7: ``ntk-change`` at the last round vs
    width with the lazy-training slope −1/2 as a guide.
    """
    paths: list[Path] = []
    cells = per_cell(width, {"nonlinear-drift-fraction-mean": "mean", "nonlinear-drift-fraction-max": "mean",
                             "ntk-change": "final"})
    if _has(width, "nonlinear-drift-fraction-mean"):
        paths += save_figure(plot_scaling(
            cells, "width", ["nonlinear-drift-fraction-mean", "nonlinear-drift-fraction-max"],
            "4b. Nonlinear part of the gradient drift ‖Δg − (1/n)JᵀJΔW‖/‖Δg‖ vs width (means over rounds)",
            labels={"nonlinear-drift-fraction-mean": "p-weighted mean over clients",
                    "nonlinear-drift-fraction-max": "max over clients"},
            ylabel="nonlinear fraction of the drift"), out_dir / "fig4b_nonlinear_drift_vs_width", formats, dpi)
    if _has(width, "ntk-change"):
        paths += save_figure(plot_scaling(
            cells, "width", ["ntk-change"],
            "7. Tangent kernel change ‖Θ(W^R) − Θ(W^0)‖_F/‖Θ(W^0)‖_F at the last round vs width (held-out probes)",
            labels={"ntk-change": "relative NTK change"}, reference_slope=-0.5, ylabel="relative NTK change"),
            out_dir / "fig7_ntk_change_vs_width", formats, dpi)
    return paths
