"""Tests of fedavg_relu.experiments.kernel: prediction 7's decomposition on tables with known laws."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedavg_relu.core.mechanism import ntk_change, ntk_gram
from fedavg_relu.core.models import ReluMLP
from fedavg_relu.experiments.kernel import (
    flip_counts,
    flip_law,
    round_table,
    saturation,
    slope_by_round,
    window_slopes,
)

WIDTHS = (64, 128, 256, 512)


def _rounds(law=lambda f, m: 2 * np.sqrt(f / m), rounds=6) -> pd.DataFrame:
    """Width group rows: flips f = 0.8 m^-1/2 (1 + 0.05 r + 0.03 seed), kernel change = law(f, m)."""
    rows = []
    for m in WIDTHS:
        for seed in (0, 1, 2):
            for r in range(rounds + 1):
                f = 0.8 * m**-0.5 * (1 + 0.05 * r + 0.03 * seed)
                rows.append({"group": "width", "cell-id": f"w{m}s{seed}", "width": m, "seed": seed, "round": r,
                             "ntk-change": law(f, m) if r else 0.0, "activation-flips-init": f if r else 0.0})
    return pd.DataFrame(rows)


def test_round_table_keeps_rounds_from_one():
    """Round 0 (no training yet) is left out: 4 widths x 3 seeds x 6 rounds."""
    table = round_table(_rounds())
    assert len(table) == 4 * 3 * 6 and table["round"].min() == 1


def test_flip_law_recovers_the_random_sign_law():
    """kernel change = 2 sqrt(f / m) exactly: log Δ = log 2 + 1/2 log f - 1/2 log m, so b = 0.5, c = -0.5, r2 = 1.

    f varies within a width (over rounds and seeds) independently of m, so b and c are separately identified;
    every bootstrap draw refits the exact law: the intervals are points.
    """
    law = flip_law(round_table(_rounds()), num_draws=50)
    assert law["b-flips"] == pytest.approx(0.5) and law["c-width"] == pytest.approx(-0.5)
    assert (law["b-low"], law["b-high"]) == pytest.approx((0.5, 0.5))
    assert law["r2"] == pytest.approx(1.0)


def test_flip_law_recovers_proportional_flips():
    """kernel change = 3 f: b = 1, c = 0 (the coherent case)."""
    law = flip_law(round_table(_rounds(lambda f, m: 3 * f)), num_draws=50)
    assert law["b-flips"] == pytest.approx(1.0) and law["c-width"] == pytest.approx(0.0, abs=1e-9)


def test_saturation_and_slope_by_round():
    """Kernel change 0.1 m^-3/4 in every round: ratio last / round 2 = 1, late slope 0, width slope -3/4 each round.

    Flips 0.8 m^-1/2 (1 + 0.05 r + 0.03 seed): at a fixed round the seed factor is the same at every width, so the
    flip slope is -1/2 exactly.
    """
    rounds = round_table(_rounds(lambda f, m: 0.1 * m**-0.75))
    sat = saturation(rounds, early=2)
    assert sat["ratio-last-to-early"].to_numpy() == pytest.approx(np.ones(4))
    assert sat["late-slope-vs-round"].to_numpy() == pytest.approx(np.zeros(4), abs=1e-9)
    by_round = slope_by_round(rounds, (1, 6))
    assert by_round["slope-ntk-change"].to_numpy() == pytest.approx([-0.75, -0.75])
    assert by_round["slope-activation-flips-init"].to_numpy() == pytest.approx([-0.5, -0.5])
    assert by_round["low-ntk-change"].to_numpy() == pytest.approx([-0.75, -0.75])


def test_window_slopes_of_a_power_law():
    """y = m^-0.75 at 64..512: every window of a factor 8 that fits (64-512) gives -0.75; wider ones are skipped."""
    cells = pd.DataFrame([{"width": m, "seed": s, "ntk-change": m**-0.75} for m in WIDTHS for s in (0, 1)])
    table = window_slopes(cells, "ntk-change")
    assert list(table["widths"]) == ["64-512"]
    assert table["slope"].iloc[0] == pytest.approx(-0.75)


def test_flip_counts_and_net_sign():
    """Init [[on, off], [on, on]] -> now [[off, on], [on, on]]: 2 flips of 4 (one on, one off): 0.5, mu = 0.

    Then everything on: 1 flip (on) of 4: 0.25, mu = +1.
    """
    init = [torch.tensor([[True, False], [True, True]])]
    assert flip_counts(init, [torch.tensor([[False, True], [True, True]])]) == (0.5, 0.0)
    assert flip_counts(init, [torch.ones(2, 2, dtype=torch.bool)]) == (0.25, 1.0)


def test_paper_kernel_moves_only_through_flips():
    """paper family, depth 1: Θ(x, x') = <h(x), h(x')> sum_i b_i s_i(x) s_i(x'), with only W_1 trained.

    Doubling W_1 keeps every pre-activation's sign, so no unit flips and Θ does not change at all (the
    change is 0 to float64 rounding), though W_1 moved by ||W_1||. In the ntk family, where the
    output layer is trained too, doubling the hidden layer's input weights doubles h and changes Θ.
    """
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    paper = ReluMLP("paper", 5, 32, 1, 3).double()
    before = ntk_gram(paper, None, x)
    with torch.no_grad():
        paper.hidden[0].weight.mul_(2.0)
    assert ntk_change(ntk_gram(paper, None, x), before) == pytest.approx(0.0, abs=1e-12)
    ntk = ReluMLP("ntk", 5, 32, 1, 3).double()
    before = ntk_gram(ntk, None, x)
    with torch.no_grad():
        ntk.input.weight.mul_(2.0)
    assert ntk_change(ntk_gram(ntk, None, x), before) > 0.1


def test_random_sign_reference_of_one_flip_equals_the_change():
    """One unit flipping is one term: random signs cannot cancel anything, so the reference equals the change.

    Negating row 0 of W_1 flips unit 0 on every probe (its pre-activation changes sign) and moves no other
    unit: ΔΘ = b_0 H ⊙ Δ_0 exactly, and sqrt(b_0² ||H ⊙ Δ_0||²) = ||ΔΘ||.
    """
    from fedavg_relu.experiments.kernel import random_sign_change

    torch.manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(5, 4), dim=1).double()
    model = ReluMLP("paper", 4, 16, 1, 3).double()
    theta0 = ntk_gram(model, None, x)
    s0 = model.forward_with_patterns(x)[1][0]
    with torch.no_grad():
        model.hidden[0].weight[0].neg_()
    s1 = model.forward_with_patterns(x)[1][0]
    change = ntk_change(ntk_gram(model, None, x), theta0)
    assert change > 0
    assert random_sign_change(model, x, s0, s1, theta0) == pytest.approx(change, rel=1e-9)


def test_probe_kernel_row_from_a_saved_run(tmp_path):
    """A run folder with W^0 (from the seed) and a final model whose unit 0 of W_1 is negated.

    Negating row 0 flips unit 0 on every probe and nothing else: the flip fraction is 1/m = 1/16 on both probe
    sets; the held-out change is the kernel change computed directly on the server's probes (the 20 % held-out
    split of 40 synthetic examples: 8); paper at depth 1 also gets the random-sign reference, which for a single
    flipped unit equals the change (one term cannot cancel).
    """
    import json

    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.data import dataset_shape, load_test
    from fedavg_relu.core.models import build_model
    from fedavg_relu.experiments.kernel import probe_kernel_row

    cfg = RunConfig.from_mapping({"dataset": "synthetic", "synthetic-num-examples": 40, "synthetic-input-dim": 8,
                                  "synthetic-num-classes": 3, "model-family": "paper", "width": 16, "depth": 1,
                                  "ntk-probe-size": 64, "seed": 3})
    d, c = dataset_shape(cfg)
    model = build_model(cfg, d, c)
    test_x = load_test(cfg).x.to(torch.float32)
    theta0 = ntk_gram(model, None, test_x)
    with torch.no_grad():
        model.hidden[0].weight[0].neg_()
    expected = ntk_change(ntk_gram(model, None, test_x), theta0)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_mapping()}))
    row = probe_kernel_row(tmp_path)
    assert row["probes/held-out"] == 8 and row["probes/train"] == 32
    assert row["flips/held-out"] == pytest.approx(1 / 16) and row["flips/train"] == pytest.approx(1 / 16)
    assert row["ntk-change/held-out"] == pytest.approx(expected, rel=1e-9)
    assert row["random-sign/held-out"] == pytest.approx(row["ntk-change/held-out"], rel=1e-6)
