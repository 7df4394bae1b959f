"""Tests of fedavg_relu.experiments.plots: fits, captions, seed bands and the theory figures from a hand-made table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from _theory_tables import theory_tables

from fedavg_relu.experiments.plots import (
    config_caption,
    fit_linear_rate,
    fit_loglog_slope,
    per_cell,
    plot_loss_curves,
    plot_scaling,
    seed_stats,
    theory_figures,
    with_loss_curve,
)


def test_fit_loglog_slope_recovers_a_power_law():
    """y = 3 x^-1/2 at x = 1, 4, 16 is y = 3, 1.5, 0.75: slope -0.5, intercept log 3, r2 = 1."""
    fit = fit_loglog_slope([1, 4, 16], [3, 1.5, 0.75])
    assert fit.slope == pytest.approx(-0.5)
    assert fit.intercept == pytest.approx(math.log(3))
    assert fit.r2 == pytest.approx(1.0)
    assert fit.n == 3


def test_fit_loglog_slope_drops_non_positive_points():
    """Points with y <= 0 (log undefined) are dropped: y = x^2 at x = 1, 2, 3 plus (4, 0) still gives slope 2."""
    fit = fit_loglog_slope([1, 2, 3, 4], [1, 4, 9, 0])
    assert fit.slope == pytest.approx(2.0)
    assert fit.n == 3


def test_fit_linear_rate_of_a_geometric_sequence():
    """F = 8, 4, 2, 1 at r = 0..3: log F falls by log 2 per round, so rho = exp(slope) = 0.5 and r2 = 1."""
    fit = fit_linear_rate([0, 1, 2, 3], [8, 4, 2, 1])
    assert fit.rate == pytest.approx(0.5)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_linear_rate_ignores_the_numerical_floor():
    """F = 1, 0.1, 0.01, 0 (floor): the zero is dropped, rho = 0.1 from the first three rounds."""
    fit = fit_linear_rate([0, 1, 2, 3], [1, 0.1, 0.01, 0.0])
    assert fit.rate == pytest.approx(0.1)
    assert fit.n == 3


def test_fit_with_a_single_point_is_nan():
    """One point defines no line: slope NaN, n = 1."""
    fit = fit_loglog_slope([2], [3])
    assert math.isnan(fit.slope) and fit.n == 1


def test_seed_stats_mean_and_std_over_seeds():
    """At x=1 the seeds give 1 and 3: mean 2, sample std sqrt(2) (ddof=1), band [2-1.414, 2+1.414]."""
    table = pd.DataFrame({"x": [1, 1, 2], "y": [1.0, 3.0, 5.0]})
    stats = seed_stats(table, "x", "y")
    row = stats[stats["x"] == 1].iloc[0]
    assert row["center"] == pytest.approx(2.0)
    assert row["low"] == pytest.approx(2 - math.sqrt(2))
    assert row["high"] == pytest.approx(2 + math.sqrt(2))
    assert int(row["n"]) == 2
    single = stats[stats["x"] == 2].iloc[0]  # one seed: no spread
    assert (single["low"], single["center"], single["high"]) == (5.0, 5.0, 5.0)


def test_seed_stats_in_log_space():
    """Values 10 and 1000: log10 mean 2, std sqrt(2); center 100, band 10^(2 -+ 1.414)."""
    table = pd.DataFrame({"x": [1, 1], "y": [10.0, 1000.0]})
    row = seed_stats(table, "x", "y", log=True).iloc[0]
    assert row["center"] == pytest.approx(100.0)
    assert row["low"] == pytest.approx(10 ** (2 - math.sqrt(2)))
    assert row["high"] == pytest.approx(10 ** (2 + math.sqrt(2)))


def test_config_caption_names_fixed_and_varied_configuration():
    """Width group: fixed model-family/learning-rate/batch-size shown (full batch as 'full'), widths as a set, 2 seeds."""
    metrics, _ = theory_tables()
    caption = config_caption(metrics[metrics["group"] == "width"], width=1000)
    assert "model-family=paper" in caption
    assert "learning-rate=1" in caption
    assert "batch-size=full" in caption
    assert "dataset=synthetic" in caption
    assert "width ∈ {64, 256, 1024}" in caption
    assert "seeds: 2" in caption
    assert "dirichlet-alpha" not in caption  # irrelevant under partitioner=iid
    assert "save-model" not in caption  # bookkeeping


def test_with_loss_curve_fills_round_zero_from_loss_before():
    """Round 0 has no client measurement: F(W^0) = round 1's loss-before = 0.8**0 = 1."""
    metrics, _ = theory_tables()
    data = with_loss_curve(metrics[metrics["group"] == "width"])
    assert np.allclose(data[data["round"] == 0]["train-objective"], 1.0)
    assert np.allclose(data[data["round"] == 3]["train-objective"], 0.8**3)


def test_per_cell_reducers():
    """tau=4 cell: divergence 0.01*4^1.5 = 0.08 in every round, so first = final = mean = 0.08; global loss final = exp(-0.8)."""
    metrics, _ = theory_tables()
    cells = per_cell(metrics[metrics["cell-id"] == "t4s0"], {"model-divergence": "first", "global-loss": "final",
                                                             "gradient-drift-mean": "mean"})
    row = cells.iloc[0]
    assert row["model-divergence"] == pytest.approx(0.08)
    assert row["global-loss"] == pytest.approx(math.exp(-0.1 * 4 * 2))
    assert row["gradient-drift-mean"] == pytest.approx(2.0)
    assert row["local-steps"] == 4 and row["group"] == "tau"
    with pytest.raises(ValueError, match="reducer 'median'"):
        per_cell(metrics, {"global-loss": "median"})


