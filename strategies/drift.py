"""Drift measurement and reply screening that any ``flwr.serverapp.strategy`` strategy can wear.

:class:`DriftMeasurement` is a mixin: put it first in the bases of a Flower
strategy (``class DriftFedAvg(DriftMeasurement, FedAvg)``) and the strategy's own
averaging is untouched while every round gains THEORY.md's metrics:

1. ``configure_train`` remembers the grid and the nodes it sampled, and hands the
   parent a fresh ``ConfigRecord`` (Flower's strategies write into it).
2. ``aggregate_train`` lets the parent average, then measures the distance from
   W^0 and, when drift metrics are on, runs a second exchange: the new average
   W^{r+1} goes to the nodes that trained (message type ``query.drift``); each
   compares the gradient there with the one at its own final local model, kept
   in its node state, and replies with scalars (and, for gradient
   dissimilarity, its gradient at W^{r+1}).
3. The round's metrics go into the ``MetricRecord`` Flower stores and into
   ``self.round_metrics[server_round]`` for the run's metrics file.

Nodes that trained but did not answer the drift exchange are counted
(``clients-unmeasured``), never guessed.

Replies are taken as they arrive (:class:`fedavg_relu.flower.streaming.StreamingGrid`):
for FedAvg and FedProx each valid update is folded into a float64 running sum
``sum_k n_k W_k`` and dropped, and each drift reply's gradient likewise, so the
server holds the replies in flight, not one model per client. Strategies whose
rule needs every update at once (FedMedian, Krum, the adaptive ones, ...) get the
list of valid replies as before.

Why this module is longer than most: the mixin is one class whose methods are the steps
of a round (configure, screen, average, measure, checkpoint); the reply readers it uses
are already apart in :mod:`strategies.replies`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedavg_relu.core.metrics import ClientDrift, client_row, distances_from_init, summarize_drift
from fedavg_relu.flower import protocol as wire
from fedavg_relu.flower.records import array_records, arrays_to_params, metric_records, release
from fedavg_relu.flower.seam import is_worker_lost, uses_flower_metric_average
from fedavg_relu.flower.streaming import StreamingGrid, node_of
from fedavg_relu.flower.validation import REASONS, OutlierGate, OutlierRules, Rejected, UpdateRules, check_update, update_norm

from .replies import (
    ErrorTally, RunAborted, RunningAverage, Update, accumulate, client_order, extract_update,
    parse_drift_reply, partition_id,
)

DRIFT_MESSAGE_TYPE = wire.DRIFT
DEFAULT_METRIC_KEYS = wire.TRAIN_METRIC_KEYS


class DriftMeasurement:
    """Mixin adding THEORY.md's per-round measurements and reply screening to a Flower strategy.

    Call :meth:`setup_drift` once after construction.
    """

    round_metrics: dict[int, dict[str, float]]

    def setup_drift(
        self,
        initial_params: Mapping[str, np.ndarray],
        learning_rate: float,
        enabled: bool = True,
        gradient_dissimilarity: bool = True,
        timeout: float = 600.0,
        rules: UpdateRules | None = None,
        round_offset: int = 0,
        outliers: OutlierRules | None = None,
    ) -> None:
        """Set what the measurements (and the reply validation) need.

        Parameters
        ----------
        initial_params
            The trained parameters of W^0, for the distance from initialization.
        learning_rate
            The clients' local step size eta (effective smoothness in step units).
        enabled
            Run the drift exchange (``drift-metrics``); off, only the distance
            from initialization and the client counts are recorded.
        gradient_dissimilarity
            Ask clients for their gradient at W^{r+1} (one model-size upload each).
        timeout
            Seconds to wait for drift replies.
        rules
            What a valid train reply is (:class:`fedavg_relu.flower.validation.UpdateRules`);
            default: arrays shaped like W^0 and the metric keys of this project's
            ClientApp (``num-examples``, ``train-loss``, ``loss-before``, ``local-steps``).
        round_offset
            Rounds already done before this ``start`` (resuming a run): Flower
            counts from 1 again, the hooks add the offset, so clients, metrics and
            checkpoints see the true round.
        outliers
            Bounds relative to the round's other replies
            (:class:`fedavg_relu.flower.validation.OutlierRules`); default: off.
        """
        self.drift_initial = {k: np.asarray(v) for k, v in initial_params.items()}
        self.drift_learning_rate = float(learning_rate)
        self.drift_enabled = bool(enabled)
        self.drift_with_gradients = bool(gradient_dissimilarity)
        self.drift_timeout = float(timeout)
        self.update_rules = rules or UpdateRules.for_model(self.drift_initial, DEFAULT_METRIC_KEYS)
        self.outlier_rules = outliers or OutlierRules(0.0, 0.0)
        self.round_offset = int(round_offset)
        self.round_metrics = {}
        self.round_errors: dict[int, str] = {}  # round -> the most common error text of its train exchange
        self._drift_grid: Grid | None = None
        self._drift_global: dict[str, np.ndarray] | None = None
        self._drift_sampled: dict[int, list[int]] = {}
        self._drift_last_measured: tuple[int, ArrayRecord] | None = None
        self._drift_started = False
        self._round_node_ids: list[int] = []
        self._round_valid_nodes: list[int] = []
        self._round_local_steps: dict[int, float] = {}
        self.setup_mechanism()

    def setup_mechanism(self, nonlinear: bool = False, client_metrics: bool = True) -> None:
        """What the drift exchange also measures (issue 14; defaults: off, on).

        Parameters
        ----------
        nonlinear
            ``drift-nonlinear``: clients also measure the nonlinear drift fraction;
            the round gains ``nonlinear-drift-fraction-mean``/``-max``.
        client_metrics
            ``client-metrics``: keep one row per measured client and round in
            ``self.client_rows[round]`` (a few scalars each, never the messages) for
            the run's ``clients.jsonl``; the ServerApp pops them as it writes them.
        """
        self.drift_nonlinear = bool(nonlinear)
        self.client_metrics = bool(client_metrics)
        self.client_rows: dict[int, list[dict[str, Any]]] = {}

    @property
    def streams_average(self) -> bool:
        """True when the parent's average is FedAvg's (FedAvg, FedProx): replies are then summed as they arrive."""
        for cls in type(self).__mro__[type(self).__mro__.index(DriftMeasurement) + 1:]:
            if "aggregate_train" in vars(cls):
                return cls is FedAvg and uses_flower_metric_average(self)
        return False

    # --- Flower hooks -------------------------------------------------------
    def start(self, grid: Grid, *args: Any, **kwargs: Any):
        """Flower's ``Strategy.start`` on a grid whose replies stream (:class:`StreamingGrid`)."""
        return super().start(grid if isinstance(grid, StreamingGrid) else StreamingGrid(grid), *args, **kwargs)  # type: ignore[misc]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The parent's messages, from a fresh copy of ``config``; remembers grid and sample."""
        server_round, config = self.begin_round(server_round, arrays, config, grid)
        snapshot = _NodeSnapshot(grid, self._round_node_ids, self._nodes_needed())
        messages = list(super().configure_train(server_round, arrays, config, snapshot))  # type: ignore[misc]
        self._drift_sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def _nodes_needed(self) -> int:
        """Connected nodes Flower's sampling waits for (``min_available_nodes``, ``min_train_nodes``)."""
        return max(int(getattr(self, "min_available_nodes", 0)), int(getattr(self, "min_train_nodes", 0)))

    def begin_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[int, ConfigRecord]:
        """What every ``configure_train`` of a measured strategy does first.

        Returns the true round (Flower's + ``round_offset``) and a fresh copy of
        ``config`` (Flower's strategies write into the one they get); remembers the
        grid and W^r, and after round 1 stops waiting for nodes that went away.
        """
        server_round += self.round_offset
        self._drift_grid = grid
        self._drift_global = arrays_to_params(arrays)
        config = ConfigRecord(dict(config))
        if self._drift_last_measured is not None and self._drift_last_measured[1] is arrays:
            # clients measured f_k at exactly this model in the last drift exchange: they may reuse it
            config[wire.MEASURED_ROUND] = self._drift_last_measured[0]
        if self._drift_started:
            self._round_node_ids = self._adapt_to_lost_nodes(server_round, grid)
        else:
            self._round_node_ids = list(grid.get_node_ids())
        self._drift_started = True
        return server_round, config

    def _adapt_to_lost_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """After the first round, do not wait forever for nodes that went away.

        Flower's sampling waits, without a timeout, until ``min_available_nodes``
        are connected: one dead SuperNode would stall the run. From round 2 on we
        wait at most ``timeout`` seconds (``round-timeout``), then go on with the
        nodes that are there (at least one), and say so.
        """
        wanted = getattr(self, "min_available_nodes", 0)  # nodes (min_train_nodes may count virtual clients)
        deadline = time.monotonic() + self.drift_timeout
        while (available := len(node_ids := list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
            time.sleep(min(1.0, self.drift_timeout))
        if 0 < available < wanted:
            log(WARNING, "round %d: only %d of %d nodes are connected after %.0fs; going on with %d",
                server_round, available, wanted, self.drift_timeout, available)
            self.min_available_nodes = available
            self.min_train_nodes = min(getattr(self, "min_train_nodes", available), available)
        return node_ids

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies as they arrive, average the valid ones, then measure.

        Error replies are counted as failed, invalid ones as rejected per reason;
        neither reaches the average. With FedAvg's average (:attr:`streams_average`)
        each valid update is summed and dropped at once, except the few the outlier
        rules hold until the round's replies are all in; otherwise the parent
        averages the list of valid replies. With nothing valid left the parent is not
        called: the global model stays exactly as it was.
        """
        server_round += self.round_offset
        sampled = self._drift_sampled.pop(server_round, [])
        self._round_failed_nodes: list[int] = []
        self._round_rejected_nodes: list[int] = []
        errors = ErrorTally(f"round {server_round} train")
        rejected: dict[str, int] = {}
        gate = OutlierGate(self.outlier_rules)
        streaming = self.streams_average
        average = RunningAverage()
        kept: list[Update] = []  # held by the outlier gate, or every valid one for a list-averaging parent
        seen: set[int] = set()
        repliers: set[int] = set()
        trained: list[tuple[int, float]] = []  # (node, f_k(W^r)) of every update averaged
        steps: dict[int, float] = {}  # node -> tau_k of every update averaged (per-client table)

        def take(update: Update) -> None:
            trained.append((update.node, float(update.metrics.get(wire.LOSS_BEFORE, math.nan))))
            steps[update.node] = float(update.metrics.get(wire.LOCAL_STEPS, math.nan))
        for index, msg in enumerate(replies):
            node = node_of(self._drift_grid, msg)
            repliers.add(node)
            update = self._screen(msg, node, sampled, seen, errors, rejected)
            if update is None:
                continue
            update.index = index
            if gate.offer(index, update.num_examples, update.norm) and streaming:
                average.add(update)
                take(update)
                release(msg)  # summed: its bytes go now, not when the cyclic GC runs
            else:
                kept.append(update)
        accepted: list[Update] = []
        for update in kept:
            reason = gate.final(update.index) if self.outlier_rules.active else None
            if reason is not None:
                rejected[reason] = rejected.get(reason, 0) + 1
                self._round_rejected_nodes.append(update.node)
                n, u = gate.stats[update.index]
                log(WARNING, "round %d: reply of node %d rejected: %s (num-examples %d, ||update|| %.4g)",
                    server_round, update.node, reason, n, u)
                continue
            accepted.append(update)
        errors.log_repeats()
        if errors.count:
            self.round_errors[server_round] = errors.most_common() or ""
        if streaming:
            for update in accepted:
                average.add(update)
                take(update)
                release(update.message)
            arrays, metrics = average.result()
        else:
            for update in accepted:
                take(update)
            arrays, metrics = (None, None)
            if accepted:
                arrays, metrics = super().aggregate_train(server_round, [u.message for u in accepted])  # type: ignore[misc]
                for update in accepted:
                    release(update.message)
        del kept, accepted
        self._round_valid_nodes = [node for node, _ in trained]
        self._round_local_steps = steps
        row: dict[str, float] = {
            "clients-sampled": len(sampled),
            "clients-trained": len(trained),
            # error replies, plus sampled nodes that sent nothing (timed out)
            "clients-failed": errors.count + len(set(sampled) - repliers),
            "clients-rejected": sum(rejected.values()),
        }
        row.update({f"rejected-{reason}": rejected.get(reason, 0) for reason in REASONS})
        if arrays is None:
            row["round-skipped"] = 1
            log(WARNING, "round %d: no update was aggregated; the global model is unchanged", server_round)
        else:
            row["round-skipped"] = 0
            row.update(distances_from_init(arrays_to_params(arrays), self.drift_initial))
            if self.drift_enabled:
                row.update(self.measure_round(server_round, arrays, trained))
        merged = MetricRecord(dict(metrics) if metrics is not None else {})
        for key, value in row.items():
            merged[key] = value
        self.round_metrics[server_round] = dict(merged)
        return arrays, merged

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The parent's evaluation average over the well-formed replies only.

        The registry's strategies sample no node for Flower's evaluate phase (clients report
        their loss in the drift exchange), but a strategy built directly (e.g. ``DriftFedAvg()``,
        Flower's default ``fraction_evaluate=1.0``) runs it. A reply is kept when it has no
        error, exactly one MetricRecord with a positive integer ``num-examples`` (within
        ``max-num-examples``), finite numbers as values, no ArrayRecord, and the same keys as
        the first kept reply; a malformed reply is logged and dropped, where Flower's own
        average would end the run (``InconsistentMessageReplies``).
        """
        server_round += self.round_offset
        kept: list[Message] = []
        keys: set[str] | None = None
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
                and float(n).is_integer() and 1 <= n <= self.update_rules.max_num_examples
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in metrics.values())
                and (keys is None or set(metrics) == keys)
            )
            if not ok:
                log(WARNING, "evaluate reply of node %d dropped: malformed", node_of(self._drift_grid, msg))
                continue
            keys = keys or set(metrics)
            kept.append(msg)
        return super().aggregate_evaluate(server_round, kept) if kept else None  # type: ignore[misc]

    # --- checkpoints ----------------------------------------------------------
    checkpoint_attrs: tuple[str, ...] = ()  # the strategy's own state, e.g. server momentum

    def checkpoint_state(self) -> dict[str, Any]:
        """The strategy state a resumed run needs (attributes named in ``checkpoint_attrs``).

        Raises ``AttributeError`` when one is missing: a renamed attribute in a new
        Flower release must not make a resumed run restart its optimizer silently.
        """
        missing = [name for name in self.checkpoint_attrs if not hasattr(self, name)]
        if missing:
            raise AttributeError(
                f"{type(self).__name__} has no attribute(s) {missing} to checkpoint: the installed Flower's "
                "strategy state is not what this project expects (see tests/test_flower_contract.py)"
            )
        return {name: copy.deepcopy(getattr(self, name)) for name in self.checkpoint_attrs}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        for name, value in state.items():
            setattr(self, name, copy.deepcopy(value))

    # --- reply validation ---------------------------------------------------
    def _expected_layout(self) -> dict[str, str]:
        return {getattr(self, "arrayrecord_key", wire.ARRAYS): "ArrayRecord", wire.METRICS: "MetricRecord"}

    def _screen(
        self, msg: Message, node: int, sampled: list[int], seen: set[int], errors: ErrorTally, rejected: dict[str, int]
    ) -> Update | None:
        """One train reply: an :class:`Update`, or None (counted as an error or a rejection, and logged)."""
        if msg.has_error():
            reason = msg.error.reason or ""
            errors.add(node, reason)
            self._round_failed_nodes.append(node)
            if is_worker_lost(reason):
                raise RunAborted(
                    f"the runtime lost the worker serving node {node} ({reason.strip().splitlines()[-1][:200]}). "
                    "Flower 1.42 does not replace dead workers, so every later round would silently lose its "
                    "clients; the run stops here. The last complete round is checkpointed: rerun with resume=true "
                    "to continue (with fewer clients per round or a smaller model if memory ran out)."
                )
            return None
        try:
            if node in seen:
                raise Rejected("duplicate-node", f"node {node} already replied this round")
            seen.add(node)
            if sampled and node not in sampled:
                raise Rejected("unexpected-node", f"node {node} was not sampled this round")
            params, metrics = extract_update(msg, self._expected_layout())
            n = check_update(params, metrics, self.update_rules, self._drift_global)
            norm = update_norm(params, self._drift_global) if self.outlier_rules.update_ratio > 0 and self._drift_global else 0.0
        except Rejected as err:
            rejected[err.reason] = rejected.get(err.reason, 0) + 1
            self._round_rejected_nodes.append(node)
            log(WARNING, "reply of node %d rejected: %s", node, err)
            return None
        return Update(node, msg, params, metrics, n, norm)

    # --- the second exchange ------------------------------------------------
    def drift_messages(self, server_round: int, arrays: ArrayRecord, nodes: list[int], message_type: str) -> list[Message]:
        """The drift exchange's messages: W^{r+1} and the round to every node in ``nodes``."""
        config = {
            wire.SERVER_ROUND: server_round, wire.RETURN_GRADIENT: self.drift_with_gradients,
            wire.DRIFT_NONLINEAR: self.drift_nonlinear, wire.CLIENT_METRICS: self.client_metrics,
        }
        config.update(self.drift_config_extra())
        record = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config)})
        return [Message(content=record, dst_node_id=node, message_type=message_type) for node in nodes]

    def drift_config_extra(self) -> dict[str, Any]:
        """More keys for the drift exchange's ConfigRecord (packed mode adds its cohort layout)."""
        return {}

    def measure_round(self, server_round: int, arrays: ArrayRecord, trained: list[tuple[int, float]]) -> dict[str, float]:
        """Send W^{r+1} to the nodes that trained (``trained``: (node, f_k(W^r))) and summarise their drift replies.

        Replies are taken as they arrive; each gradient is folded into a float64 sum and dropped.
        With ``client_metrics`` each reply also leaves one row of scalars in
        ``self.client_rows[server_round]`` (:func:`fedavg_relu.core.metrics.client_row`).
        """
        if self._drift_grid is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        t0 = time.perf_counter()
        self._drift_last_measured = (server_round, arrays)
        loss_before = dict(trained)
        messages = self.drift_messages(server_round, arrays, [node for node, _ in trained], DRIFT_MESSAGE_TYPE)
        drifts: list[ClientDrift] = []
        before: list[float] = []
        grad_sum: dict[str, np.ndarray] | None = None
        rejected = 0
        rows: list[dict[str, Any]] = []
        errors = ErrorTally(f"round {server_round} drift")
        for reply in self._drift_grid.send_and_receive(messages, timeout=self.drift_timeout):
            node = node_of(self._drift_grid, reply)
            if reply.has_error():
                errors.add(node, reply.error.reason or "")
                continue
            try:
                drift, gradient = parse_drift_reply(reply, self.drift_with_gradients, self.drift_initial)
                client = partition_id(reply) if self.client_metrics else None
            except (KeyError, ValueError, TypeError) as err:
                rejected += 1
                log(WARNING, "drift: reply of node %d rejected: %s", node, err)
                continue
            drifts.append(drift)
            before.append(loss_before.get(node, math.nan))
            if self.client_metrics:
                row: dict[str, Any] = {"round": server_round, "client": client, "node": node}
                row.update(client_row(drift, before[-1], self._round_local_steps.get(node, math.nan), self.drift_nonlinear))
                rows.append(row)
            if gradient is not None:
                grad_sum = accumulate(grad_sum, gradient, drift.num_examples)
            del gradient
            release(reply)
        errors.log_repeats()
        if self.client_metrics:
            self.client_rows[server_round] = sorted(rows, key=client_order)
        mean_grad_sq = None
        if grad_sum is not None and len(drifts) > 0:
            total = float(sum(d.num_examples for d in drifts))
            mean_grad_sq = float(sum(np.sum((g / total) ** 2) for g in grad_sum.values()))
        out = summarize_drift(drifts, self.drift_learning_rate, mean_grad_sq)
        if drifts:
            p = np.array([d.num_examples for d in drifts], np.float64)
            p /= p.sum()
            loss_prev = float(p @ np.array(before))
            out["loss-before"] = loss_prev
            out["loss-ratio"] = out["global-loss"] / loss_prev if loss_prev > 0 else math.nan
        out["clients-measured"] = len(drifts)
        out["clients-unmeasured"] = len(trained) - len(drifts)
        out["drift-rejected"] = rejected
        out["drift-seconds"] = time.perf_counter() - t0
        return out


