"""SCAFFOLD on Flower's Message API (Flower does not ship it).

The server control variate ``c`` travels inside the train message's ArrayRecord
under ``scaffold-c/<name>``; each client keeps its own ``c_k`` **on its node's disk**
(:class:`fedavg_relu.core.spill.ClientStateStore`, keyed by the run's ``state-key`` and
the client's partition id, versioned by round), corrects every local gradient by
``c - c_k`` and replies with its local model plus ``dc_k = c_k+ - c_k`` under
``scaffold-dc/<name>``. Not in ``context.state``: a resumed run is a new Flower run with
new nodes, and the c_k must survive it (the strategy's checkpoint holds ``c`` and the
rounds; the nodes find their c_k of the checkpointed round again).

One weighting, used for both the model and ``c`` (:func:`fedavg_relu.core.aggregation.scaffold_server_update`):

* ``"examples"`` (default): ``x += eta_g sum_S (n_k/n_S)(y_k - x)``, ``c += sum_S (n_k/n) dc_k``,
  so ``c = sum_k (n_k/n) c_k`` over all clients (n: all their examples); with eta_g = 1 the
  model step is FedAvg's;
* ``"uniform"`` (the paper's): ``x += eta_g mean_S (y_k - x)``, ``c += (1/N) sum_S dc_k``,
  so ``c = mean_k c_k``.

Either way ``c`` stays the (weighted) average of the clients' c_k under partial
participation. Contents of the replies are not checked here: the drift recorder hands
this strategy only replies it screened (layout, keys, shapes, counts).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedavg_relu.core.aggregation import scaffold_server_update
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.records import array_records, arrays_to_params, metric_records, params_to_arrays

CONTROL_PREFIX = wire.SCAFFOLD_CONTROL_PREFIX
DELTA_PREFIX = wire.SCAFFOLD_DELTA_PREFIX


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., 2020), option II, with server step ``server_learning_rate``.

    Parameters
    ----------
    server_learning_rate
        eta_g.
    num_clients
        N, all clients of the federation (the ``uniform`` control step divides by it).
    weighting
        ``"examples"`` or ``"uniform"`` (module docstring).
    total_examples
        n, the examples of all N clients (``"examples"`` needs it).
    state_key
        Names this run's client state on the nodes' disks; the same for every attempt of
        one run (e.g. from the run folder). Empty: a fresh key (no resume possible).
    **kwargs
        Flower's FedAvg arguments (sampling bounds).
    """

    def __init__(
        self, *, server_learning_rate: float = 1.0, num_clients: int = 0, weighting: str = "examples",
        total_examples: float | None = None, state_key: str = "", **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting={weighting!r}: expected 'examples' or 'uniform'")
        self.server_learning_rate = server_learning_rate
        self.num_clients = int(num_clients)
        self.weighting = weighting
        self.total_examples = total_examples
        self.state_key = state_key or uuid.uuid4().hex
        self.attempt = uuid.uuid4().hex[:12]
        self.resumed_after = 0
        self.checkpointed_round = 0
        self.last_round = 0
        self.control: dict[str, np.ndarray] | None = None  # server control variate c
        self.current_params: dict[str, np.ndarray] | None = None
        self.num_nodes_total = 0

    @property
    def packed_mean_only(self) -> bool:
        """Packed mode can run it with the example weighting: a cohort's reply is its weighted mean y and dc."""
        return self.weighting == "examples"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send W^r together with ``c`` and where the clients' c_k are kept."""
        self.current_params = arrays_to_params(arrays)
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current_params.items()}
        self.num_nodes_total = len(list(grid.get_node_ids()))
        combined = dict(self.current_params)
        combined.update({CONTROL_PREFIX + k: v for k, v in self.control.items()})
        config[wire.STATE_KEY] = self.state_key
        config[wire.STATE_ATTEMPT] = self.attempt
        config[wire.RESUMED_AFTER] = self.resumed_after
        config[wire.CHECKPOINTED_ROUND] = self.checkpointed_round
        return super().configure_train(server_round, params_to_arrays(combined), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SCAFFOLD's server step over the replies without an error (weighting: module docstring)."""
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
            self.current_params, self.control, locals_, deltas, sizes, self.num_clients or self.num_nodes_total,
            self.server_learning_rate, self.weighting, self.total_examples,
        )
        self.last_round = server_round
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return params_to_arrays(new_x), metrics

    # --- checkpoints (strategies.state) ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``c`` and the round it belongs to; taking it means a checkpoint of that round is being written."""
        self.checkpointed_round = self.last_round
        control = None if self.control is None else {k: np.array(v) for k, v in self.control.items()}
        return {"control": control, "round": self.last_round, "state_key": self.state_key}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume after ``state["round"]``: the clients count only their c_k versions up to it."""
        self.control = None if state.get("control") is None else {k: np.array(v) for k, v in state["control"].items()}
        self.last_round = self.checkpointed_round = self.resumed_after = int(state.get("round", 0))
        if state.get("state_key"):
            self.state_key = str(state["state_key"])