def test_loss_curve_figure_reports_the_rate_and_the_configuration():
    """F = 0.8^r at every width: each legend entry reads rho=0.800; the title names the setting and the widths."""
    metrics, _ = theory_tables()
    fig = plot_loss_curves(metrics[metrics["group"] == "width"], "width")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == 3 and all("ρ=0.800" in label for label in labels)
    title = fig._suptitle.get_text()
    assert "model-family=paper" in title and "width ∈ {64, 256, 1024}" in title


def test_scaling_figure_legend_carries_the_fitted_slope():
    """distance = 2 m^-1/2: legend 'slope -0.50'; the reference line is labelled with the theory's slope."""
    metrics, _ = theory_tables()
    cells = per_cell(metrics[metrics["group"] == "width"], {"distance-from-init": "final"})
    fig = plot_scaling(cells, "width", ["distance-from-init"], "distance", reference_slope=-0.5)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "distance-from-init: slope -0.50"
    assert labels[1] == "slope -0.5 (theory)"


@pytest.mark.slow
def test_theory_figures_writes_png_and_pdf_for_all_six(tmp_path):
    """The hand-made table has all three groups: 6 figures x (png, pdf) = 12 non-empty files."""
    metrics, cells = theory_tables()
    paths = theory_figures(metrics, cells, tmp_path)
    names = sorted(p.name for p in paths)
    assert len(names) == 12
    for stem in ("fig1_loss_vs_round", "fig2_distance_vs_width", "fig3_flips_vs_width",
                 "fig4_drift_smoothness_vs_width", "fig5_tau_tradeoff", "fig6_central_gap_vs_width"):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names
    assert all(p.stat().st_size > 1000 for p in paths)
    assert (tmp_path / "fig1_loss_vs_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_theory_figures_skip_missing_groups(tmp_path):
    """Only the tau group present: exactly fig5 (png) is drawn."""
    metrics, cells = theory_tables()
    paths = theory_figures(metrics[metrics["group"] == "tau"], cells.iloc[0:0], tmp_path, formats=("png",))
    assert [p.name for p in paths] == ["fig5_tau_tradeoff.png"]


def test_explanation_figures_need_their_data(tmp_path):
    """With ntk-change and flips in the width group (0.1 m^-3/4 and m^-1/2 per round), 7a-7c are drawn; a tau group
    with one step size draws no 5b; with three step sizes it does."""
    from _theory_tables import theory_tables as tables

    from fedavg_relu.experiments.explanations import explanation_figures

    metrics, _ = tables()
    width = metrics["group"] == "width"
    trained = width & (metrics["round"] >= 1)
    metrics.loc[trained, "ntk-change"] = 0.1 * metrics.loc[trained, "width"] ** -0.75 * (1 + 0.01 * metrics.loc[trained, "round"])
    paths = explanation_figures(metrics, tmp_path, formats=("png",))
    assert sorted(p.name for p in paths) == ["fig7a_ntk_change_by_round.png", "fig7b_ntk_change_vs_flips.png",
                                             "fig7c_ntk_slope_by_width_range.png"]
    tau = metrics[metrics["group"] == "tau"]
    grid = pd.concat([tau.assign(**{"learning-rate": lr, "cell-id": tau["cell-id"] + f"-{lr}",
                                    "effective-learning-rate": lr / 8, "effective-smoothness-mean": 8.0})
                      for lr in (0.1, 0.5, 1.0)])
    paths = explanation_figures(grid, tmp_path, formats=("png",))
    assert [p.name for p in paths] == ["fig5b_drift_slope_vs_step_size.png"]
    assert paths[0].stat().st_size > 1000


def test_range_dependence_figure_needs_four_widths(tmp_path):
    """The width group at 64, 256, 1024 plus a copy at 4096 (eta x smoothness 0.5, relative drift 1: slopes 0 over
    64..1024 and 64..4096): fig4c is drawn; with the three widths alone it is not."""
    from fedavg_relu.experiments.explanations import explanation_figures, plot_range_dependence
    from fedavg_relu.experiments.kernel import window_slopes

    metrics, _ = theory_tables()
    width = metrics[metrics["group"] == "width"]
    assert explanation_figures(width, tmp_path, formats=("png",)) == []
    wider = pd.concat([width, width[width["width"] == 1024].assign(width=4096, **{"cell-id": lambda f: f["cell-id"] + "x"})])
    paths = explanation_figures(wider, tmp_path, formats=("png",))
    assert [p.name for p in paths] == ["fig4c_slopes_by_width_range.png"]
    cells = per_cell(wider, {"effective-smoothness-lr-mean": "mean"})
    table = window_slopes(cells, "effective-smoothness-lr-mean", windows=((64, 1024), (64, 4096)))
    assert table["slope"].to_numpy() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert plot_range_dependence(wider).axes[0].get_xscale() == "log"


def test_plot_draws_fig7d_when_the_sweep_folder_has_a_kernel_table(tmp_path):
    """`fedavg-relu plot` (theory_figures with sweep_dir) draws fig7d from the sweep's kernel.csv, and not without one."""
    import shutil
    from pathlib import Path

    from fedavg_relu.experiments.plots import theory_figures
    from fedavg_relu.experiments.sweep import read_tables

    root = Path(__file__).resolve().parents[1] / "results" / "ntk-probes"
    metrics, cells = read_tables(root)
    assert "fig7d_ntk_change_probes.png" in {p.name for p in theory_figures(
        metrics, cells, tmp_path / "a", formats=("png",), dpi=40, sweep_dir=root)}
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("metrics.csv", "cells.csv"):
        if (root / name).exists():
            shutil.copy(root / name, bare / name)
    assert "fig7d_ntk_change_probes.png" not in {p.name for p in theory_figures(
        metrics, cells, tmp_path / "b", formats=("png",), dpi=40, sweep_dir=bare)}
