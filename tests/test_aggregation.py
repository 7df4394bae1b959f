"""Tests of fedavg_relu/core/aggregation.py (FedNova, SCAFFOLD update rules) on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest

from fedavg_relu.core.aggregation import (
    fednova_average,
    fednova_normalizer,
    scaffold_client_control,
    scaffold_server_update,
)


def test_fednova_equal_steps_is_fedavg():
    """tau_k = 3 for all: x - 3 * sum p_k (x - y_k) / 3 = sum p_k y_k (FedAvg), p = (1/4, 3/4)."""
    x = {"w": np.array([1.0, 2.0], np.float32)}
    ys = [{"w": np.array([0.0, 0.0], np.float32)}, {"w": np.array([4.0, 4.0], np.float32)}]
    out = fednova_average(x, ys, [10, 30], [3, 3])
    np.testing.assert_allclose(out["w"], 0.25 * ys[0]["w"] + 0.75 * ys[1]["w"], rtol=1e-7)


def test_fednova_unequal_steps_hand_case():
    """x = 0, y_1 = -2 after tau_1 = 2 steps, y_2 = -4 after tau_2 = 8 steps, p = (1/2, 1/2).

    d = 1/2 * (0 - (-2)) / 2 + 1/2 * (0 - (-4)) / 8 = 0.5 + 0.25 = 0.75; tau_eff = 1/2 * 2 + 1/2 * 8 = 5;
    x_new = 0 - 5 * 0.75 = -3.75, while FedAvg gives (-2 - 4) / 2 = -3.
    """
    x = {"w": np.array([0.0])}
    out = fednova_average(x, [{"w": np.array([-2.0])}, {"w": np.array([-4.0])}], [5, 5], [2, 8])
    assert out["w"][0] == pytest.approx(-3.75)


def test_fednova_normalizer_with_momentum():
    """rho = 0.5, tau = 2: a = (2 - 0.5 (1 - 0.25) / 0.5) / 0.5 = (2 - 0.75) / 0.5 = 2.5.

    Check: heavy ball with constant g gives steps g, 1.5 g -> total 2.5 g.
    """
    assert fednova_normalizer(2, 0.5) == pytest.approx(2.5)
    assert fednova_normalizer(7, 0.0) == 7.0


def test_scaffold_client_control_option_ii():
    """c_k+ = c_k - c + (x - y) / (tau eta): c_k = 1, c = 3, x = 5, y = 3, tau = 2, eta = 0.5 -> 1 - 3 + 2/1 = 0."""
    out = scaffold_client_control({"w": np.array([1.0])}, {"w": np.array([3.0])}, {"w": np.array([5.0])},
                                  {"w": np.array([3.0])}, local_steps=2, learning_rate=0.5)
    assert out["w"][0] == pytest.approx(0.0)


def test_scaffold_server_update_hand_case():
    """x = 1, c = 0; y = (3, 5), dc = (2, 4), n = (1, 3); 2 of N = 4 clients sampled, all 4 hold n = 8 examples.

    examples: p = (1/4, 3/4): x_new = 1 + (1/4 * 2 + 3/4 * 4) = 4.5 (= sum p_k y_k with eta_g = 1);
              c_new = 0 + (1/8 * 2 + 3/8 * 4) = 1.75 (each dc_k weighted n_k / n over all clients).
    uniform:  x_new = 1 + (2 + 4) / 2 = 4;  c_new = 0 + (2 + 4) / 4 = 1.5 (the paper's 1/|S| and 1/N).
    """
    x, c = {"w": np.array([1.0])}, {"w": np.array([0.0])}
    ys, dcs = [{"w": np.array([3.0])}, {"w": np.array([5.0])}], [{"w": np.array([2.0])}, {"w": np.array([4.0])}]
    new_x, new_c = scaffold_server_update(x, c, ys, dcs, [1, 3], num_clients_total=4, total_examples=8)
    assert new_x["w"][0] == pytest.approx(4.5)
    assert new_c["w"][0] == pytest.approx(1.75)
    new_x, new_c = scaffold_server_update(x, c, ys, dcs, [1, 3], num_clients_total=4, weighting="uniform")
    assert (new_x["w"][0], new_c["w"][0]) == (pytest.approx(4.0), pytest.approx(1.5))
    with pytest.raises(ValueError, match="total_examples=None"):
        scaffold_server_update(x, c, ys, dcs, [1, 3], num_clients_total=4)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_scaffold_control_stays_the_average_of_the_client_controls_under_partial_participation(weighting):
    """3 clients (n = 1, 2, 3), 2 sampled per round for 6 rounds, random dc_k: after every round
    c == sum_k w_k c_k with w = n / 6 (examples) or 1/3 (uniform), to 1e-12.

    Each round c_k += dc_k for the sampled k only, and the server adds its weighted sum of the dc_k;
    both sides start at 0, so the invariant holds by induction when the server's weights are w_k.
    The old rule (|S|/N) * sum_S (n_k/n_S) dc_k weights client k by (2/3) n_k / n_S, not n_k / 6.
    """
    rng = np.random.default_rng(3)
    n = np.array([1, 2, 3])
    w = n / n.sum() if weighting == "examples" else np.full(3, 1 / 3)
    x = {"w": np.zeros(4)}
    c = {"w": np.zeros(4)}
    ck = np.zeros((3, 4))
    for _ in range(6):
        sampled = sorted(rng.choice(3, size=2, replace=False))
        dcs = [rng.standard_normal(4) for _ in sampled]
        for k, dc in zip(sampled, dcs, strict=True):
            ck[k] += dc
        x, c = scaffold_server_update(x, c, [{"w": rng.standard_normal(4)} for _ in sampled], [{"w": d} for d in dcs],
                                      [int(n[k]) for k in sampled], num_clients_total=3, weighting=weighting,
                                      total_examples=6)
        np.testing.assert_allclose(c["w"], w @ ck, rtol=0, atol=1e-12)
