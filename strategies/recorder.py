"""The drift recorder: any Flower strategy, with THEORY.md's measurements every round.

:class:`DriftRecorder` wraps a strategy the way Flower's DP wrappers do
(``flwr/serverapp/strategy/dp_fixed_clipping.py``): it takes ``strategy: Strategy``
in its constructor, keeps it as ``self.strategy`` and delegates to it, adding its own
work around it. The wrapped strategy is unaware of it: Flower's FedAvg or FedAdam, the
project's SCAFFOLD or FedNova, a DP wrapper around any of them, or a user's own class.
Everything it needs arrives in the constructor.

A round (:meth:`DriftRecorder.run_round`) is five named steps:

1. **configure** (:meth:`configure_train`): the inner strategy samples and builds its
   messages from a fresh copy of the round's config; in packed mode it samples virtual
   clients and the messages are packed into one per node (:mod:`strategies.cohorts`);
2. **train exchange**: the grid sends them and streams the replies back;
3. **screen** (:mod:`strategies.screening`): errors counted as failed, invalid replies
   rejected per reason, the valid ones summed as they arrive (FedAvg's average) or kept;
4. **average** (:meth:`aggregate_train`): the inner strategy's own rule on the valid
   replies only; with none valid the global model stays exactly as it was;
5. **drift exchange** (:meth:`measure_drift`): W^{r+1} to every node that trained, their
   drift replies checked against the schema and summarised (:mod:`strategies.exchange`).

The recorder is the outermost wrapper, because its round has the second exchange: wrap
DP around the strategy, and the recorder around both
(``DriftRecorder(DifferentialPrivacyServerSideFixedClipping(FedAvg(...), ...), ...)``).
Its round has no client-side evaluate phase in packed mode (clients report their loss
in the drift exchange); the ServerApp evaluates W^{r+1} centrally.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Result, Strategy

from fedavg_relu.core.metrics import distances_from_init
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.records import array_records, arrays_to_params, metric_records, release
from fedavg_relu.flower.seam import uses_flower_metric_average
from fedavg_relu.flower.streaming import StreamingGrid, node_of
from fedavg_relu.flower.validation import OutlierRules, UpdateRules

from .cohorts import Cohorts
from .exchange import DriftExchange, DriftSettings, PackedDriftExchange, TrainedNode
from .screening import ReplyScreen, ScreenedRound
from .participation import Participation
from .state import load_strategy_state, strategy_state

#: Flower's strategies whose server step needs only the example-weighted mean of the client models (packed
#: mode runs them; the project's SCAFFOLD and FedNova say so themselves with ``packed_mean_only``).
MEAN_ONLY = ("FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad")


def innermost(strategy: Strategy) -> Strategy:
    """The strategy at the bottom of a stack of wrappers (each keeps the next as ``.strategy``)."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy  # type: ignore[attr-defined]
    return strategy


def streams_average(strategy: Strategy) -> bool:
    """True when ``strategy`` is exactly Flower's FedAvg or FedProx with its default metric average.

    Their average is the example-weighted mean, which :class:`strategies.replies.RunningAverage`
    forms as replies arrive; any other rule (or a wrapper around one) gets the list of valid replies.
    """
    return type(strategy) in (FedAvg, FedProx) and uses_flower_metric_average(strategy)


def packable(strategy: Strategy) -> bool:
    """True when packed mode can run ``strategy``: its server step needs only the clients' weighted mean.

    Flower's FedAvg, FedProx, FedAvgM, FedAdam, FedYogi and FedAdagrad (by class, not subclass:
    a subclass may change the rule), or any strategy whose ``packed_mean_only`` is true (the project's
    SCAFFOLD with its example weighting; a user's class may set it).
    """
    if getattr(strategy, "packed_mean_only", False):
        return True
    cls = type(strategy)
    return cls.__module__.startswith("flwr.serverapp.strategy") and cls.__name__ in MEAN_ONLY


