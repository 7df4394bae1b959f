"""The centralized-GD baseline of THEORY.md's prediction 6, and the comparison with a finished run.

FedAvg with K clients, tau local steps and R rounds takes R * tau local steps in
all. Its centralized counterpart here starts from the *same* initialization W^0
(``models.build_model`` with the run's seed) and takes R * tau full-batch
gradient-descent steps on the union of the clients' data with the *same*
learning rate eta (``RunConfig.effective_learning_rate``):

    W_c^{t+1} = W_c^t - eta * grad F(W_c^t),   F = mean loss over the union
              = sum_k p_k f_k,                 p_k = n_k / sum_j n_j,

i.e. what FedAvg would do with tau = 1 and full local batches. Momentum is not
used (FedAvg's restarts every round, so no single centralized run matches it);
weight decay is the run's.

:func:`compare_with_central` reads what a run recorded (``config.json`` and the
final global model in ``model.pt``) and reports the parameter distance
||W_fedavg^R - W_c|| (absolute and relative to ||W_fedavg^R - W^0||) and the loss
gap F(W_fedavg^R) - F(W_c) on the union of the clients' data. FedAvg itself is
never re-implemented here.

This module does not import flwr.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import TensorData, dataset_shape, load_central, load_partition, load_test
from fedavg_relu.core.metrics import squared_distance
from fedavg_relu.core.models import ReluMLP, build_model, get_trainable, set_trainable
from fedavg_relu.core.training import LocalSGDSettings, evaluate, run_local_sgd


@dataclass(frozen=True)
class CentralizedResult:
    """Centralized GD from W^0: final parameters and the loss after every ``record_every`` steps."""

    params: dict[str, np.ndarray]  # trained parameters after ``num_steps`` steps
    initial_params: dict[str, np.ndarray]  # W^0 (trained parameters)
    num_steps: int
    learning_rate: float
    steps: list[int]  # step counts at which ``losses`` were taken (0 = W^0)
    losses: list[float]  # F(W_c^t) on the union of the clients' data


def clients_union(cfg: RunConfig) -> TensorData:
    """The union of the ``num-partitions`` clients' training data (built-in data sets).

    For the built-in data sets every partitioner covers the training pool, so
    this is ``data.load_central(cfg).train`` up to the order of the examples;
    it is built from the partitions themselves so that it is exactly what the
    clients hold.
    """
    parts = [load_partition(cfg, k) for k in range(cfg.num_partitions)]
    x = torch.cat([p.x for p in parts])
    y = torch.cat([p.y for p in parts])
    if len(x) != len(load_central(cfg).train):
        raise ValueError(
            f"the {cfg.num_partitions} partitions hold {len(x)} examples, the training pool "
            f"{len(load_central(cfg).train)}: expected the partitioner to cover the pool"
        )
    return TensorData(x, y)


def run_centralized_gd(
    cfg: RunConfig,
    num_steps: int | None = None,
    record_every: int | None = None,
    data: TensorData | None = None,
) -> CentralizedResult:
    """Full-batch GD from the run's W^0 on the clients' union, with the run's step size.

    Parameters
    ----------
    cfg
        The run's configuration (seed, model, data, learning rate, loss).
    num_steps
        GD steps; default ``num-server-rounds * local-steps`` (the run's total local steps).
    record_every
        Record F(W_c^t) every this many steps (and at t = 0); default ``local-steps``,
        so that entry r is the centralized loss after as many steps as FedAvg's round r.
    data
        Training data; default :func:`clients_union`.
    """
    steps_total = cfg.num_server_rounds * cfg.local_steps if num_steps is None else int(num_steps)
    every = cfg.local_steps if record_every is None else int(record_every)
    if steps_total < 0 or every < 1:
        raise ValueError(f"num_steps={steps_total}, record_every={every}: expected num_steps >= 0, record_every >= 1")
    data = clients_union(cfg) if data is None else data
    input_dim, num_classes = dataset_shape(cfg)
    model = build_model(cfg, input_dim, num_classes)
    initial = get_trainable(model)
    learning_rate = cfg.effective_learning_rate(input_dim)
    generator = torch.Generator().manual_seed(cfg.seed)  # unused by full-batch GD; run_local_sgd wants one
    steps, losses = [0], [evaluate(model, data.x, data.y, cfg.loss)[0]]
    done = 0
    while done < steps_total:
        chunk = min(every, steps_total - done)
        settings = LocalSGDSettings(
            local_steps=chunk, learning_rate=learning_rate, batch_size=0,
            momentum=0.0, weight_decay=cfg.weight_decay, loss=cfg.loss,
        )
        run_local_sgd(model, data.x, data.y, settings, generator)
        done += chunk
        steps.append(done)
        losses.append(evaluate(model, data.x, data.y, cfg.loss)[0])
    return CentralizedResult(get_trainable(model), initial, steps_total, learning_rate, steps, losses)


def load_run_model(run_dir: Path | str) -> tuple[RunConfig, ReluMLP]:
    """The run's config (``config.json``) and its final global model (``model.pt``'s state dict)."""
    run_dir = Path(run_dir)
    model_path = run_dir / "model.pt"
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: no saved model (the run needs save-model=true)")
    with open(run_dir / "config.json", encoding="utf-8") as fh:
        mapping = json.load(fh)["config"]
    cfg = RunConfig.from_mapping({k: v for k, v in mapping.items() if k in RunConfig().to_mapping()})
    input_dim, num_classes = dataset_shape(cfg)
    model = build_model(cfg, input_dim, num_classes)
    state = torch.load(model_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    return cfg, model


def compare_with_central(run_dir: Path | str) -> dict[str, float]:
    """Distance and loss gap between a finished run's final model and centralized GD.

    Returns
    -------
    dict
        ``central-steps`` (R * tau), ``central-distance`` ||W_fed - W_c||,
        ``fedavg-movement`` ||W_fed - W^0||, ``central-movement`` ||W_c - W^0||,
        ``central-distance-relative`` ||W_fed - W_c|| / ||W_fed - W^0||,
        ``fedavg-loss`` F(W_fed), ``central-loss`` F(W_c) (F: mean loss on the
        clients' union), ``loss-gap`` F(W_fed) - F(W_c), ``loss-gap-relative``
        (F(W_fed) - F(W_c)) / F(W_c), and ``central-test-loss``.
    """
    cfg, fed_model = load_run_model(run_dir)
    data = clients_union(cfg)
    central = run_centralized_gd(cfg, data=data)
    fed_params = get_trainable(fed_model)
    distance = math.sqrt(squared_distance(fed_params, central.params))
    fed_move = math.sqrt(squared_distance(fed_params, central.initial_params))
    central_move = math.sqrt(squared_distance(central.params, central.initial_params))
    fed_loss = evaluate(fed_model, data.x, data.y, cfg.loss)[0]
    central_loss = central.losses[-1]
    set_trainable(fed_model, central.params)  # same frozen layers (same seed): now it is W_c
    test = load_test(cfg)
    central_test = evaluate(fed_model, test.x, test.y, cfg.loss)[0]
    return {
        "central-steps": float(central.num_steps),
        "central-distance": distance,
        "fedavg-movement": fed_move,
        "central-movement": central_move,
        "central-distance-relative": distance / fed_move if fed_move > 0 else math.nan,
        "fedavg-loss": fed_loss,
        "central-loss": central_loss,
        "loss-gap": fed_loss - central_loss,
        "loss-gap-relative": (fed_loss - central_loss) / central_loss if central_loss > 0 else math.nan,
        "central-test-loss": central_test,
    }

