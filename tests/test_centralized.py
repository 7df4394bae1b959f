"""Tests of fedavg_relu.core.centralized: the centralized-GD baseline and its comparison with recorded FedAvg runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedavg_relu.core.centralized import clients_union, compare_with_central, load_run_model, run_centralized_gd
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import dataset_shape, load_central
from fedavg_relu.core.models import build_model, compute_loss, get_trainable
from fedavg_relu.runtime.simulation import run_in_process

TINY = {
    "dataset": "synthetic", "synthetic-num-examples": 40, "synthetic-input-dim": 6, "synthetic-num-classes": 3,
    "width": 16, "num-partitions": 2, "batch-size": "full", "learning-rate": 0.5, "seed": 3,
}


def test_centralized_gd_equals_a_hand_written_loop():
    """3 steps of W <- W - eta * grad F(W) by hand (autograd on the union, eta = 0.5 * d / m = 0.1875) give the same W."""
    cfg = RunConfig.from_mapping(TINY)
    result = run_centralized_gd(cfg, num_steps=3, record_every=1)
    data = clients_union(cfg)
    d, c = dataset_shape(cfg)
    model = build_model(cfg, d, c)
    eta = 0.5 * 6 / 16
    losses = []
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(3):
        loss = compute_loss(model(data.x), data.y, "squared")
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= eta * g
    with torch.no_grad():
        losses.append(float(compute_loss(model(data.x), data.y, "squared")))
    assert result.learning_rate == pytest.approx(eta)
    assert result.steps == [0, 1, 2, 3]
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    for name, value in get_trainable(model).items():
        np.testing.assert_allclose(result.params[name], value, rtol=1e-5, atol=1e-6)
    assert losses[3] < losses[0]


def test_default_steps_are_rounds_times_tau_recorded_per_round():
    """R = 4 rounds of tau = 3: 12 steps, losses recorded at steps 0, 3, 6, 9, 12 (one per FedAvg round)."""
    cfg = RunConfig.from_mapping({**TINY, "num-server-rounds": 4, "local-steps": 3})
    result = run_centralized_gd(cfg)
    assert result.num_steps == 12
    assert result.steps == [0, 3, 6, 9, 12]
    assert len(result.losses) == 5 and result.losses[-1] < result.losses[0]


def test_union_of_partitions_is_the_training_pool():
    """The Dirichlet partitions together hold the 32 training examples (40 - 20 % held out), each once."""
    cfg = RunConfig.from_mapping({**TINY, "partitioner": "dirichlet", "dirichlet-alpha": 0.3})
    union = clients_union(cfg)
    pool = load_central(cfg).train
    assert len(union) == len(pool) == 32
    key = lambda x: sorted(map(tuple, np.round(x.numpy(), 6)))  # noqa: E731
    assert key(union.x) == key(pool.x)


def test_fedavg_one_client_one_step_equals_centralized_gd(out_dir):
    """K=1, tau=1, full batch: W^{r+1} = W^r - eta grad f_1(W^r) = one GD step on the union, so after R=3 rounds distance ~0."""
    cfg = RunConfig.from_mapping({**TINY, "num-partitions": 1, "local-steps": 1, "num-server-rounds": 3,
                                  "output-dir": str(out_dir), "run-name": "k1"})
    run_dir = run_in_process(cfg)
    result = compare_with_central(run_dir)
    assert result["central-steps"] == 3
    assert result["fedavg-movement"] > 1e-3  # the model did move
    assert result["central-distance"] < 1e-5 * result["fedavg-movement"] + 1e-6
    assert result["central-movement"] == pytest.approx(result["fedavg-movement"], rel=1e-4)
    assert result["loss-gap"] == pytest.approx(0.0, abs=1e-6)


def test_fedavg_full_batch_tau_one_equals_gd_even_non_iid(out_dir):
    """K=2 Dirichlet(0.3), tau=1, full batch: sum_k p_k (W - eta grad f_k) = W - eta grad F, so FedAvg is GD: distance ~0."""
    cfg = RunConfig.from_mapping({**TINY, "partitioner": "dirichlet", "dirichlet-alpha": 0.3, "local-steps": 1,
                                  "num-server-rounds": 3, "output-dir": str(out_dir), "run-name": "k2"})
    result = compare_with_central(run_in_process(cfg))
    assert result["central-distance"] < 1e-4 * result["fedavg-movement"] + 1e-6
    assert result["loss-gap"] == pytest.approx(0.0, abs=1e-5)


def test_local_steps_on_non_iid_clients_move_fedavg_away_from_gd(out_dir):
    """K=2 Dirichlet(0.3), tau=4: local models drift toward their own clients' minimizers, so W_fed != W_central."""
    cfg = RunConfig.from_mapping({**TINY, "partitioner": "dirichlet", "dirichlet-alpha": 0.3, "local-steps": 4,
                                  "num-server-rounds": 3, "output-dir": str(out_dir), "run-name": "tau4"})
    result = compare_with_central(run_in_process(cfg))
    assert result["central-steps"] == 12
    assert result["central-distance"] > 1e-3 * result["fedavg-movement"]
    assert 0 < result["central-distance-relative"] < 2
    assert math.isfinite(result["central-test-loss"])
    assert result["loss-gap-relative"] == pytest.approx(result["loss-gap"] / result["central-loss"])


def test_run_without_a_saved_model_is_refused(out_dir):
    """save-model=false leaves no model.pt: the comparison says the run needs save-model=true."""
    cfg = RunConfig.from_mapping({**TINY, "num-server-rounds": 1, "save-model": False,
                                  "output-dir": str(out_dir), "run-name": "nomodel"})
    run_dir = run_in_process(cfg)
    with pytest.raises(FileNotFoundError, match="save-model=true"):
        load_run_model(run_dir)
