"""Tests for fedavg_relu.core.cohort: vectorized cohort training = run_local_sgd client by client.

Tolerance: both paths do the same float32 arithmetic in a different order
(batched products, SGD folded into the product), so parameters agree to float32
rounding accumulated over a few steps: rtol 1e-5, atol 1e-6 on parameters of
size ~0.01-1; losses rtol 1e-5.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedavg_relu.core.cohort import train_cohort_vectorized
from fedavg_relu.core.stacked import chunk_size, layer_specs
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import TensorData
from fedavg_relu.core.models import build_model, get_trainable, set_trainable
from fedavg_relu.core.training import LocalSGDSettings, run_local_sgd

D, C = 5, 3


def _clients(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TensorData(torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)) for n in sizes]


def _reference(model, start, data, seed, settings):
    """One client through the standard path's run_local_sgd (autograd + torch.optim.SGD)."""
    m = copy.deepcopy(model)
    set_trainable(m, start)
    result = run_local_sgd(m, data.x, data.y, settings, torch.Generator().manual_seed(seed))
    return get_trainable(m), result


CASES = [
    # family, depth, loss, batch, momentum, weight decay
    ("standard", 1, "cross-entropy", 0, 0.0, 0.0),
    ("standard", 2, "squared", 4, 0.0, 0.01),
    ("ntk", 1, "squared", 0, 0.9, 0.0),
    ("ntk", 2, "cross-entropy", 3, 0.5, 0.001),
    ("paper", 1, "squared", 0, 0.0, 0.0),
    ("paper", 2, "cross-entropy", 4, 0.9, 0.01),
]


