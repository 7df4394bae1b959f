"""Drift measurement that any ``flwr.serverapp.strategy`` strategy can wear.

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
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedavg_relu.metrics import ClientDrift, distances_from_init, summarize_drift
from fedavg_relu.records import arrays_to_params
from fedavg_relu.validation import REASONS, Rejected, UpdateRules, check_update

DRIFT_MESSAGE_TYPE = "query.drift"
DEFAULT_METRIC_KEYS = frozenset({"num-examples", "train-loss", "loss-before", "local-steps"})


class RunAborted(RuntimeError):
    """The run cannot go on safely (e.g. a Ray actor died); the message says why."""
GRADIENT_RECORD_KEY = "gradient"


class DriftMeasurement:
    """Mixin adding THEORY.md's per-round measurements to a Flower strategy.

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
            What a valid train reply is (:class:`fedavg_relu.validation.UpdateRules`);
            default: arrays shaped like W^0 and the metric keys of this project's
            ClientApp (``num-examples``, ``train-loss``, ``loss-before``).
        round_offset
            Rounds already done before this ``start`` (resuming a run): Flower
            counts from 1 again, the hooks add the offset, so clients, metrics and
            checkpoints see the true round.
        """
        self.drift_initial = {k: np.asarray(v) for k, v in initial_params.items()}
        self.drift_learning_rate = float(learning_rate)
        self.drift_enabled = bool(enabled)
        self.drift_with_gradients = bool(gradient_dissimilarity)
        self.drift_timeout = float(timeout)
        self.update_rules = rules or UpdateRules.for_model(self.drift_initial, DEFAULT_METRIC_KEYS)
        self.round_offset = int(round_offset)
        self.round_metrics = {}
        self._drift_grid: Grid | None = None
        self._drift_global: dict[str, np.ndarray] | None = None
        self._drift_sampled: dict[int, list[int]] = {}
        self._drift_last_measured: tuple[int, ArrayRecord] | None = None
        self._drift_started = False
        self._round_node_ids: list[int] = []

    # --- Flower hooks -------------------------------------------------------
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
            config["measured-round"] = self._drift_last_measured[0]
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
        """Validate the replies, let the parent average the valid ones, then measure.

        Error replies are counted as failed, invalid ones as rejected per reason;
        neither reaches the parent's average. With nothing valid left the
        parent is not called: the global model stays exactly as it was.
        """
        server_round += self.round_offset
        replies = list(replies)  # Flower may hand a one-shot iterable
        sampled = self._drift_sampled.pop(server_round, [])
        ok, rejected, failed = self.screen_replies(replies, sampled)
        arrays, metrics = (None, None)
        if ok:
            arrays, metrics = super().aggregate_train(server_round, ok)  # type: ignore[misc]
        row: dict[str, float] = {
            "clients-sampled": len(sampled),
            "clients-trained": len(ok),
            # error replies, plus sampled nodes that sent nothing (timed out)
            "clients-failed": failed + len(set(sampled) - {r.metadata.src_node_id for r in replies}),
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
                row.update(self.measure_round(server_round, arrays, ok))
        merged = MetricRecord(dict(metrics) if metrics is not None else {})
        for key, value in row.items():
            merged[key] = value
        self.round_metrics[server_round] = dict(merged)
        return arrays, merged

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The parent's evaluation average over the well-formed replies only.

        A reply is kept when it has no error, exactly one MetricRecord with a
        positive integer ``num-examples`` (within ``max-num-examples``), finite
        values, and the same keys as the first kept reply; a malformed reply is
        logged and dropped instead of ending the run.
        """
        server_round += self.round_offset
        kept: list[Message] = []
        keys: set[str] | None = None
        for msg in replies:
            if msg.has_error():
                continue
            records = msg.content.metric_records
            metrics = dict(next(iter(records.values()))) if len(records) == 1 else None
            n = metrics.get("num-examples") if metrics else None
            ok = (
                metrics is not None
                and not msg.content.array_records
                and isinstance(n, (int, float)) and not isinstance(n, bool)
                and float(n).is_integer() and 1 <= n <= self.update_rules.max_num_examples
                and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
                and (keys is None or set(metrics) == keys)
            )
            if not ok:
                log(WARNING, "evaluate reply of node %d dropped: malformed", msg.metadata.src_node_id)
                continue
            keys = keys or set(metrics)
            kept.append(msg)
        return super().aggregate_evaluate(server_round, kept) if kept else None  # type: ignore[misc]

    # --- checkpoints ----------------------------------------------------------
    checkpoint_attrs: tuple[str, ...] = ()  # the strategy's own state, e.g. server momentum

    def checkpoint_state(self) -> dict[str, Any]:
        """The strategy state a resumed run needs (attributes named in ``checkpoint_attrs``)."""
        return {name: copy.deepcopy(getattr(self, name, None)) for name in self.checkpoint_attrs}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        for name, value in state.items():
            setattr(self, name, copy.deepcopy(value))

    # --- reply validation ---------------------------------------------------
    def screen_replies(self, replies: list[Message], sampled: list[int]) -> tuple[list[Message], dict[str, int], int]:
        """Split replies into valid ones, rejections per reason and the number of error replies.

        Raises :class:`RunAborted` when a reply says a Ray actor died: Flower 1.42 does not
        replace it, so later rounds would silently train on fewer clients.
        """
        valid: list[Message] = []
        rejected: dict[str, int] = {}
        failed = 0
        seen: set[int] = set()
        expected = set(sampled)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                reason = msg.error.reason or ""
                log(WARNING, "node %d failed: %s", node, reason[:500])
                if "ActorDiedError" in reason or "RayActorError" in reason:
                    raise RunAborted(
                        f"a Ray actor died while serving node {node} ({reason.splitlines()[0][:200]}). "
                        "Flower 1.42 does not replace "
                        "dead actors, so every later round would silently lose its clients; the run stops here. "
                        "The last complete round is checkpointed: rerun with resume=true to continue."
                    )
                continue
            try:
                if node in seen:
                    raise Rejected("duplicate-node", f"node {node} already replied this round")
                seen.add(node)
                if expected and node not in expected:
                    raise Rejected("unexpected-node", f"node {node} was not sampled this round")
                params, metrics = _extract_update(msg)
                check_update(params, metrics, self.update_rules, self._drift_global)
            except Rejected as err:
                rejected[err.reason] = rejected.get(err.reason, 0) + 1
                log(WARNING, "reply of node %d rejected: %s", node, err)
                continue
            valid.append(msg)
        return valid, rejected, failed

    # --- the second exchange ------------------------------------------------
    def measure_round(self, server_round: int, arrays: ArrayRecord, train_replies: list[Message]) -> dict[str, float]:
        """Send W^{r+1} to the nodes that trained and summarise their drift replies."""
        if self._drift_grid is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        t0 = time.perf_counter()
        self._drift_last_measured = (server_round, arrays)
        loss_before: dict[int, float] = {}
        for reply in train_replies:
            metrics = next(iter(reply.content.metric_records.values()), {})
            if "loss-before" in metrics:
                loss_before[reply.metadata.src_node_id] = float(metrics["loss-before"])
        record = RecordDict(
            {
                "arrays": arrays,
                "config": ConfigRecord(
                    {"server-round": server_round, "return-gradient": self.drift_with_gradients}
                ),
            }
        )
        messages = [
            Message(content=record, dst_node_id=r.metadata.src_node_id, message_type=DRIFT_MESSAGE_TYPE)
            for r in train_replies
        ]
        drift_replies = list(self._drift_grid.send_and_receive(messages, timeout=self.drift_timeout))
        drifts: list[ClientDrift] = []
        before: list[float] = []
        grad_sum: dict[str, np.ndarray] | None = None
        rejected = 0
        for reply in drift_replies:
            if reply.has_error():
                log(INFO, "drift: node %d replied with an error: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            try:
                drift, gradient = _parse_drift_reply(reply, self.drift_with_gradients, self.drift_initial)
            except (KeyError, ValueError, TypeError) as err:
                rejected += 1
                log(WARNING, "drift: reply of node %d rejected: %s", reply.metadata.src_node_id, err)
                continue
            drifts.append(drift)
            before.append(loss_before.get(reply.metadata.src_node_id, math.nan))
            if gradient is not None:
                grad_sum = _accumulate(grad_sum, gradient, drift.num_examples)
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
        out["clients-unmeasured"] = len(train_replies) - len(drifts)
        out["drift-rejected"] = rejected
        out["drift-seconds"] = time.perf_counter() - t0
        return out


def _extract_update(msg: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise Rejected(
            "malformed",
            f"{len(content.array_records)} ArrayRecords and {len(content.metric_records)} MetricRecords, expected 1 and 1",
        )
    try:
        params = arrays_to_params(next(iter(content.array_records.values())))
    except Exception as err:  # unreadable bytes, unknown dtype, ...
        raise Rejected("malformed", f"unreadable arrays: {type(err).__name__}: {err}") from err
    return params, dict(next(iter(content.metric_records.values())))


def _parse_drift_reply(
    reply: Message, want_gradient: bool, reference: Mapping[str, np.ndarray]
) -> tuple[ClientDrift, dict[str, np.ndarray] | None]:
    metrics = next(iter(reply.content.metric_records.values()), None)
    if metrics is None:
        raise KeyError("drift reply has no MetricRecord")
    drift = ClientDrift.from_metrics(metrics)
    if drift.num_examples <= 0:
        raise ValueError(f"num-examples={drift.num_examples}: expected a positive integer")
    values = [v for k, v in drift.to_metrics().items() if k != "flips-init"]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("non-finite drift measurement")
    gradient = None
    if want_gradient:
        if GRADIENT_RECORD_KEY not in reply.content.array_records:
            raise KeyError(f"drift reply lacks the {GRADIENT_RECORD_KEY!r} ArrayRecord")
        gradient = arrays_to_params(reply.content.array_records[GRADIENT_RECORD_KEY])
        if set(gradient) != set(reference) or any(gradient[k].shape != reference[k].shape for k in reference):
            raise ValueError("gradient arrays do not match the model's parameters")
        if not all(np.isfinite(g).all() for g in gradient.values()):
            raise ValueError("non-finite gradient")
    return drift, gradient


def _accumulate(acc: dict[str, np.ndarray] | None, grad: Mapping[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    if acc is None:
        return {k: np.asarray(v, np.float64) * weight for k, v in grad.items()}
    for k, v in grad.items():
        acc[k] += np.asarray(v, np.float64) * weight
    return acc


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
