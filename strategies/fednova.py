"""FedNova on Flower's Message API (Flower does not ship it).

Clients report the local steps they ran (``local-steps``, which differ across
clients with ``local-epochs > 0``); the server normalises each client's update
by its step count before averaging (:func:`fedavg_relu.core.aggregation.fednova_average`).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedavg_relu.core.aggregation import fednova_average
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.records import array_records, arrays_to_params, metric_records, params_to_arrays


class FedNova(FedAvg):
    """FedNova (Wang et al., 2020) for local SGD with momentum ``momentum``."""

    def __init__(self, *, momentum: float = 0.0, server_learning_rate: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.momentum = momentum
        self.server_learning_rate = server_learning_rate
        self.current_params = None

    #: Packed mode runs it: a cohort replies as one client whose normalised update is its clients' mean
    #: (fedavg_relu.core.packed.CohortRound.fednova_reply), told by ``fednova-momentum`` in the config.
    packed_mean_only = True

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Remember W^r, then FedAvg's messages (with rho, for nodes that train cohorts)."""
        self.current_params = arrays_to_params(arrays)
        config[wire.FEDNOVA_MOMENTUM] = float(self.momentum)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Normalised averaging of the replies without an error.

        Contents are not checked here: the drift recorder hands this strategy only replies
        it screened (layout, keys, shapes, counts).
        """
        valid = [msg for msg in replies if not msg.has_error()]
        if not valid or self.current_params is None:
            return None, None
        locals_, sizes, steps = [], [], []
        for msg in valid:
            locals_.append(arrays_to_params(next(iter(array_records(msg.content).values()))))
            metrics = next(iter(metric_records(msg.content).values()))
            sizes.append(int(metrics[self.weighted_by_key]))
            steps.append(float(metrics[wire.LOCAL_STEPS]))
        new_x = fednova_average(self.current_params, locals_, sizes, steps, self.momentum, self.server_learning_rate)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return params_to_arrays(new_x), metrics