@pytest.mark.parametrize("family,depth,loss,batch,momentum,wd", CASES)
@pytest.mark.parametrize("budget", [None, 1])
@pytest.mark.parametrize("steps", [4, 1])
def test_vectorized_equals_run_local_sgd_per_client(family, depth, loss, batch, momentum, wd, budget, steps):
    """5 clients (sizes 8, 8, 6, 8, 6: two size groups), 4 local steps (and 1) from the same W^r.

    Every client's W_k, mean minibatch loss and step-1 loss equal run_local_sgd's
    on that client alone with the same seed; the weighted sum is sum_k n_k W_k.
    ``budget=1`` byte forces chunks of one client.
    """
    cfg = RunConfig.from_mapping({"dataset": "synthetic", "width": 16, "depth": depth, "model-family": family})
    model = build_model(cfg, D, C)
    start = {k: v + 0.05 * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32)
             for k, v in get_trainable(model).items()}  # not W^0: a mid-training W^r
    settings = LocalSGDSettings(local_steps=steps, learning_rate=0.3, batch_size=batch, momentum=momentum,
                                weight_decay=wd, loss=loss)
    datas = _clients([8, 8, 6, 8, 6])
    seeds = [11, 12, 13, 14, 15]
    kwargs = {} if budget is None else {"budget": budget}
    out = train_cohort_vectorized(model, start, datas, seeds, settings, **kwargs)
    expected_sum = {k: np.zeros(v.shape) for k, v in start.items()}
    for i, (data, seed) in enumerate(zip(datas, seeds, strict=True)):
        params, result = _reference(model, start, data, seed, settings)
        for name, value in params.items():
            np.testing.assert_allclose(out.local_params[name][i], value, rtol=1e-5, atol=1e-6, err_msg=name)
            expected_sum[name] += len(data) * value.astype(np.float64)
        assert out.train_loss[i] == pytest.approx(result.mean_batch_loss, rel=1e-5)
        assert out.first_loss[i] == pytest.approx(result.first_batch_loss, rel=1e-5)
        assert out.num_steps[i] == steps and out.num_examples[i] == len(data)
    for name, value in expected_sum.items():
        np.testing.assert_allclose(out.weighted_sum[name], value, rtol=1e-5, atol=1e-5)
    # without the local models (the last update folded into sum_k g_k when there is no momentum): same sums
    summed = train_cohort_vectorized(model, start, datas, seeds, settings, keep_local=False, **kwargs)
    assert summed.local_params is None
    for name, value in expected_sum.items():
        np.testing.assert_allclose(summed.weighted_sum[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(summed.train_loss, out.train_loss, rtol=1e-6)
    # the model itself is not changed
    for name, value in get_trainable(model).items():
        np.testing.assert_array_equal(value, get_trainable(build_model(cfg, D, C))[name])


def test_one_full_batch_step_by_hand():
    """1 client, standard family, 1 hidden unit, squared loss, one full-batch step: checked by hand.

    x = [[1, 2]], y = 0, C = 2 classes; W1 = [[0.5, 0.25]], b1 = [0], W2 = [[2], [1]], b2 = [0, 0].
    pre = 0.5 + 0.5 = 1, h = 1, out = [2, 1], target [1, 0], diff = [1, 1], loss = 0.5 * 2 = 1.
    dL/dout = [1, 1]; dW2 = [[1], [1]], db2 = [1, 1]; dL/dh = 2 + 1 = 3 (ReLU on), dW1 = 3 * [1, 2] = [3, 6],
    db1 = 3. With eta = 0.1: W1 = [[0.2, -0.35]], b1 = [-0.3], W2 = [[1.9], [0.9]], b2 = [-0.1, -0.1].
    """
    cfg = RunConfig.from_mapping({"dataset": "synthetic", "width": 1, "depth": 1, "model-family": "standard"})
    model = build_model(cfg, 2, 2)
    start = {
        "input.weight": np.array([[0.5, 0.25]], np.float32), "input.bias": np.zeros(1, np.float32),
        "output.weight": np.array([[2.0], [1.0]], np.float32), "output.bias": np.zeros(2, np.float32),
    }
    data = TensorData(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))
    settings = LocalSGDSettings(local_steps=1, learning_rate=0.1, batch_size=0, loss="squared")
    out = train_cohort_vectorized(model, start, [data], [0], settings)
    np.testing.assert_allclose(out.local_params["input.weight"][0], [[0.2, -0.35]], atol=1e-7)
    np.testing.assert_allclose(out.local_params["input.bias"][0], [-0.3], atol=1e-7)
    np.testing.assert_allclose(out.local_params["output.weight"][0], [[1.9], [0.9]], atol=1e-7)
    np.testing.assert_allclose(out.local_params["output.bias"][0], [-0.1, -0.1], atol=1e-7)
    assert out.first_loss[0] == pytest.approx(1.0) and out.train_loss[0] == pytest.approx(1.0)


def test_layer_specs_and_chunk_size():
    """paper: A and B frozen, no biases, hidden trained; ntk: every layer scaled by sqrt(2 / fan_in)."""
    paper = build_model(RunConfig.from_mapping({"width": 8, "depth": 2, "model-family": "paper"}), 4, 3)
    specs = layer_specs(paper)
    assert [s.weight for s in specs] == ["input.weight", "hidden.0.weight", "hidden.1.weight", "output.weight"]
    assert [s.weight_trained for s in specs] == [False, True, True, False]
    assert all(s.bias is None and s.scale == 1.0 for s in specs)
    ntk = layer_specs(build_model(RunConfig.from_mapping({"width": 8, "depth": 1, "model-family": "ntk"}), 4, 3))
    assert [s.scale for s in ntk] == pytest.approx([np.sqrt(2 / 4), np.sqrt(2 / 8)])
    assert chunk_size(1000, False, budget=40_000) == 10 and chunk_size(1000, True, budget=40_000) == 5
    assert chunk_size(10**9, False) == 1


def test_unsupported_settings_are_refused():
    cfg = RunConfig.from_mapping({"width": 4})
    model = build_model(cfg, D, C)
    with pytest.raises(ValueError, match="proximal-mu"):
        train_cohort_vectorized(model, get_trainable(model), _clients([4]), [0],
                                LocalSGDSettings(1, 0.1, 0, proximal_mu=0.1))
    with pytest.raises(ValueError, match="one seed per client"):
        train_cohort_vectorized(model, get_trainable(model), _clients([4, 4]), [0], LocalSGDSettings(1, 0.1, 0))


@pytest.mark.parametrize("family,depth,loss", [("standard", 1, "cross-entropy"), ("ntk", 2, "squared"), ("paper", 2, "squared")])
@pytest.mark.parametrize("budget", [None, 1])
def test_vectorized_drift_equals_measure_client_drift(family, depth, loss, budget):
    """4 clients (sizes 7, 5, 7, 5) at their own W_k vs W^{r+1}: every ClientDrift field as measure_client_drift's.

    W_k = W^{r+1} + 0.05 * noise_k (client 2: W_k = W^{r+1} exactly, so distance 0 and
    drift 0 up to float32 rounding); W^0 a third point, so the flips against W^0 are not all zero.
    Gradient sum: sum_k n_k grad f_k(W^{r+1}) from the per-client gradients.
    """
    from fedavg_relu.core.cohort import measure_cohort_drift_vectorized
    from fedavg_relu.core.metrics import activation_patterns, measure_client_drift

    cfg = RunConfig.from_mapping({"dataset": "synthetic", "width": 16, "depth": depth, "model-family": family})
    model = build_model(cfg, D, C)
    rng = np.random.default_rng(3)
    init = get_trainable(model)
    glob = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
    datas = _clients([7, 5, 7, 5], seed=4)
    stacked = {k: np.stack([v + (0 if i == 2 else 0.05) * rng.standard_normal(v.shape).astype(np.float32)
                            for i in range(4)]) for k, v in glob.items()}
    kwargs = {} if budget is None else {"budget": budget}
    drifts, grad_sum = measure_cohort_drift_vectorized(model, stacked, glob, init, datas, loss, True, **kwargs)
    expected_sum = {k: np.zeros(v.shape) for k, v in glob.items()}
    for i, data in enumerate(datas):
        m = copy.deepcopy(model)
        set_trainable(m, init)
        patterns0 = activation_patterns(m, data.x)
        local = {k: v[i] for k, v in stacked.items()}
        want, grad = measure_client_drift(m, local, glob, data.x, data.y, loss, patterns0)
        got = drifts[i]
        assert got.num_examples == want.num_examples
        for field in ("loss_at_global", "loss_at_local", "grad_norm_global", "grad_norm_local", "gradient_drift",
                      "param_distance", "flips_local", "flips_init"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-6), field
        for k, g in grad.items():
            expected_sum[k] += len(data) * g.astype(np.float64)
    # W_2 = W^{r+1}: distance exactly 0; the two gradients go through bmm and a plain product: equal to rounding
    assert drifts[2].param_distance == 0 and drifts[2].gradient_drift < 1e-6 * drifts[2].grad_norm_global
    assert drifts[0].flips_init > 0
    for k, v in expected_sum.items():
        np.testing.assert_allclose(grad_sum[k], v, rtol=1e-5, atol=1e-6)
