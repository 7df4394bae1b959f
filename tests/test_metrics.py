"""Tests of fedavg_relu/core/metrics.py against hand-derivable computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.metrics import (
    ClientDrift,
    distances_from_init,
    flip_fraction,
    measure_client_drift,
    squared_distance,
    summarize_drift,
)
from fedavg_relu.core.models import ReluMLP, build_model, get_trainable, set_trainable


def _drift(n, dist, drift, gnorm, flips_local=0.0, flips_init=0.0, loss_g=1.0, loss_l=0.5, lnorm=1.0):
    return ClientDrift(n, loss_g, loss_l, gnorm, lnorm, drift, dist, flips_local, flips_init)


def test_distances_from_init_per_layer_and_total():
    """W0 = {a: [3, 4], b: [[1, 0], [0, 0]]}, W = {a: [0, 0], b: [[1, 2], [0, 0]]}.

    ||a - a0|| = 5, ||a0|| = 5 -> rel 1;  ||b - b0|| = 2, ||b0|| = 1 -> rel 2;
    total = sqrt(25 + 4) = sqrt(29), relative = sqrt(29 / (25 + 1)).
    """
    w0 = {"a": np.array([3.0, 4.0]), "b": np.array([[1.0, 0.0], [0.0, 0.0]])}
    w = {"a": np.array([0.0, 0.0]), "b": np.array([[1.0, 2.0], [0.0, 0.0]])}
    out = distances_from_init(w, w0)
    assert out["distance-from-init/a"] == pytest.approx(5.0)
    assert out["relative-distance-from-init/a"] == pytest.approx(1.0)
    assert out["distance-from-init/b"] == pytest.approx(2.0)
    assert out["relative-distance-from-init/b"] == pytest.approx(2.0)
    assert out["distance-from-init"] == pytest.approx(math.sqrt(29))
    assert out["relative-distance-from-init"] == pytest.approx(math.sqrt(29 / 26))


def test_relative_distance_of_zero_initialised_layer_is_nan():
    """A bias initialised to 0 has no relative distance: NaN, not a division error."""
    out = distances_from_init({"bias": np.array([1.0])}, {"bias": np.array([0.0])})
    assert out["distance-from-init/bias"] == 1.0
    assert math.isnan(out["relative-distance-from-init/bias"])


def test_squared_distance_and_name_mismatch():
    """||(1,2)-(0,0)||^2 + ||3-1||^2 = 1 + 4 + 4 = 9; different names raise."""
    assert squared_distance({"x": np.array([1.0, 2.0]), "y": np.array(3.0)}, {"x": np.zeros(2), "y": np.array(1.0)}) == 9.0
    with pytest.raises(ValueError, match="names differ"):
        squared_distance({"x": np.zeros(1)}, {"z": np.zeros(1)})


def test_summarize_drift_weighted_means_and_max():
    """Three clients, n = (1, 1, 2) -> p = (.25, .25, .5).

    distances (1, 2, 0.5): divergence = .25*1 + .25*4 + .5*.25 = 1.375, max 2.
    drift (2, 2, 1), grad norms (4, 1, 2): drift mean = .5 + .5 + .5 = 1.5, max 2;
    relative = (0.5, 2, 0.5): mean = .125 + .5 + .25 = .875, max 2.
    smoothness = drift/dist = (2, 1, 2): mean = .5 + .25 + 1 = 1.75, max 2; times lr 0.1.
    flips local (0.1, 0.2, 0.0): pooled = .025 + .05 = .075.
    global loss (1, 2, 3): .25 + .5 + 1.5 = 2.25.
    """
    drifts = [
        _drift(1, 1.0, 2.0, 4.0, flips_local=0.1, loss_g=1.0),
        _drift(1, 2.0, 2.0, 1.0, flips_local=0.2, loss_g=2.0),
        _drift(2, 0.5, 1.0, 2.0, flips_local=0.0, loss_g=3.0),
    ]
    out = summarize_drift(drifts, learning_rate=0.1)
    assert out["model-divergence"] == pytest.approx(1.375)
    assert out["model-divergence-max"] == pytest.approx(2.0)
    assert out["gradient-drift-mean"] == pytest.approx(1.5)
    assert out["gradient-drift-max"] == pytest.approx(2.0)
    assert out["relative-gradient-drift-mean"] == pytest.approx(0.875)
    assert out["relative-gradient-drift-max"] == pytest.approx(2.0)
    assert out["effective-smoothness-mean"] == pytest.approx(1.75)
    assert out["effective-smoothness-max"] == pytest.approx(2.0)
    assert out["effective-smoothness-lr-mean"] == pytest.approx(0.175)
    assert out["activation-flips-local"] == pytest.approx(0.075)
    assert out["global-loss"] == pytest.approx(2.25)
    assert "gradient-dissimilarity" not in out


def test_gradient_dissimilarity_equals_numpy():
    """g1 = (1, 0), g2 = (0, 2), p = (.5, .5).

    numerator = .5*1 + .5*4 = 2.5; mean gradient = (.5, 1), ||.||^2 = 1.25; ratio = 2.
    """
    g = [np.array([1.0, 0.0]), np.array([0.0, 2.0])]
    p = np.array([0.5, 0.5])
    mean_sq = float(np.sum((p[0] * g[0] + p[1] * g[1]) ** 2))
    drifts = [_drift(3, 1.0, 1.0, float(np.linalg.norm(g[0]))), _drift(3, 1.0, 1.0, float(np.linalg.norm(g[1])))]
    out = summarize_drift(drifts, 1.0, mean_global_gradient_sq=mean_sq)
    assert mean_sq == pytest.approx(1.25)
    assert out["gradient-dissimilarity"] == pytest.approx(2.0)


def test_flip_fraction_counts_differing_states():
    """Layer 1: 1 of 4 entries differ; layer 2: 2 of 2 differ -> 3 / 6 = 0.5."""
    a = [torch.tensor([[True, False], [True, True]]), torch.tensor([[True, False]])]
    b = [torch.tensor([[True, False], [False, True]]), torch.tensor([[False, True]])]
    assert flip_fraction(a, b) == pytest.approx(0.5)
    assert flip_fraction(a, a) == 0.0


def test_activation_flips_on_hand_built_network():
    """Standard family, d=2, m=3, one hidden layer, no bias; inputs x1=(1,0), x2=(0,1).

    W_k rows: (1, 1), (-1, 1), (1, -1)  -> pre-acts x1: (1, -1, 1), x2: (1, 1, -1)
    W̄  rows: (1, 1), (1, 1), (-1, -1)   -> pre-acts x1: (1, 1, -1), x2: (1, 1, -1)
    on/off W_k: x1 (T, F, T), x2 (T, T, F); W̄: x1 (T, T, F), x2 (T, T, F)
    differing: x1 neurons 2 and 3 -> 2 of 6 = 1/3.
    """
    torch.manual_seed(0)
    model = ReluMLP("standard", 2, 3, 1, 2)
    with torch.no_grad():
        model.input.bias.zero_()
    base = get_trainable(model)
    local = dict(base, **{"input.weight": np.array([[1, 1], [-1, 1], [1, -1]], np.float32)})
    avg = dict(base, **{"input.weight": np.array([[1, 1], [1, 1], [-1, -1]], np.float32)})
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    drift, _ = measure_client_drift(model, local, avg, x, y, "squared", init_patterns=None)
    assert drift.flips_local == pytest.approx(1 / 3)
    assert math.isnan(drift.flips_init)


def test_effective_smoothness_where_no_activation_changes():
    """Paper family, depth 1: f(W) = 1/(2n) sum_i ||B D_i W h_i - e_{y_i}||^2, h_i = relu(A x_i).

    While no pattern D_i changes, grad f(W) = 1/n sum_i D_i B^T (B D_i W h_i - e_i) h_i^T is
    affine in W, so grad f(W_k) - grad f(W̄) = H(ΔW) = 1/n sum_i D_i B^T B D_i ΔW h_i h_i^T,
    ΔW = W_k - W̄; the effective smoothness is ||H(ΔW)|| / ||ΔW|| (computed below in numpy).
    A tiny ΔW keeps every pre-activation's sign (checked: flips_local == 0).
    """
    cfg = RunConfig(model_family="paper", width=32, depth=1, seed=3)
    model = build_model(cfg, 4, 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    avg = get_trainable(model)
    rng = np.random.default_rng(0)
    delta = (1e-4 * rng.standard_normal(avg["hidden.0.weight"].shape)).astype(np.float32)
    local = {"hidden.0.weight": avg["hidden.0.weight"] + delta}
    drift, _ = measure_client_drift(model, local, avg, x, y, "squared")
    assert drift.flips_local == 0.0

    a = model.input.weight.detach().double().numpy()
    b = model.output.weight.detach().double().numpy()
    w = avg["hidden.0.weight"].astype(np.float64)
    h = np.maximum(x.double().numpy() @ a.T, 0)  # (n, m)
    dw = local["hidden.0.weight"].astype(np.float64) - w  # the float32 difference actually applied
    hess = np.zeros_like(w)
    for i in range(len(h)):
        d = (w @ h[i] > 0).astype(np.float64)
        hess += (d[:, None] * (b.T @ b) * d[None, :]) @ dw @ np.outer(h[i], h[i])
    hess /= len(h)
    expected = np.linalg.norm(hess) / np.linalg.norm(dw)
    assert drift.param_distance == pytest.approx(np.linalg.norm(dw), rel=1e-5)
    assert drift.gradient_drift / drift.param_distance == pytest.approx(expected, rel=2e-3)


def test_measure_client_drift_zero_when_local_equals_average():
    """W_k = W̄: drift, distance and flips are exactly 0; gradient norms equal."""
    cfg = RunConfig(model_family="standard", width=16, depth=2, seed=0)
    model = build_model(cfg, 5, 3)
    params = get_trainable(model)
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 3
    drift, grad = measure_client_drift(model, params, params, x, y, "cross-entropy")
    assert drift.gradient_drift == 0.0
    assert drift.param_distance == 0.0
    assert drift.flips_local == 0.0
    assert drift.grad_norm_global == pytest.approx(drift.grad_norm_local)
    assert drift.grad_norm_global == pytest.approx(math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grad.values())))


def test_client_drift_metrics_round_trip():
    """to_metrics/from_metrics are inverse; a missing key is named."""
    d = _drift(7, 1.0, 2.0, 3.0, 0.25, 0.5)
    assert ClientDrift.from_metrics(d.to_metrics()) == d
    metrics = d.to_metrics()
    del metrics["gradient-drift"]
    with pytest.raises(KeyError, match="gradient-drift"):
        ClientDrift.from_metrics(metrics)


def test_measured_gradient_matches_autograd_on_copy():
    """The returned gradient at W̄ equals torch.autograd.grad of the mean loss on an independent copy."""
    cfg = RunConfig(model_family="ntk", width=8, depth=1, seed=5)
    model = build_model(cfg, 3, 2)
    other = build_model(cfg, 3, 2)
    params = get_trainable(model)
    local = {k: v + 0.01 for k, v in params.items()}
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 0, 1, 1])
    _, grad = measure_client_drift(model, local, params, x, y, "squared")
    set_trainable(other, params)
    out = other(x)
    loss = 0.5 * ((out - torch.nn.functional.one_hot(y, 2).float()) ** 2).sum(1).mean()
    ref = torch.autograd.grad(loss, [p for p in other.parameters() if p.requires_grad])
    for (name, g), r in zip(grad.items(), ref, strict=True):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


# --- issue 14: the nonlinear drift fraction and the per-client row ---------------------------------
def test_summarize_drift_nonlinear_fraction_mean_and_max_leave_out_unmeasured():
    """n = (10, 30, 60) with fractions (0.2, 0.6, NaN): the NaN client is left out, p renormalised over n = (10, 30).

    p = (.25, .75): mean = .25*.2 + .75*.6 = 0.5; max = 0.6. Without any number: no key at all.
    """
    drifts = [
        ClientDrift(10, 1.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.0, 0.0, 0.2),
        ClientDrift(30, 1.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.0, 0.0, 0.6),
        ClientDrift(60, 1.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.0, 0.0),
    ]
    out = summarize_drift(drifts, 1.0)
    assert out["nonlinear-drift-fraction-mean"] == pytest.approx(0.5)
    assert out["nonlinear-drift-fraction-max"] == pytest.approx(0.6)
    assert "nonlinear-drift-fraction-mean" not in summarize_drift(drifts[2:], 1.0)


def test_client_row_columns_by_hand():
    """drift 0.3 over ||grad f_k(W^{r+1})|| 1.5 -> relative 0.2; loss-after = f_k(W^{r+1}) = 1.0; local-steps 5.0 -> 5.

    The nonlinear column only when asked for (drift-nonlinear), NaN kept as NaN (the writer turns it into null).
    """
    from fedavg_relu.core.metrics import client_row

    d = ClientDrift(8, 1.0, 0.5, 1.5, 2.0, 0.3, 0.4, 0.125, 0.0)
    row = client_row(d, 1.25, 5.0, False)
    assert row == {
        "num-examples": 8, "local-steps": 5, "loss-before": 1.25, "loss-after": 1.0, "gradient-drift": 0.3,
        "relative-gradient-drift": pytest.approx(0.2), "param-distance": 0.4, "activation-flips-local": 0.125,
    }
    assert math.isnan(client_row(d, 1.25, 5.0, True)["nonlinear-drift-fraction"])


def test_measure_client_drift_nonlinear_matches_mechanism():
    """nonlinear=True fills in mechanism.nonlinear_drift's fraction (given the same two gradients: rel 1e-5);
    W_k = W̄ gives Δg = 0 and ΔW = 0: fraction 0 (0/0 is defined as 0 in mechanism._ratio)."""
    from fedavg_relu.core.mechanism import nonlinear_drift

    cfg = RunConfig(model_family="standard", width=16, depth=2, seed=3)
    model = build_model(cfg, 4, 3)
    params = get_trainable(model)
    g = torch.Generator().manual_seed(1)
    local = {k: v + 0.05 * torch.randn(v.shape, generator=g).numpy() for k, v in params.items()}
    x, y = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
    drift, _ = measure_client_drift(model, local, params, x, y, "squared", nonlinear=True)
    want = nonlinear_drift(model, local, params, x, y, "squared").fraction
    assert drift.nonlinear_fraction == pytest.approx(want, rel=1e-5) and 0 < want < 1
    same, _ = measure_client_drift(model, params, params, x, y, "squared", nonlinear=True)
    assert same.nonlinear_fraction == 0.0
    plain, _ = measure_client_drift(model, local, params, x, y, "squared")
    assert math.isnan(plain.nonlinear_fraction)
