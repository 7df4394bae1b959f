"""``strategy = NAME`` -> a configured strategy that records the drift metrics.

Flower's own strategies are used as they ship: each gains the measurements by
composition, ``type("DriftFedProx", (DriftMeasurement, FedProx), {})``.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum

from fedavg_relu.core.config import RunConfig
from fedavg_relu.flower.seam import strategy_state_attrs
from fedavg_relu.core.task import initial_params
from fedavg_relu.flower.validation import OutlierRules, UpdateRules

from .drift import DEFAULT_METRIC_KEYS, DriftMeasurement
from .fedavg import DriftFedAvg
from .fednova import DriftFedNova
from .scaffold import DELTA_PREFIX, DriftScaffold


def _with_drift(base: type) -> type:
    """``Drift<Base>``; its checkpoints save the Flower state attributes the seam names for ``base``."""
    return type(f"Drift{base.__name__}", (DriftMeasurement, base), {
        "checkpoint_attrs": strategy_state_attrs(base), "__doc__": f"{base.__name__} with the drift measurements.",
    })


STRATEGY_CLASSES: dict[str, type] = {
    "fedavg": DriftFedAvg,
    "fedprox": _with_drift(FedProx),
    "fedavgm": _with_drift(FedAvgM),
    "fedadam": _with_drift(FedAdam),
    "fedyogi": _with_drift(FedYogi),
    "fedadagrad": _with_drift(FedAdagrad),
    "fedmedian": _with_drift(FedMedian),
    "fedtrimmedavg": _with_drift(FedTrimmedAvg),
    "krum": _with_drift(Krum),
    "scaffold": DriftScaffold,
    "fednova": DriftFedNova,
}


def strategy_kwargs(cfg: RunConfig, learning_rate: float) -> dict[str, Any]:
    """Constructor arguments of the configured strategy, from the run config."""
    kwargs: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,  # clients report their loss in the drift exchange instead
        "min_train_nodes": max(1, math.ceil(cfg.fraction_train * cfg.num_partitions)),
        "min_evaluate_nodes": 0,
        "min_available_nodes": cfg.num_partitions,
    }
    name = cfg.strategy
    if name == "fedprox":
        kwargs["proximal_mu"] = cfg.proximal_mu
    elif name == "fedavgm":
        kwargs.update(server_learning_rate=cfg.server_learning_rate, server_momentum=cfg.server_momentum)
    elif name in ("fedadam", "fedyogi"):
        kwargs.update(eta=cfg.server_eta, eta_l=learning_rate, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.adaptivity)
    elif name == "fedadagrad":
        kwargs.update(eta=cfg.server_eta, eta_l=learning_rate, tau=cfg.adaptivity)
    elif name == "fedtrimmedavg":
        kwargs["beta"] = cfg.trim_fraction
    elif name == "krum":
        kwargs["num_malicious_nodes"] = cfg.num_malicious_nodes
    elif name == "scaffold":
        kwargs["server_learning_rate"] = cfg.server_learning_rate
    elif name == "fednova":
        kwargs.update(momentum=cfg.momentum, server_learning_rate=cfg.server_learning_rate)
    return kwargs


def build_strategy(cfg: RunConfig, learning_rate: float, round_offset: int = 0) -> DriftMeasurement:
    """The configured strategy, with drift measurement and reply validation set up."""
    if cfg.packed:  # clients-per-node > 1: nodes simulate cohorts of virtual clients (strategies/packed.py)
        from .packed import PackedFedAvg

        strategy = PackedFedAvg(**dict(strategy_kwargs(cfg, learning_rate), min_available_nodes=cfg.num_nodes))
        strategy.setup_packed(cfg.num_partitions, cfg.clients_per_node, cfg.fraction_train, cfg.seed, cfg.round_timeout)
    else:
        strategy = STRATEGY_CLASSES[cfg.strategy](**strategy_kwargs(cfg, learning_rate))
    init = initial_params(cfg)
    shapes = dict(init)
    if cfg.strategy == "scaffold":  # replies also carry the control-variate deltas
        shapes.update({DELTA_PREFIX + k: v for k, v in init.items()})
    strategy.setup_drift(
        init, learning_rate, enabled=cfg.drift_metrics,
        gradient_dissimilarity=cfg.gradient_dissimilarity, timeout=cfg.round_timeout,
        rules=UpdateRules.for_model(shapes, DEFAULT_METRIC_KEYS, cfg.max_num_examples, cfg.max_update_norm),
        round_offset=round_offset,
        outliers=OutlierRules(cfg.max_examples_ratio, cfg.max_update_ratio),
    )
    return strategy
