"""Figures that explain the predictions table's disagreements (issue 23): one per explanation.

Drawn by :func:`fedavg_relu.experiments.plots.theory_figures` (``fedavg-relu plot``) from a
sweep's tables when they hold what each needs: the width group's per-round ``ntk-change``
(prediction 7: :func:`plot_ntk_rounds`, :func:`plot_ntk_flips`, :func:`plot_ntk_windows`) and a
τ group with at least three step sizes (prediction 5: :func:`plot_tau_stepsize`); the width
group's η × smoothness and drift slopes over growing ranges of widths (prediction 4's range
dependence: :func:`plot_range_dependence`). The figure of
the two probe sets (:func:`plot_ntk_probes`) reads ``kernel.csv`` of
:mod:`fedavg_relu.experiments.kernel`, which writes it. Intervals in these figures draw seeds
only (the tables of ``clients.csv`` are not read here); the rendered tables draw clients too.

This module does not import flwr.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from fedavg_relu.experiments import kernel, stepsize
from fedavg_relu.experiments.kernel import plot_ntk_probes  # noqa: F401 - one figure per explanation, listed here
from fedavg_relu.experiments.analysis import _band, _title, fit_loglog_slope, new_figure, per_cell, save_figure, seed_stats


def _yerr(center, low, high) -> np.ndarray:
    """Error-bar lengths below and above ``center`` (0 where a percentile end lies on the other side of it)."""
    center, low, high = (np.asarray(v, float) for v in (center, low, high))
    return np.vstack([np.maximum(center - low, 0.0), np.maximum(high - center, 0.0)])


def plot_ntk_rounds(metrics: pd.DataFrame) -> Figure:
    """Left: ``ntk-change`` by round, one band per width. Right: its width slope at each round (95 % interval)."""
    rounds = kernel.round_table(metrics)
    fig, (left, right) = new_figure(ncols=2, width=5.0, height=4.2)
    for width, frame in rounds.groupby("width"):
        _band(left, seed_stats(frame, "round", "ntk-change", log=True), "round", f"m={int(width)}", marker="")
    left.set_yscale("log")
    left.set_xlabel("round r")
    left.set_ylabel("relative kernel change (held-out probes)")
    left.legend(fontsize=7, ncol=2)
    by_round = kernel.slope_by_round(rounds, tuple(sorted(int(r) for r in rounds["round"].unique())))
    for y, label in (("ntk-change", "kernel change"), ("activation-flips-init", "flips vs W^0")):
        err = _yerr(by_round[f"slope-{y}"], by_round[f"low-{y}"], by_round[f"high-{y}"])
        right.errorbar(by_round["round"], by_round[f"slope-{y}"], yerr=err, marker="o", ms=3, capsize=2, label=label)
    right.axhspan(-0.7, -0.3, color="g", alpha=0.1, label="prediction 7's band")
    right.axhline(-0.75, color="k", ls="--", lw=0.8, label="flip law: (−1/2 − 1)/2 = −3/4")
    right.set_xlabel("round r")
    right.set_ylabel("slope vs width (95 %, seeds)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    _title(fig, "7a. Does the kernel stop moving? Kernel change by round, and its width slope at each round", metrics)
    return fig


def plot_ntk_flips(metrics: pd.DataFrame) -> Figure:
    """Left: ``ntk-change`` against the flips vs W^0, every (cell, round). Right: ``ntk-change / sqrt(flips / m)``."""
    rounds = kernel.round_table(metrics)
    law = kernel.flip_law(rounds)
    fig, (left, right) = new_figure(ncols=2, width=5.0, height=4.2)
    cmap = colormaps["viridis"]
    widths = sorted(rounds["width"].unique())
    for i, width in enumerate(widths):
        frame = rounds[rounds["width"] == width]
        color = cmap(i / max(1, len(widths) - 1))
        left.scatter(frame["activation-flips-init"], frame["ntk-change"], s=5, color=color, label=f"m={int(width)}")
        scaled = frame.assign(ratio=frame["ntk-change"] / np.sqrt(frame["activation-flips-init"] / frame["width"]))
        _band(right, seed_stats(scaled, "round", "ratio", log=True), "round", f"m={int(width)}", color=color, marker="")
    for ax in (left,):
        ax.set_xscale("log")
        ax.set_yscale("log")
    right.set_yscale("log")
    left.set_xlabel("activation flips vs W^0 (training data)")
    left.set_ylabel("kernel change (held-out probes)")
    left.set_title(f"fit log Δ = a + b log flips + c log m: b = {law['b-flips']:.2f} [{law['b-low']:.2f}, {law['b-high']:.2f}],"
                   f" c = {law['c-width']:.2f} [{law['c-low']:.2f}, {law['c-high']:.2f}]\nrandom-sign flips: b = 1/2, c = −1/2;"
                   " flips of one sign: b = 1, c = 0", fontsize=7.5)
    right.set_xlabel("round r")
    right.set_ylabel("kernel change / √(flips / m)")
    right.set_title("flat in r and m when Δ ∝ √(flips / m)", fontsize=7.5)
    left.legend(fontsize=7, ncol=2, markerscale=2)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    _title(fig, "7b. Is the kernel change proportional to the flips? (every cell and round of the width group)", metrics)
    return fig


def plot_ntk_windows(metrics: pd.DataFrame) -> Figure:
    """Width slopes of the final ``ntk-change`` and flips over sub-ranges of widths, with 95 % intervals."""
    cells = kernel.width_cells(metrics)
    fig, (ax,) = new_figure(width=6.4, height=4.2)
    for shift, (y, label) in enumerate((("ntk-change", "kernel change"), ("activation-flips-init", "flips vs W^0"))):
        table = kernel.window_slopes(cells, y)
        xs = np.arange(len(table)) + 0.1 * (shift - 0.5)
        ax.errorbar(xs, table["slope"], yerr=_yerr(table["slope"], table["low"], table["high"]),
                    fmt="o", ms=4, capsize=3, label=label)
        if y == "activation-flips-init":
            ax.scatter(xs + 0.1, (table["slope"] - 1) / 2, marker="x", color="k", label="flip law: (flip slope − 1)/2")
    ax.set_xticks(np.arange(len(table)), table["widths"], rotation=20, fontsize=7)
    ax.axhspan(-0.7, -0.3, color="g", alpha=0.1, label="prediction 7's band")
    ax.set_xlabel("widths fitted")
    ax.set_ylabel("slope vs width, last round (95 %, seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _title(fig, "7c. Is the slope anchored by the small widths? Slopes over sub-ranges of widths", metrics)
    return fig


def plot_tau_stepsize(metrics: pd.DataFrame) -> Figure:
    """Left: round-1 drift vs τ per η̃. Right: the local drift slopes against η τ L̂, the theorem's range marked."""
    local = stepsize.local_slopes(metrics)
    cells = stepsize.first_round_cells(metrics)
    smooth = stepsize.measured_smoothness(cells)
    fig, (left, right) = new_figure(ncols=2, width=5.0, height=4.2)
    for lr, frame in cells.groupby("learning-rate"):
        stats = seed_stats(frame, "local-steps", "gradient-drift-mean", log=True)
        fit = fit_loglog_slope(stats["local-steps"], stats["center"])
        _band(left, stats, "local-steps", f"η̃={lr:g}: slope {fit.slope:+.2f}")
        sub = local[local["learning-rate"] == lr]
        right.errorbar(sub["eta-tau-L"], sub["slope"], yerr=_yerr(sub["slope"], sub["low"], sub["high"]),
                       fmt="o", ms=4, capsize=2, label=f"η̃={lr:g}")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("local steps τ")
    left.set_ylabel("round-1 gradient drift (mean over clients)")
    left.legend(fontsize=7)
    right.set_xscale("log")
    right.axvline(stepsize.RANGE_CONSTANT, color="k", ls="--", lw=0.8, label=f"η τ L̂ = {stepsize.RANGE_CONSTANT:g}")
    right.axvspan(right.get_xlim()[0], stepsize.RANGE_CONSTANT, color="g", alpha=0.08, label="theorem's range η ≤ 1/(τ L̂)")
    right.axhline(0, color="k", lw=0.6)
    right.set_xlabel(f"η · τ_high · L̂   (L̂ = {smooth:.1f}, measured)")
    right.set_ylabel("drift slope, τ_low → τ_high (95 %, seeds)")
    right.set_title("L̂: round-1 effective smoothness of the gentlest cell (smallest η̃ τ)", fontsize=7.5)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    _title(fig, "5b. Where the drift stops growing with τ, against the step-size range η ≲ c/(τ L)", metrics)
    return fig


