"""SCAFFOLD on Flower's Message API (Flower does not ship it).

The server control variate ``c`` travels inside the train message's ArrayRecord
under ``scaffold-c/<name>``; the client keeps its own ``c_k`` in its node state
(``context.state``, so it survives across rounds in simulation and on real
SuperNodes), corrects every local gradient by ``c - c_k`` and replies with its
local model plus ``dc_k = c_k+ - c_k`` under ``scaffold-dc/<name>``. The update
rules are in :mod:`fedavg_relu.core.aggregation`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedavg_relu.flower import protocol as wire
from fedavg_relu.core.aggregation import scaffold_server_update
from fedavg_relu.flower.records import array_records, arrays_to_params, metric_records, params_to_arrays

from .drift import DriftMeasurement

CONTROL_PREFIX = wire.SCAFFOLD_CONTROL_PREFIX
DELTA_PREFIX = wire.SCAFFOLD_DELTA_PREFIX


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., 2020), option II, with server step ``server_learning_rate``."""

    def __init__(self, *, server_learning_rate: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_learning_rate = server_learning_rate
        self.control: dict[str, np.ndarray] | None = None  # server control variate c
        self.current_params: dict[str, np.ndarray] | None = None
        self.num_nodes_total = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send W^r together with ``c``."""
        self.current_params = arrays_to_params(arrays)
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current_params.items()}
        self.num_nodes_total = len(list(grid.get_node_ids()))
        combined = dict(self.current_params)
        combined.update({CONTROL_PREFIX + k: v for k, v in self.control.items()})
        return super().configure_train(server_round, params_to_arrays(combined), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``x <- x + eta_g sum p_k (y_k - x)``, ``c <- c + |S|/N sum p_k dc_k``, over the replies without an error.

        Contents are not checked here: :class:`DriftScaffold` gets only replies that
        :meth:`DriftMeasurement.aggregate_train` screened (layout, keys, shapes, counts).
        """
        valid = [msg for msg in replies if not msg.has_error()]
        if not valid or self.current_params is None or self.control is None:
            return None, None
        locals_, deltas, sizes = [], [], []
        for msg in valid:
            params = arrays_to_params(next(iter(array_records(msg.content).values())))
            locals_.append({k: v for k, v in params.items() if not k.startswith(DELTA_PREFIX)})
            deltas.append({k[len(DELTA_PREFIX):]: v for k, v in params.items() if k.startswith(DELTA_PREFIX)})
            sizes.append(int(next(iter(metric_records(msg.content).values()))[self.weighted_by_key]))
        new_x, self.control = scaffold_server_update(
            self.current_params, self.control, locals_, deltas, sizes, self.num_nodes_total, self.server_learning_rate
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return params_to_arrays(new_x), metrics


class DriftScaffold(DriftMeasurement, Scaffold):
    """SCAFFOLD with the drift measurements."""

    checkpoint_attrs = ("control",)
