"""``strategy = NAME`` or ``"package.module:Name"`` -> the strategy, wrapped in the drift recorder.

The eleven names build Flower's own strategies as they ship (FedAvg, FedProx, FedAvgM,
FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum) or the project's SCAFFOLD
and FedNova, with their hyper-parameters from the run config. Any other strategy the
ServerApp can import is named ``"package.module:Name"`` (or ``"/path/to/file.py:Name"``):
``Name`` is a ``flwr.serverapp.strategy.Strategy`` subclass or a function returning a
Strategy, called with the JSON object of ``strategy-args`` as keyword arguments (plus the
run's sampling bounds ``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``,
``min_evaluate_nodes`` and ``min_available_nodes`` where its signature takes them and
``strategy-args`` does not set them). :func:`build_strategy` wraps the result in
:class:`strategies.recorder.DriftRecorder`: every run goes through the wrapper.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy,
)

from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.data import load_partition_indices
from fedavg_relu.core.task import initial_params
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.validation import OutlierRules, UpdateRules

from .cohorts import Cohorts
from .exchange import DriftSettings
from .fednova import FedNova
from .recorder import DriftRecorder
from .scaffold import Scaffold

#: name -> class of the strategies ``strategy = NAME`` selects.
STRATEGY_CLASSES: dict[str, type] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
    "scaffold": Scaffold, "fednova": FedNova,
}


def sampling_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """The run's sampling bounds, as every Flower strategy's constructor takes them."""
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,  # clients report their loss in the drift exchange instead
        "min_train_nodes": max(1, math.ceil(cfg.fraction_train * cfg.num_partitions)),
        "min_evaluate_nodes": 0,
        "min_available_nodes": cfg.num_partitions,
    }


def strategy_kwargs(cfg: RunConfig, learning_rate: float) -> dict[str, Any]:
    """Constructor arguments of the named strategy, from the run config."""
    kwargs = sampling_kwargs(cfg)
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
        kwargs.update(server_learning_rate=cfg.server_learning_rate, num_clients=cfg.num_partitions,
                      weighting=cfg.scaffold_weighting, total_examples=total_examples(cfg))
    elif name == "fednova":
        kwargs.update(momentum=cfg.momentum, server_learning_rate=cfg.server_learning_rate)
    return kwargs


def total_examples(cfg: RunConfig) -> float | None:
    """Training examples of all clients (SCAFFOLD's ``examples`` weighting); None when the server cannot know.

    Raises :class:`ConfigError` for ``scaffold-weighting = "examples"`` when the partitions cannot be
    read here (e.g. nodes with their own data files), naming the ``uniform`` alternative.
    """
    if cfg.scaffold_weighting != "examples":
        return None
    try:
        return float(sum(len(ix) for ix in load_partition_indices(cfg)))
    except Exception as err:  # noqa: BLE001 - a data set the server cannot partition
        raise ConfigError([
            f"scaffold-weighting='examples': the server needs every client's example count and cannot read the "
            f"partitions ({type(err).__name__}: {err}); expected scaffold-weighting='uniform' (the paper's rule)"
        ]) from err


def load_factory(spec: str) -> Callable[..., Strategy]:
    """The class or function ``"package.module:Name"`` (or ``"/path/file.py:Name"``) names.

    Raises :class:`ConfigError` naming the key, the value and what was expected.
    """
    where, _, name = spec.rpartition(":")
    problem = None
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            module_name = f"fedavg_relu_user_strategy_{abs(hash(str(path)))}"
            loader = importlib.util.spec_from_file_location(module_name, path)
            if loader is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(where)
        factory = getattr(module, name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's configuration
        problem = f"{type(err).__name__}: {err}"
    if problem is not None or not callable(factory):
        raise ConfigError([
            f"strategy={spec!r}: expected one of {', '.join(STRATEGY_CLASSES)} or an importable "
            f"'package.module:Name' (or '/path/to/file.py:Name') naming a Strategy class or a function returning one "
            f"({problem or 'not callable'})"
        ])
    return factory


def build_inner(cfg: RunConfig, learning_rate: float) -> Strategy:
    """The configured strategy itself (not yet wrapped)."""
    if cfg.strategy in STRATEGY_CLASSES:
        return STRATEGY_CLASSES[cfg.strategy](**strategy_kwargs(cfg, learning_rate))
    factory = load_factory(cfg.strategy)
    args = json.loads(cfg.strategy_args or "{}")
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        defaults = {k: v for k, v in sampling_kwargs(cfg).items() if k in params or takes_any}
    except (TypeError, ValueError):  # a builtin without a signature: only the user's arguments
        defaults = {}
    try:
        strategy = factory(**{**defaults, **args})
    except TypeError as err:
        raise ConfigError([f"strategy-args={cfg.strategy_args!r}: {cfg.strategy} does not take them: {err}"]) from err
    if not isinstance(strategy, Strategy):
        raise ConfigError([
            f"strategy={cfg.strategy!r}: expected a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}"
        ])
    return strategy


def update_rules(cfg: RunConfig) -> UpdateRules:
    """What a valid train reply is: W^0's arrays (and SCAFFOLD's control deltas), the ClientApp's metric keys."""
    init = initial_params(cfg)
    shapes = dict(init)
    if cfg.strategy == "scaffold":  # replies also carry the control-variate deltas
        shapes.update({wire.SCAFFOLD_DELTA_PREFIX + k: v for k, v in init.items()})
    return UpdateRules.for_model(shapes, wire.TRAIN_METRIC_KEYS, cfg.max_num_examples, cfg.max_update_norm)


def build_strategy(cfg: RunConfig, learning_rate: float, inner: Strategy | None = None) -> DriftRecorder:
    """The configured strategy (or ``inner``) in the drift recorder, configured completely here.

    Raises :class:`ConfigError` before any message is sent when packed mode cannot run the strategy.
    """
    inner = inner if inner is not None else build_inner(cfg, learning_rate)
    cohorts = Cohorts(cfg.num_partitions, cfg.clients_per_node, cfg.round_timeout) if cfg.packed else None
    settings = DriftSettings(
        initial_params=initial_params(cfg), learning_rate=learning_rate,
        gradient_dissimilarity=cfg.gradient_dissimilarity, nonlinear=cfg.drift_nonlinear,
        client_metrics=cfg.client_metrics, timeout=cfg.round_timeout, max_num_examples=cfg.max_num_examples,
        num_partitions=cfg.num_partitions,
    )
    try:
        return DriftRecorder(
            inner, drift=settings, rules=update_rules(cfg), outliers=OutlierRules(cfg.max_examples_ratio, cfg.max_update_ratio),
            measure_drift=cfg.drift_metrics, cohorts=cohorts, node_timeout=cfg.round_timeout,
        )
    except ValueError as err:
        raise ConfigError([f"clients-per-node={cfg.clients_per_node}: {err}"]) from err