class DriftRecorder(Strategy):
    """``strategy`` with THEORY.md's measurements recorded every round (see the module docstring).

    Parameters
    ----------
    strategy
        The strategy whose rounds are measured (any ``flwr.serverapp.strategy.Strategy``).
    drift
        What the drift exchange measures (:class:`strategies.exchange.DriftSettings`).
    rules
        What a valid train reply is (array names, shapes, dtypes, metric keys, bounds).
    outliers
        Bounds relative to the round's other replies (default: off).
    measure_drift
        Run the drift exchange (``drift-metrics``); off, only the distance from W^0 and the
        client counts are recorded.
    cohorts
        Packed mode's layout (:class:`strategies.cohorts.Cohorts`); None: one client per node.
        Raises ``ValueError`` when the strategy's rule needs every client model.
    node_timeout
        Seconds to wait for nodes that went away before going on without them (from round 2).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        drift: DriftSettings,
        rules: UpdateRules,
        outliers: OutlierRules | None = None,
        measure_drift: bool = True,
        cohorts: Cohorts | None = None,
        node_timeout: float = 600.0,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy={strategy!r}: expected a flwr.serverapp.strategy.Strategy")
        if cohorts is not None and (strategy is not innermost(strategy) or not packable(strategy)):
            raise ValueError(
                f"packed mode (clients-per-node > 1) runs strategies whose server step needs only sums a cohort can "
                f"form ({', '.join(MEAN_ONLY)}, SCAFFOLD, FedNova, or a strategy with packed_mean_only = True); "
                f"{type(strategy).__name__} needs every client's model: "
                "run one client per node (clients-per-node = 0, and flwr run . --federation-config "
                '"num-supernodes=<num-partitions>")'
            )
        self.strategy = strategy
        self.settings = drift
        self.measures_drift = bool(measure_drift)
        self.cohorts = cohorts
        base = innermost(strategy)
        layout = {getattr(base, "arrayrecord_key", wire.ARRAYS): "ArrayRecord", wire.METRICS: "MetricRecord"}
        self.screen = ReplyScreen(rules, outliers or OutlierRules(0.0, 0.0), layout)
        self.exchange = (PackedDriftExchange if cohorts else DriftExchange)(drift)
        self.stream = streams_average(strategy)
        self.node_timeout = float(node_timeout)
        self.round_metrics: dict[int, dict[str, float]] = {}  # round -> everything recorded (metrics file)
        self.client_rows: dict[int, list[dict[str, Any]]] = {}  # round -> per-client rows (popped by the writer)
        self.round_errors: dict[int, str] = {}  # round -> the most common error text of its train exchange
        self.participation = Participation("client" if cohorts else "node")  # who failed, for the run's status
        self._initial = {k: v for k, v in drift.initial_params.items()}
        self._global: dict[int, dict] = {}  # round -> W^r (screening's reference for update norms)
        self._sampled: dict[int, list[int]] = {}  # round -> nodes sent a train message
        self._assigned: dict[int, dict[int, list[int]]] = {}  # packed: round -> node -> clients
        self._unheld: dict[int, int] = {}  # packed: round -> sampled clients no node held
        self._cohort_failed: dict[int, int] = {}
        self._trained: dict[int, list[TrainedNode]] = {}  # round -> what the drift exchange needs
        self._last_measured: tuple[int, ArrayRecord] | None = None
        self._node_ids: list[int] | None = None
        self._grid: Grid | None = None

    # --- the round ------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        start_round: int = 0,
    ) -> Result:
        """Rounds ``start_round + 1 .. start_round + num_rounds`` (resuming: ``start_round`` done already).

        Flower's ``Strategy.start`` with :meth:`run_round` as the round. ``evaluate_fn(r, W^r)``
        runs before the first round (r = ``start_round``) and after every round.
        """
        grid = grid if isinstance(grid, StreamingGrid) else StreamingGrid(grid)
        train_config = train_config if train_config is not None else ConfigRecord()
        evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
        log(INFO, "Starting %s (rounds %d-%d)", self, start_round + 1, start_round + num_rounds)
        result = Result()
        arrays = initial_arrays
        if evaluate_fn is not None:
            res = evaluate_fn(start_round, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[start_round] = res
        for server_round in range(start_round + 1, start_round + num_rounds + 1):
            new_arrays, metrics = self.run_round(grid, server_round, arrays, train_config, timeout)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            result.train_metrics_clientapp[server_round] = metrics
            if self.cohorts is None:
                evaluated = self._client_evaluate(grid, server_round, arrays, evaluate_config, timeout)
                if evaluated is not None:
                    result.evaluate_metrics_clientapp[server_round] = evaluated
            if evaluate_fn is not None:
                res = evaluate_fn(server_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
        return result

    def run_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """One round: configure, train exchange, screen and average, the drift exchange.

        Returns the new global model (None: unchanged) and everything the round recorded.
        """
        messages = self.configure_train(server_round, arrays, config, grid)  # 1. configure
        replies = grid.send_and_receive(messages, timeout=timeout)  # 2. train exchange
        new_arrays, metrics = self.aggregate_train(server_round, replies)  # 3.+4. screen, average
        record = MetricRecord(dict(metrics) if metrics is not None else {})
        if new_arrays is not None and self.measures_drift:
            for key, value in self.measure_drift(grid, server_round, new_arrays).items():  # 5. the drift exchange
                record[key] = value
        self._trained.pop(server_round, None)
        row: dict[str, Any] = dict(record)
        counted = row.get(wire.CLIENTS_MEASURED, row.get(wire.CLIENTS_TRAINED, 0)) if self.measures_drift else row.get(wire.CLIENTS_TRAINED, 0)
        self.participation.record_measured(server_round, int(row.get(wire.CLIENTS_SAMPLED, 0)), int(counted))
        if self.measures_drift and int(counted) < 2:  # nothing to compare: null, never 0
            for key in wire.PAIRWISE_METRICS:
                if key in record:
                    del record[key]
                row[key] = None
        self.round_metrics[server_round] = row
        return new_arrays, record

    # --- 1. configure --------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The inner strategy's messages for this round, from a fresh copy of ``config`` (packed: one per node)."""
        self._grid = grid  # names the node of each reply (fedavg_relu.flower.streaming.node_of)
        config = ConfigRecord(dict(config))  # Flower's strategies write into the config they get
        if self._last_measured is not None and self._last_measured[1] is arrays:
            config[wire.MEASURED_ROUND] = self._last_measured[0]  # the nodes measured f_k at exactly this model
        self._global[server_round] = arrays_to_params(arrays)
        if self.cohorts is not None:
            holder, failed = self.cohorts.discover(grid, server_round)
            self._cohort_failed[server_round] = failed
            config[wire.SERVER_ROUND] = server_round
            inner = list(self.strategy.configure_train(server_round, arrays, config, self.cohorts.virtual_grid()))
            packed = self.cohorts.pack(inner, holder)
            self._assigned[server_round] = packed.assigned
            self._unheld[server_round] = len(packed.unheld)
            self._sampled[server_round] = sorted(packed.assigned)
            log(INFO, "round %d: %d virtual clients on %d nodes", server_round,
                sum(map(len, packed.assigned.values())), len(packed.assigned))
            return packed.messages
        self._node_ids = self._adapt_to_lost_nodes(server_round, grid) if self._node_ids is not None else list(grid.get_node_ids())
        snapshot = _NodeSnapshot(grid, self._node_ids, _nodes_needed(innermost(self.strategy)))
        messages = list(self.strategy.configure_train(server_round, arrays, config, snapshot))
        self._sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def _adapt_to_lost_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """From round 2 on, wait at most ``node_timeout`` s for nodes that went away, then go on without them.

        Flower's sampling waits without a timeout until ``min_available_nodes`` are connected: one dead
        SuperNode would stall the run. The wrapped strategy's bounds are lowered to the nodes there are.
        """
        base = innermost(self.strategy)
        wanted = int(getattr(base, "min_available_nodes", 0))
        deadline = time.monotonic() + self.node_timeout
        while (available := len(node_ids := list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
            time.sleep(min(1.0, self.node_timeout))
        if 0 < available < wanted:
            log(WARNING, "round %d: only %d of %d nodes are connected after %.0fs; going on with %d",
                server_round, available, wanted, self.node_timeout, available)
            base.min_available_nodes = available  # type: ignore[attr-defined]
            base.min_train_nodes = min(getattr(base, "min_train_nodes", available), available)  # type: ignore[attr-defined]
        return node_ids

    # --- 3. + 4. screen and average ---------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies as they arrive and let the inner strategy average the valid ones.

        Returns the new model (None when nothing valid came: the model stays as it was) and
        the inner strategy's metrics with the round's client counts and distance from W^0.
        """
        sampled = self._sampled.pop(server_round, [])
        global_params = self._global.pop(server_round, None)
        screened = self.screen.screen(
            server_round, replies, sampled, lambda m: node_of(self._grid, m), global_params, self.stream,
        )
        if screened.first_error:
            self.round_errors[server_round] = screened.first_error
        arrays, metrics = self._average(server_round, screened)
        row = self._counts(server_round, screened, sampled)
        self._record_participation(server_round, screened, sampled)
        row[wire.ROUND_SKIPPED] = int(arrays is None)
        if arrays is None:
            log(WARNING, "round %d: no update was aggregated; the global model is unchanged", server_round)
        else:
            row.update(distances_from_init(arrays_to_params(arrays), self._initial))
            self._trained[server_round] = self._trained_nodes(server_round, screened)
        self._assigned.pop(server_round, None)
        merged = MetricRecord(dict(metrics) if metrics is not None else {})
        for key, value in row.items():
            merged[key] = value
        return arrays, merged

    def _average(self, server_round: int, screened: ScreenedRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if screened.average is not None:
            return screened.average.result()
        if not screened.accepted:
            return None, None
        arrays, metrics = self.strategy.aggregate_train(server_round, [u.message for u in screened.accepted])
        for update in screened.accepted:
            release(update.message)
        screened.accepted.clear()
        return arrays, metrics

    def _counts(self, server_round: int, screened: ScreenedRound, sampled: list[int]) -> dict[str, float]:
        """The round's client counts; in packed mode in virtual clients (a node's clients share its fate)."""
        counts = screened.counts(sampled)
        if self.cohorts is None:
            return counts
        assigned = self._assigned.get(server_round, {})
        trained_nodes = {node for node, _ in screened.trained}
        rejected_nodes = set(screened.rejected) - trained_nodes
        sampled_clients = sum(map(len, assigned.values())) + self._unheld.pop(server_round, 0)
        trained = sum(len(assigned.get(n, [])) for n in trained_nodes)
        rejected = sum(len(assigned.get(n, [])) for n in rejected_nodes)
        counts.update({
            wire.CLIENTS_SAMPLED: sampled_clients, wire.CLIENTS_TRAINED: trained, wire.CLIENTS_REJECTED: rejected,
            wire.CLIENTS_FAILED: max(0, sampled_clients - trained - rejected),
            wire.COHORT_FAILED_NODES: self._cohort_failed.pop(server_round, 0),
        })
        return counts

    def _record_participation(self, server_round: int, screened: ScreenedRound, sampled: list[int]) -> None:
        """Who was sampled and who failed this round (nodes; packed: virtual clients, sharing their node's fate)."""
        trained = {node for node, _ in screened.trained}
        failed_nodes = {n: screened.errors.get(n, "no reply within round-timeout") for n in sampled if n not in trained}
        if self.cohorts is None:
            self.participation.record(sampled, failed_nodes)
            return
        assigned = self._assigned.get(server_round, {})
        clients = [k for ids in assigned.values() for k in ids]
        failed = {k: failed_nodes[n] for n, ids in assigned.items() if n in failed_nodes for k in ids}
        self.participation.record(clients, failed)

    def _trained_nodes(self, server_round: int, screened: ScreenedRound) -> list[TrainedNode]:
        assigned = self._assigned.get(server_round, {})
        return [
            TrainedNode(node, screened.num_examples[node], before, screened.local_steps.get(node, math.nan), assigned.get(node, []))
            for node, before in screened.trained
        ]

    # --- 5. the drift exchange --------------------------------------------------------------------
    def measure_drift(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """Send W^{r+1} to the nodes whose update entered it; their drift replies, checked and summarised.

        Each valid reply also leaves one row per client in ``self.client_rows[server_round]``
        (with ``client_metrics``).
        """
        trained = self._trained.get(server_round, [])
        self._last_measured = (server_round, arrays)
        result = self.exchange.run(grid, server_round, arrays, trained)
        if self.settings.client_metrics:
            self.client_rows[server_round] = result.rows
        return result.metrics

    # --- evaluation (Flower's client-side phase, one client per node only) -------------------------
    def _client_evaluate(self, grid, server_round, arrays, config, timeout) -> MetricRecord | None:
        messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid))
        if not messages:
            return None
        return self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The inner strategy's evaluate messages (the registry's strategies send none)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner strategy's evaluation average over the well-formed replies only.

        A reply is kept when it has no error, exactly one MetricRecord with a positive integer
        ``num-examples`` (within ``max-num-examples``), finite numbers as values, no ArrayRecord,
        and the same keys as the first kept reply; a malformed reply is logged and dropped, where
        Flower's own average would end the run (``InconsistentMessageReplies``).
        """
        kept: list[Message] = []
        keys: set[str] | None = None
        limit = self.screen.rules.max_num_examples
        for msg in replies:
            if msg.has_error():
                continue
            records = metric_records(msg.content)
            metrics = dict(next(iter(records.values()))) if len(records) == 1 else None
            n = metrics.get(wire.NUM_EXAMPLES) if metrics else None
            ok = (
                metrics is not None
                and not array_records(msg.content)
                and isinstance(n, (int, float)) and not isinstance(n, bool)
                and float(n).is_integer() and 1 <= n <= limit
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in metrics.values())
                and (keys is None or set(metrics) == keys)
            )
            if not ok:
                log(WARNING, "evaluate reply of node %d dropped: malformed", int(msg.metadata.src_node_id))
                continue
            keys = keys or set(metrics)
            kept.append(msg)
        return self.strategy.aggregate_evaluate(server_round, kept) if kept else None

    # --- checkpoints: the one seam ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state for a checkpoint (:func:`strategies.state.strategy_state`)."""
        return strategy_state(self.strategy)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        load_strategy_state(self.strategy, state)

    def summary(self) -> None:
        """Flower's summary hook: the wrapped strategy's, with what is recorded."""
        log(INFO, "\t├──> Drift recorder: drift exchange %s, %s", "on" if self.measures_drift else "off",
            "packed cohorts" if self.cohorts else "one client per node")
        self.strategy.summary()

    def __repr__(self) -> str:
        return f"DriftRecorder({type(self.strategy).__name__})"


