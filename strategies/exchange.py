"""The drift exchange: the second exchange of a round, which the theory is about.

After the average W^{r+1} is formed, it goes to every node whose update entered it;
each node compares the gradient at its client's final local model W_k (kept on its
disk since the train exchange) with the gradient at W^{r+1} and replies with scalars
(THEORY.md's drift, divergence, flips, ...), and, for gradient dissimilarity, its
gradient at W^{r+1}. A packed node replies with the sums of its cohort
(:class:`fedavg_relu.core.packed.DriftSums`), its lockstep sums and its per-client rows.

:class:`DriftExchange` (one client per node) and :class:`PackedDriftExchange` (cohorts)
send the messages, read the replies as they arrive, check each one against the schema
(:mod:`fedavg_relu.flower.schema`) and against what the node did in the train exchange
(its ``num-examples``, the clients it was given), and summarise the valid ones. A bad
reply is counted with its reason (``drift-rejected-<reason>``) and never reaches the
metrics or the per-client table; nothing here raises on a reply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from fedavg_relu.core.aggregation import squared_difference
from fedavg_relu.core.metrics import ClientDrift, client_row, summarize_drift
from fedavg_relu.core.packed import DriftSums, lockstep_metrics, summarize_drift_sums
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.client_table import client_rows_from_lists
from fedavg_relu.flower.records import array_records, arrays_to_views, metric_records, release
from fedavg_relu.flower.schema import Rejected
from fedavg_relu.flower.streaming import node_of

from .replies import ErrorTally, accumulate, client_order


@dataclass(frozen=True)
class DriftSettings:
    """What the drift exchange measures and how long it waits.

    Attributes
    ----------
    initial_params
        W^0's trained parameters (the gradient arrays' names and shapes).
    learning_rate
        The clients' local step size eta (effective smoothness in step units).
    gradient_dissimilarity
        Ask nodes for their gradient at W^{r+1} (one model-size upload each).
    nonlinear
        Also measure the nonlinear drift fraction.
    client_metrics
        Keep one row of scalars per measured client (the run's ``clients.jsonl``).
    timeout
        Seconds to wait for the replies.
    max_num_examples
        The run's ``max-num-examples``.
    num_partitions
        Clients in the federation (a reported partition id must be below it).
    """

    initial_params: Mapping[str, np.ndarray]
    learning_rate: float
    gradient_dissimilarity: bool = True
    nonlinear: bool = False
    client_metrics: bool = True
    timeout: float = 600.0
    max_num_examples: int = 10**9
    num_partitions: int = 10**9


@dataclass
class TrainedNode:
    """What a node did in this round's train exchange (what its drift reply must agree with)."""

    node: int
    num_examples: int  # its train reply's num-examples
    loss_before: float  # f_k(W^r) it reported (packed: the cohort's weighted mean)
    local_steps: float
    clients: list[int] = field(default_factory=list)  # packed: the virtual clients it trained


@dataclass
class ExchangeResult:
    """The summary of one drift exchange: round metrics and per-client rows."""

    metrics: dict[str, float]
    rows: list[dict[str, Any]]


class DriftExchange:
    """The drift exchange of the one-client-per-node path (message type ``query.drift``)."""

    message_type = wire.DRIFT

    def __init__(self, settings: DriftSettings, extra_config: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.extra_config = dict(extra_config or {})

    def messages(self, server_round: int, arrays: ArrayRecord, nodes: list[int]) -> list[Message]:
        """W^{r+1} and the round to every node in ``nodes``."""
        s = self.settings
        config = {
            wire.SERVER_ROUND: server_round, wire.RETURN_GRADIENT: s.gradient_dissimilarity,
            wire.DRIFT_NONLINEAR: s.nonlinear, wire.CLIENT_METRICS: s.client_metrics, **self.extra_config,
        }
        return [
            Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config)}), dst_node_id=node,
                    message_type=self.message_type)
            for node in nodes
        ]

    def run(self, grid, server_round: int, arrays: ArrayRecord, trained: list[TrainedNode]) -> ExchangeResult:
        """Send W^{r+1} to the nodes in ``trained``, read and check their replies, summarise the valid ones."""
        t0 = time.perf_counter()
        by_node = {t.node: t for t in trained}
        acc = self._new_accumulator()
        errors = ErrorTally(f"round {server_round} drift")
        rejected: dict[str, int] = {}
        answered: set[int] = set()
        messages = self.messages(server_round, arrays, list(by_node))
        for reply in grid.send_and_receive(messages, timeout=self.settings.timeout):
            node = node_of(grid, reply)
            try:
                if node not in by_node:
                    raise Rejected("unexpected-node", f"node {node} was not asked")
                if node in answered:
                    raise Rejected("duplicate-node", f"node {node} already answered")
                answered.add(node)
                if reply.has_error():
                    errors.add(node, reply.error.reason or "")
                    continue
                self._take(acc, reply, by_node[node], server_round)
            except Rejected as err:
                rejected[err.reason] = rejected.get(err.reason, 0) + 1
                log(WARNING, "round %d drift: reply of node %d rejected: %s", server_round, node, err)
            finally:
                release(reply)
        errors.log_repeats()
        out, rows = self._summary(acc, trained)
        out[wire.DRIFT_REJECTED] = sum(rejected.values())
        out.update({wire.DRIFT_REJECTED_PREFIX + reason: count for reason, count in sorted(rejected.items())})
        out[wire.DRIFT_SECONDS] = time.perf_counter() - t0
        return ExchangeResult(out, sorted(rows, key=client_order) if self.settings.client_metrics else [])

    # --- the one-client-per-node replies ------------------------------------------------
    def _new_accumulator(self) -> dict[str, Any]:
        return {"drifts": [], "before": [], "rows": [], "grad_sum": None, "clients": set()}

    def _gradient(self, reply: Message, record: str) -> dict[str, np.ndarray] | None:
        """The reply's gradient arrays (``record``), checked against W^0's names, shapes, real dtype, finiteness."""
        if not self.settings.gradient_dissimilarity:
            return None
        records = array_records(reply.content)
        if record not in records:
            raise Rejected("record-layout", f"the drift reply lacks the {record!r} ArrayRecord")
        try:
            gradient = arrays_to_views(records[record])  # read-only: checked and summed
        except Exception as err:  # noqa: BLE001 - unreadable bytes, unknown dtype
            raise Rejected("malformed", f"unreadable gradient: {type(err).__name__}: {err}") from err
        ref = self.settings.initial_params
        if set(gradient) != set(ref):
            raise Rejected("array-names", f"gradient arrays {sorted(gradient)}, expected {sorted(ref)}")
        for k, g in gradient.items():
            if g.shape != np.shape(ref[k]):
                raise Rejected("array-shape", f"gradient {k}: shape {g.shape}, expected {np.shape(ref[k])}")
            if g.dtype.kind != "f":
                raise Rejected("array-dtype", f"gradient {k}: dtype {g.dtype}, expected a real floating dtype")
            if not np.isfinite(g).all():
                raise Rejected("non-finite", f"gradient {k} contains NaN or inf")
        return gradient

    @staticmethod
    def _metrics(reply: Message) -> Mapping[str, object]:
        records = metric_records(reply.content)
        if len(records) != 1:
            raise Rejected("malformed", f"{len(records)} MetricRecords, expected 1")
        return next(iter(records.values()))

    def _take(self, acc, reply: Message, node: TrainedNode, server_round: int) -> None:
        s = self.settings
        values = wire.check_metrics(wire.DRIFT_METRICS, self._metrics(reply), {
            wire.TRAINED_EXAMPLES: node.num_examples, wire.NUM_PARTITIONS_BOUND: s.num_partitions - 1,
        })
        client = int(values[wire.PARTITION_ID]) if s.client_metrics and wire.PARTITION_ID in values else None
        if client is not None and client in acc["clients"]:
            raise Rejected("client-ids", f"partition-id={client} already reported this round")
        gradient = self._gradient(reply, wire.GRADIENT)
        drift = ClientDrift.from_metrics({k: v for k, v in values.items() if k != wire.PARTITION_ID})
        if client is not None:
            acc["clients"].add(client)
        acc["drifts"].append(drift)
        acc["before"].append(node.loss_before)
        if s.client_metrics:
            row: dict[str, Any] = {"round": server_round, "client": client, "node": node.node}
            row.update(client_row(drift, node.loss_before, node.local_steps, s.nonlinear))
            acc["rows"].append(row)
        if gradient is not None:
            acc["grad_sum"] = accumulate(acc["grad_sum"], gradient, drift.num_examples)

    def _summary(self, acc, trained: list[TrainedNode]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        drifts = acc["drifts"]
        mean_grad_sq = None
        if acc["grad_sum"] is not None and len(drifts) >= 2:  # dissimilarity compares clients: two at least
            total = float(sum(d.num_examples for d in drifts))
            mean_grad_sq = sum(squared_difference(g) for g in acc["grad_sum"].values()) / total**2
        out = summarize_drift(drifts, self.settings.learning_rate, mean_grad_sq)
        if drifts:
            p = np.array([d.num_examples for d in drifts], np.float64)
            p /= p.sum()
            loss_prev = float(p @ np.array(acc["before"]))
            out[wire.LOSS_BEFORE] = loss_prev
            out["loss-ratio"] = out["global-loss"] / loss_prev if loss_prev > 0 else math.nan
        out[wire.CLIENTS_MEASURED] = len(drifts)
        out[wire.CLIENTS_UNMEASURED] = len(trained) - len(drifts)
        return out, acc["rows"]


class PackedDriftExchange(DriftExchange):
    """The drift exchange of packed mode (``query.packed_drift``): each node replies with its cohort's sums."""

    message_type = wire.PACKED_DRIFT

    def _new_accumulator(self) -> dict[str, Any]:
        return {"total": DriftSums(), "lockstep": {}, "lockstep_nodes": 0, "rows": [], "grad_sum": None}

    def _take(self, acc, reply: Message, node: TrainedNode, server_round: int) -> None:
        s = self.settings
        values = wire.check_metrics(wire.PACKED_DRIFT_METRICS, self._metrics(reply), {
            wire.TRAINED_EXAMPLES: node.num_examples, wire.CLIENTS_GIVEN: len(node.clients),
            wire.NUM_PARTITIONS_BOUND: s.num_partitions - 1,
        })
        sums = DriftSums.from_metrics(values)
        if sums.num_clients != len(node.clients):
            raise Rejected("metric-bounds", f"num-clients={sums.num_clients}: expected {len(node.clients)}, the clients it trained")
        steps = self._lockstep(values, sums)
        rows = self._rows(values, node) if s.client_metrics else []
        gradient = self._gradient(reply, wire.GRADIENT_SUM)
        acc["total"].merge(sums)
        if steps:
            acc["lockstep_nodes"] += 1
            for t, step_sums in steps.items():
                acc["lockstep"].setdefault(t, DriftSums()).merge(step_sums)
        acc["rows"].extend({"round": server_round, "client": r.pop("client"), "node": node.node, **r} for r in rows)
        if gradient is not None:
            acc["grad_sum"] = accumulate(acc["grad_sum"], gradient, 1.0)

    @staticmethod
    def _lockstep(values: Mapping[str, object], sums: DriftSums) -> dict[int, DriftSums]:
        """The per-step sums; each step must count the reply's clients and examples, none may be empty."""
        steps = [int(t) for t in values.get(wire.LOCKSTEP_STEPS, [])]  # type: ignore[union-attr]
        out = {}
        for t in steps:
            try:
                step = DriftSums.from_metrics(values, prefix=f"{wire.LOCKSTEP_PREFIX}{t}/")
            except KeyError as err:
                raise Rejected("metric-keys", f"lockstep step {t}: {err}") from err
            if step.num_clients != sums.num_clients or step.num_examples != sums.num_examples:
                raise Rejected("metric-bounds", f"lockstep step {t}: {step.num_clients} clients / {step.num_examples} "
                               f"examples, expected {sums.num_clients} / {sums.num_examples}")
            for key, value in step.to_metrics().items():
                if key.endswith("-max") or math.isnan(value):
                    continue
                if value < 0:
                    raise Rejected("metric-bounds", f"lockstep step {t}: {key}={value}: expected >= 0")
            out[t] = step
        if not steps and any(str(k).startswith(wire.LOCKSTEP_PREFIX) for k in values):
            raise Rejected("metric-keys", "lockstep sums without lockstep-steps")
        return out

    @staticmethod
    def _rows(values: Mapping[str, object], node: TrainedNode) -> list[dict]:
        """The cohort's per-client rows: exactly the clients it trained, each once, counts adding up."""
        try:
            rows = client_rows_from_lists(values)
        except ValueError as err:
            raise Rejected("metric-type", str(err)) from err
        ids = [r["client"] for r in rows]
        if sorted(ids) != sorted(node.clients):
            raise Rejected("client-ids", f"client/ids={ids}: expected the clients it trained, {sorted(node.clients)}")
        counts = [r.get("num-examples") for r in rows]
        if all(c is not None for c in counts) and sum(counts) != values["num-examples"]:  # type: ignore[arg-type]
            raise Rejected("metric-bounds", f"client/num-examples adds up to {sum(counts)}, not num-examples={values['num-examples']}")
        return rows

    def _summary(self, acc, trained: list[TrainedNode]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        total: DriftSums = acc["total"]
        mean_grad_sq = None
        if acc["grad_sum"] is not None and total.num_clients >= 2:
            mean_grad_sq = float(sum(np.sum((g / total.num_examples) ** 2) for g in acc["grad_sum"].values()))
        out = summarize_drift_sums(total, self.settings.learning_rate, mean_grad_sq)
        if total.num_clients > 0:
            loss_prev = total.loss_before / total.num_examples
            out[wire.LOSS_BEFORE] = loss_prev
            out["loss-ratio"] = out["global-loss"] / loss_prev if loss_prev > 0 else math.nan
        if acc["lockstep"]:
            out.update(lockstep_metrics(acc["lockstep"], self.settings.learning_rate))
            out[wire.LOCKSTEP_NODES] = acc["lockstep_nodes"]
        out[wire.CLIENTS_MEASURED] = total.num_clients
        out[wire.CLIENTS_UNMEASURED] = sum(len(t.clients) for t in trained) - total.num_clients
        return out, acc["rows"]
