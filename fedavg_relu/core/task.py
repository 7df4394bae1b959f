"""What a client does, without Flower: train one round, then measure its drift.

The ClientApp handlers in ``clients/`` only unpack messages and call these.
Models and data are cached per process (one Ray actor or one ClientApp
process), keyed by the parts of the config that define them.

This module does not import flwr.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedavg_relu.core.aggregation import scaffold_client_control
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import TensorData, dataset_shape, load_data_file, load_partition
from fedavg_relu.core.device import CPU, resolve_device
from fedavg_relu.core.metrics import ClientDrift, activation_patterns, measure_client_drift
from fedavg_relu.core.models import ReluMLP, build_model, get_trainable, set_trainable
from fedavg_relu.core.training import LocalSGDSettings, client_seed, evaluate, run_local_sgd

# what W^0 depends on: the architecture, the seed, and the data set's shape
_MODEL_FIELDS = (
    "model_family", "width", "depth", "seed", "dataset", "synthetic_input_dim", "synthetic_num_classes", "test_fraction",
)


@functools.lru_cache(maxsize=2)
def _initial_model(cfg: RunConfig) -> ReluMLP:
    input_dim, num_classes = dataset_shape(cfg)
    return build_model(cfg, input_dim, num_classes)


@functools.lru_cache(maxsize=2)
def _model_on(cfg: RunConfig, device: torch.device) -> ReluMLP:
    return copy.deepcopy(_initial_model(cfg)).to(device)


def working_model(cfg: RunConfig, device: torch.device = CPU) -> ReluMLP:
    """A per-process model of the run's architecture (its frozen layers are W^0's) on ``device``.

    The same object is returned on every call (one per device); callers load the
    trained parameters they need into it before use.
    """
    key = cfg.only(*_MODEL_FIELDS)
    return _initial_model(key) if device.type == "cpu" else _model_on(key, device)


@functools.lru_cache(maxsize=2)
def _init_params(cfg: RunConfig) -> dict[str, np.ndarray]:
    input_dim, num_classes = dataset_shape(cfg)
    return get_trainable(build_model(cfg, input_dim, num_classes))


def initial_params(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The trained parameters of W^0 (deterministic in the seed)."""
    return _init_params(cfg.only(*_MODEL_FIELDS))


@dataclass(frozen=True)
class TrainOutcome:
    """One client's round: its final local parameters and what it reports."""

    local_params: dict[str, np.ndarray]
    num_examples: int
    train_loss: float  # mean minibatch loss over the tau steps
    loss_before: float  # f_k(W^r): full-data loss at the model it received
    num_steps: int  # tau_k, the local steps run
    control_delta: dict[str, np.ndarray] | None = None  # SCAFFOLD: c_k+ - c_k
    client_control: dict[str, np.ndarray] | None = None  # SCAFFOLD: c_k+ (to keep in node state)


def train_client(
    cfg: RunConfig,
    data: TensorData,
    partition_id: int,
    server_round: int,
    global_params: Mapping[str, np.ndarray],
    settings: LocalSGDSettings,
    loss_before: float | None = None,
    scaffold: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None] | None = None,
    copy: bool = True,
) -> TrainOutcome:
    """Set W_k <- W^r and run tau_k local steps, deterministic in (seed, partition, round).

    ``loss_before`` (f_k(W^r)) is computed with one forward pass unless the caller knows it;
    with full-batch steps (and n <= 4096, one evaluation batch) it is step 1's loss, the very
    same forward pass, so no extra pass is needed.
    ``scaffold = (c, c_k)`` (``c_k`` None on a node's first round: zeros) turns on
    SCAFFOLD's gradient correction ``c - c_k`` and its option-II control update.
    Runs on ``cfg.device`` (:func:`fedavg_relu.core.device.resolve_device`).
    ``copy=False``: ``local_params`` are views of this process's working model (no 268 MB copy
    at width 8192), valid only until the next call here: for a caller that sends and keeps them
    at once (the ClientApp's train handler), not one that trains several clients in turn.
    """
    device = resolve_device(cfg.device)
    model = working_model(cfg, device)
    set_trainable(model, global_params)
    x, y = data.x.to(device), data.y.to(device)
    n = len(data)
    from_first_step = loss_before is None and settings.first_loss_is_full_loss(n)
    if loss_before is None and not from_first_step:
        loss_before, _ = evaluate(model, x, y, settings.loss)
    generator = torch.Generator().manual_seed(client_seed(cfg.seed, partition_id, server_round))
    correction = None
    if scaffold is not None:
        server_c, client_c = scaffold
        client_c = client_c or {k: np.zeros_like(v) for k, v in server_c.items()}
        correction = {k: torch.from_numpy(np.asarray(server_c[k] - client_c[k])) for k in server_c}
    result = run_local_sgd(model, x, y, settings, generator, correction)
    local = get_trainable(model, copy=copy)
    if from_first_step:
        loss_before = result.first_batch_loss
    outcome = TrainOutcome(local, result.num_examples, result.mean_batch_loss, loss_before, result.num_steps)
    if scaffold is not None:
        new_c = scaffold_client_control(client_c, server_c, global_params, local, result.num_steps, settings.learning_rate)
        delta = {k: (new_c[k] - client_c[k]).astype(new_c[k].dtype) for k in new_c}
        outcome = dataclasses.replace(outcome, control_delta=delta, client_control=new_c)
    return outcome


def measure_drift(
    cfg: RunConfig,
    data: TensorData,
    local_params: Mapping[str, np.ndarray],
    global_params: Mapping[str, np.ndarray],
    nonlinear: bool = False,
) -> tuple[ClientDrift, dict[str, np.ndarray]]:
    """This client's drift between its local model and the average (see metrics.py).

    Costs two full-data gradients and one forward pass (patterns at W^0); with
    ``nonlinear`` (``drift-nonlinear``) one jvp and one vjp more for the nonlinear
    drift fraction, reusing both gradients. Runs on ``cfg.device``.
    """
    device = resolve_device(cfg.device)
    model = working_model(cfg, device)
    set_trainable(model, initial_params(cfg))
    x, y = data.x.to(device), data.y.to(device)
    init_patterns = activation_patterns(model, x)
    return measure_client_drift(model, local_params, global_params, x, y, cfg.loss, init_patterns, nonlinear)


def client_data(cfg: RunConfig, node_config: Mapping[str, object]) -> TensorData:
    """This node's training data: its own file (``data-path``) or a built-in partition (``partition-id``).

    Raises ``ValueError`` with a clear message when neither is usable.
    """
    if "data-path" in node_config:
        input_dim, num_classes = dataset_shape(cfg)
        return load_data_file(str(node_config["data-path"]), input_dim, num_classes)
    if "partition-id" not in node_config:
        raise ValueError(
            "node config has neither 'data-path' nor 'partition-id' (start the SuperNode with "
            "--node-config \"data-path='/path/data.npz'\" or --node-config 'partition-id=N')"
        )
    return load_partition(cfg, int(node_config["partition-id"]))


def node_seed_id(node_config: Mapping[str, object], node_id: int) -> int:
    """The id that seeds this node's minibatch order: its partition id, else its node id."""
    if "partition-id" in node_config:
        return int(node_config["partition-id"])
    return int(node_id) % (2**31)