def _nodes_needed(strategy: Strategy) -> int:
    """Connected nodes Flower's sampling waits for (``min_available_nodes``, ``min_train_nodes``)."""
    return max(int(getattr(strategy, "min_available_nodes", 0)), int(getattr(strategy, "min_train_nodes", 0)))


class _NodeSnapshot:
    """The round's grid, answering ``get_node_ids`` from the list the round just fetched.

    Flower's FedAvg asks the grid for its nodes twice per ``configure_train``; the simulation's
    in-memory LinkState answers each time by scanning every node (5 ms at 10,000 nodes,
    measured). The snapshot answers only when it already has the nodes Flower's sampling waits
    for; otherwise the real grid does, so waiting for SuperNodes to connect still works.
    """

    def __init__(self, grid: Grid, node_ids: list[int], needed: int) -> None:
        self._grid, self._node_ids, self._needed = grid, list(node_ids), needed

    def get_node_ids(self):
        if self._node_ids and len(self._node_ids) >= self._needed:
            return list(self._node_ids)
        return self._grid.get_node_ids()

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def round_summary(row: Mapping[str, Any]) -> str:
    """The drift part of the console line of a round (a metric that is null, e.g. with one client, is left out)."""
    parts = []
    if row.get("global-loss") is not None:
        parts.append(f"train-loss {row['global-loss']:.4g}")
    if row.get("gradient-drift-mean") is not None:
        parts.append(f"drift {row['gradient-drift-mean']:.3g} (rel {row['relative-gradient-drift-mean']:.3g})")
    if row.get("model-divergence") is not None:
        parts.append(f"divergence {row['model-divergence']:.3g}")
    if row.get(wire.CLIENTS_MEASURED) is not None and row.get(wire.CLIENTS_MEASURED, 0) < row.get(wire.CLIENTS_SAMPLED, 0):
        parts.append(f"measured {row[wire.CLIENTS_MEASURED]}/{row[wire.CLIENTS_SAMPLED]}")
    return "  ".join(parts)