def round_summary(row: Mapping[str, Any]) -> str:
    """The drift part of the console line of a round."""
    parts = []
    if "global-loss" in row:
        parts.append(f"train-loss {row['global-loss']:.4g}")
    if "gradient-drift-mean" in row:
        parts.append(f"drift {row['gradient-drift-mean']:.3g} (rel {row['relative-gradient-drift-mean']:.3g})")
    if "model-divergence" in row:
        parts.append(f"divergence {row['model-divergence']:.3g}")
    return "  ".join(parts)


class _NodeSnapshot:
    """The round's grid, answering ``get_node_ids`` from the list ``begin_round`` just fetched.

    Flower's FedAvg asks the grid for its nodes twice per ``configure_train``; the
    simulation's in-memory LinkState answers each time by scanning every node (5 ms
    at 10,000 nodes, measured). The snapshot is used only when it already has the
    nodes Flower's sampling waits for; otherwise the real grid answers, so that
    waiting for SuperNodes to connect still works. Everything else is the real grid.
    """

    def __init__(self, grid: Grid, node_ids: list[int], needed: int) -> None:
        self._grid, self._node_ids, self._needed = grid, list(node_ids), needed

    def get_node_ids(self):
        if self._node_ids and len(self._node_ids) >= self._needed:
            return list(self._node_ids)
        return self._grid.get_node_ids()

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
