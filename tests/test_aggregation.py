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
    """x = 1, c = 0; y = (3, 5), dc = (2, 4), n = (1, 3) -> p = (1/4, 3/4); 2 of N = 4 clients sampled.

    x_new = 1 + (1/4 * 2 + 3/4 * 4) = 1 + 3.5 = 4.5 (= sum p_k y_k with eta_g = 1);
    c_new = 0 + (2 / 4) * (1/4 * 2 + 3/4 * 4) = 0.5 * 3.5 = 1.75.
    """
    x, c = {"w": np.array([1.0])}, {"w": np.array([0.0])}
    new_x, new_c = scaffold_server_update(
        x, c, [{"w": np.array([3.0])}, {"w": np.array([5.0])}], [{"w": np.array([2.0])}, {"w": np.array([4.0])}],
        [1, 3], num_clients_total=4,
    )
    assert new_x["w"][0] == pytest.approx(4.5)
    assert new_c["w"][0] == pytest.approx(1.75)
