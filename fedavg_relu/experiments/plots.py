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

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedavg_relu.experiments.analysis import (  # noqa: F401 - re-exported: the figure API importers know
    ALWAYS_SHOWN, CELL_COLUMNS, NEVER_SHOWN, NONIID_GROUP, TAU_GROUP, WIDTH_GROUP, Fit, _at_least_a_decade, _band,
    _equal, _fmt, _line_fit, _title, config_caption, config_keys, fit_linear_rate, fit_loglog_slope, new_figure,
    per_cell, save_figure, seed_stats, with_loss_curve,
)
from fedavg_relu.experiments.explanations import explanation_figures


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


# --- the theory figures ------------------------------------------------------------
def _group(table: pd.DataFrame, group: str) -> pd.DataFrame:
    return table[table["group"] == group] if "group" in table else table.iloc[0:0]


def theory_figures(
    metrics: pd.DataFrame,
    cells: pd.DataFrame,
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 110,
    sweep_dir: str | Path | None = None,
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
    paths += explanation_figures(metrics, out_dir, formats, dpi, sweep_dir=sweep_dir)
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