def plot_range_dependence(metrics: pd.DataFrame) -> Figure:
    """Prediction 4's η × smoothness slope (and the other judged width slopes) over widths 64..M for growing M,
    95 % intervals over seeds, against the rule's bounds."""
    cells = per_cell(metrics, {"effective-smoothness-lr-mean": "mean", "relative-gradient-drift-mean": "mean",
                               "nonlinear-drift-fraction-mean": "mean"})
    widths = sorted(int(w) for w in cells["width"].unique())
    lowest = widths[0]
    fig, (ax,) = new_figure(width=6.4, height=4.2)
    for shift, (y, label, bounds) in enumerate((
            ("effective-smoothness-lr-mean", "η × smoothness (rule: within ±0.15)", (-0.15, 0.15)),
            ("relative-gradient-drift-mean", "relative drift (rule: > −0.15)", (-0.15,)))):
        table = kernel.window_slopes(cells, y, windows=tuple((lowest, w) for w in widths[3:]))
        if not len(table):
            continue
        highs = [int(w.split("-")[1]) for w in table["widths"]]
        xs = np.array(highs, float) * 2 ** (0.06 * (shift - 0.5))
        line = ax.errorbar(xs, table["slope"], yerr=_yerr(table["slope"], table["low"], table["high"]), fmt="o", ms=4,
                           capsize=3, label=label)
        for bound in bounds:
            ax.axhline(bound, color=line[0].get_color(), ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"widest width M of the fit (widths {lowest}..M)")
    ax.set_ylabel("slope vs width (95 %, seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _title(fig, "4c. Does the verdict depend on the width range? Prediction 4's slopes over widths 64..M", metrics)
    return fig


def explanation_figures(metrics: pd.DataFrame, out_dir: str | Path, formats: Sequence[str] = ("png", "pdf"),
                        dpi: int = 110, sweep_dir: str | Path | None = None) -> list[Path]:
    """The figures whose data ``metrics`` holds (see the module docstring); return the files.

    With ``sweep_dir`` holding a ``kernel.csv`` (written by ``python -m fedavg_relu.experiments.kernel``),
    also fig7d, the two probe sets.
    """
    out_dir = Path(out_dir)
    paths: list[Path] = []
    kernel_table = Path(sweep_dir) / "kernel.csv" if sweep_dir is not None else None
    if kernel_table is not None and kernel_table.exists():
        longest = metrics[metrics["num-server-rounds"] == metrics.groupby("group")["num-server-rounds"].transform("max")]
        paths += save_figure(plot_ntk_probes(pd.read_csv(kernel_table), longest), out_dir / "fig7d_ntk_change_probes",
                             formats, dpi)
    width = metrics[metrics["group"] == "width"] if "group" in metrics else metrics.iloc[0:0]
    if len(width) and "ntk-change" in width and width["ntk-change"].notna().any():
        paths += save_figure(plot_ntk_rounds(width), out_dir / "fig7a_ntk_change_by_round", formats, dpi)
        paths += save_figure(plot_ntk_flips(width), out_dir / "fig7b_ntk_change_vs_flips", formats, dpi)
        paths += save_figure(plot_ntk_windows(width), out_dir / "fig7c_ntk_slope_by_width_range", formats, dpi)
    if len(width) and "effective-smoothness-lr-mean" in width and width["width"].nunique() >= 4:
        paths += save_figure(plot_range_dependence(width), out_dir / "fig4c_slopes_by_width_range", formats, dpi)
    tau = metrics[metrics["group"] == "tau"] if "group" in metrics else metrics.iloc[0:0]
    if len(tau) and tau["learning-rate"].nunique() >= 3:
        paths += save_figure(plot_tau_stepsize(tau), out_dir / "fig5b_drift_slope_vs_step_size", formats, dpi)
    return paths
