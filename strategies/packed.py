"""Packed FedAvg: Flower nodes that each simulate a cohort of virtual clients.

With ``clients-per-node = K > 1`` node j holds virtual clients ``jK .. jK+K-1``
(:mod:`fedavg_relu.core.packed`). :class:`PackedFedAvg` is :class:`DriftFedAvg`
(DriftMeasurement + Flower's FedAvg) with three changes:

1. ``configure_train`` samples *virtual clients* (seeded,
   :func:`fedavg_relu.core.packed.sample_clients`), asks once (``query.cohort``) which
   node holds which, and sends one ``train.packed`` message per node that holds a
   sampled client, naming them in the ConfigRecord (``virtual-clients``). Nodes
   without a sampled client get no message and cost nothing. Every packed message
   carries ``clients-per-node`` and ``num-partitions``: the layout is the server's
   word (the ServerApp may pack a federation that has fewer SuperNodes than clients).
2. Train replies look exactly like the standard path's: the cohort's weighted
   mean model and ``num-examples = sum_k n_k``. The mixin validates them as
   usual (names, shapes, dtypes, finite values, metric keys, example counts) and
   Flower's FedAvg averages them: ``sum_j N_j (S_j/N_j) / sum_j N_j`` is the
   average over all trained virtual clients.
3. ``measure_round`` gathers :class:`fedavg_relu.core.packed.DriftSums` from every node,
   adds them up and computes the same metrics as the standard path
   (:func:`fedavg_relu.core.packed.summarize_drift_sums`), plus the lockstep drift.

Client counts (``clients-sampled``/``-trained``/``-failed``/``-rejected``/``-measured``)
count virtual clients: a node's clients count as failed when its reply was an error
or never came, as rejected when its reply was rejected. The ``rejected-<reason>``
counters count node replies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedavg_relu.flower import protocol as wire
from fedavg_relu.core.packed import DriftSums, lockstep_metrics, lockstep_sums_from_metrics, sample_clients, summarize_drift_sums
from fedavg_relu.flower.client_table import client_rows_from_lists
from fedavg_relu.flower.records import array_records, arrays_to_params, metric_records, release
from fedavg_relu.flower.streaming import node_of

from .replies import ErrorTally, client_order
from .fedavg import DriftFedAvg
# sums a packed drift reply may legitimately carry as NaN (a zero gradient norm; unknown W^0 patterns)
_NAN_ALLOWED = {"relative", "relative-max", "flips-init", "smoothness-max"}
# maxima that stay at -inf while no client contributed (the count that says so)
_EMPTY_MAX = {"smoothness-max": "moved-clients", "nonlinear-max": "nonlinear-examples"}


class PackedFedAvg(DriftFedAvg):
    """FedAvg over cohorts of virtual clients (call ``setup_drift`` and ``setup_packed`` once)."""

    def setup_packed(
        self, num_partitions: int, clients_per_node: int, fraction: float, seed: int, wait_timeout: float = 600.0
    ) -> None:
        """What the sampling needs: P virtual clients, K per node, the share trained per round, the seed."""
        self.num_partitions = int(num_partitions)
        self.clients_per_node = int(clients_per_node)
        self.packed_fraction = float(fraction)
        self.packed_seed = int(seed)
        self.wait_timeout = float(wait_timeout)
        self.num_nodes_expected = math.ceil(self.num_partitions / self.clients_per_node)
        self._holder: dict[int, int] | None = None  # virtual client -> node id
        self._assigned: dict[int, dict[int, int]] = {}  # round -> node id -> clients sent

    # --- sampling -------------------------------------------------------------------
    def layout_config(self) -> dict[str, int]:
        """The cohort layout every packed message carries (the server's word, not the run config's)."""
        return {wire.CLIENTS_PER_NODE: self.clients_per_node, wire.NUM_PARTITIONS: self.num_partitions}

    def drift_config_extra(self) -> dict[str, int]:
        """Packed drift messages carry the cohort layout too."""
        return self.layout_config()

    def discover_cohorts(self, grid: Grid) -> dict[int, int]:
        """Ask every node once which virtual clients it holds; return client -> node id."""
        deadline = time.monotonic() + self.wait_timeout
        while len(node_ids := list(grid.get_node_ids())) < self.num_nodes_expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of {self.num_nodes_expected} nodes connected")
            log(INFO, "packed: waiting for nodes (%d of %d)", len(node_ids), self.num_nodes_expected)
            time.sleep(1.0)
        messages = [
            Message(content=RecordDict({wire.CONFIG: ConfigRecord(self.layout_config())}), dst_node_id=n,
                    message_type=wire.COHORT)
            for n in node_ids
        ]
        holder: dict[int, int] = {}
        errors = ErrorTally("packed cohort query")
        for reply in grid.send_and_receive(messages, timeout=self.wait_timeout):
            node = node_of(grid, reply)
            if reply.has_error():
                errors.add(node, reply.error.reason or "")
                continue
            metrics = next(iter(metric_records(reply.content).values()))
            first, count = int(metrics[wire.FIRST_CLIENT]), int(metrics[wire.NUM_CLIENTS])
            for k in range(first, first + count):
                if k in holder:
                    raise RuntimeError(f"virtual client {k} is held by two nodes ({holder[k]}, {node})")
                holder[k] = node
        errors.log_repeats()
        missing = self.num_partitions - len(holder)
        if missing:
            log(WARNING, "packed: %d of %d virtual clients have no node; they are never trained", missing, self.num_partitions)
        log(INFO, "packed: %d virtual clients on %d nodes", len(holder), len(set(holder.values())))
        return holder

    # --- Flower hooks --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per node holding a sampled virtual client, naming those clients."""
        if self._holder is None:
            self._holder = self.discover_cohorts(grid)
        server_round, config = self.begin_round(server_round, arrays, config, grid)
        config[wire.SERVER_ROUND] = server_round
        for key, value in self.layout_config().items():
            config[key] = value
        by_node: dict[int, list[int]] = {}
        for k in sample_clients(self.num_partitions, self.packed_fraction, self.packed_seed, server_round):
            if k in self._holder:
                by_node.setdefault(self._holder[k], []).append(k)
        messages = []
        for node, ids in sorted(by_node.items()):
            node_config = ConfigRecord(dict(config))
            node_config[wire.VIRTUAL_CLIENTS] = ids
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            messages.append(Message(content=content, dst_node_id=node, message_type=wire.PACKED_TRAIN))
        log(INFO, "configure_train: %d virtual clients on %d nodes", sum(map(len, by_node.values())), len(by_node))
        self._drift_sampled[server_round] = list(by_node)
        self._assigned[server_round] = {node: len(ids) for node, ids in by_node.items()}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The mixin's validation and FedAvg's average; client counts in virtual clients."""
        true_round = server_round + self.round_offset
        assigned = self._assigned.pop(true_round, {})
        arrays, merged = super().aggregate_train(server_round, replies)
        sampled = sum(assigned.values())
        trained = sum(assigned.get(n, 0) for n in self._round_valid_nodes)
        rejected = sum(assigned.get(n, 0) for n in set(self._round_rejected_nodes))
        counts = {
            "clients-sampled": sampled, "clients-trained": trained, "clients-rejected": rejected,
            # error replies, and nodes that sent nothing in time
            "clients-failed": sampled - trained - rejected,
        }
        row = self.round_metrics[true_round]
        if "clients-measured" in row:
            counts["clients-unmeasured"] = trained - int(row["clients-measured"])
        for key, value in counts.items():
            row[key] = value
            merged[key] = value
        return arrays, merged

    # --- the second exchange -------------------------------------------------------
    def measure_round(self, server_round: int, arrays: ArrayRecord, trained: list[tuple[int, float]]) -> dict[str, float]:
        """Send W^{r+1} to the nodes that trained; add up their :class:`DriftSums` as they arrive; summarise."""
        if self._drift_grid is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        t0 = time.perf_counter()
        self._drift_last_measured = (server_round, arrays)
        messages = self.drift_messages(server_round, arrays, [node for node, _ in trained], wire.PACKED_DRIFT)
        errors = ErrorTally(f"round {server_round} drift")
        total = DriftSums()
        lockstep: dict[int, DriftSums] = {}
        lockstep_nodes = 0
        grad_sum: dict[str, np.ndarray] | None = None
        rejected = 0
        rows: list[dict] = []
        for reply in self._drift_grid.send_and_receive(messages, timeout=self.drift_timeout):
            node = node_of(self._drift_grid, reply)
            if reply.has_error():
                errors.add(node, reply.error.reason or "")
                continue
            try:
                sums, steps, gradient = self._parse_packed_drift(reply)
                cohort_rows = self._parse_client_rows(reply, sums.num_clients)
            except (KeyError, ValueError, TypeError) as err:
                rejected += 1
                log(WARNING, "drift: reply of node %d rejected: %s", node, err)
                continue
            rows.extend({"round": server_round, "client": r.pop("client"), "node": node, **r} for r in cohort_rows)
            total.merge(sums)
            if steps:
                lockstep_nodes += 1
                for t, s in steps.items():
                    lockstep.setdefault(t, DriftSums()).merge(s)
            if gradient is not None:
                if grad_sum is None:
                    grad_sum = {k: np.zeros(v.shape, np.float64) for k, v in gradient.items()}
                for k, v in gradient.items():
                    grad_sum[k] += v
            del gradient
            release(reply)
        errors.log_repeats()
        if self.client_metrics:
            self.client_rows[server_round] = sorted(rows, key=client_order)
        mean_grad_sq = None
        if grad_sum is not None and total.num_clients > 0:
            mean_grad_sq = float(sum(np.sum((g / total.num_examples) ** 2) for g in grad_sum.values()))
        out = summarize_drift_sums(total, self.drift_learning_rate, mean_grad_sq)
        if total.num_clients > 0:
            loss_prev = total.loss_before / total.num_examples
            out["loss-before"] = loss_prev
            out["loss-ratio"] = out["global-loss"] / loss_prev if loss_prev > 0 else math.nan
        if lockstep:
            out.update(lockstep_metrics(lockstep, self.drift_learning_rate))
            out["lockstep-nodes"] = lockstep_nodes
        out["clients-measured"] = total.num_clients
        out["clients-unmeasured"] = 0  # fixed in aggregate_train, which knows the virtual clients trained
        out["drift-rejected"] = rejected
        out["drift-seconds"] = time.perf_counter() - t0
        return out

    def _parse_packed_drift(self, reply: Message) -> tuple[DriftSums, dict[int, DriftSums], dict[str, np.ndarray] | None]:
        metrics = next(iter(metric_records(reply.content).values()), None)
        if metrics is None:
            raise KeyError("drift reply has no MetricRecord")
        values = dict(metrics)
        sums = DriftSums.from_metrics(values)
        if sums.num_clients <= 0 or sums.num_examples <= 0:
            raise ValueError(f"num-clients={sums.num_clients}, num-examples={sums.num_examples}: expected positive")
        flat = sums.to_metrics()
        bad = [
            k for k, v in flat.items()
            if not math.isfinite(v) and not (k in _NAN_ALLOWED and math.isnan(v))
            and not (k in _EMPTY_MAX and v == -math.inf and flat[_EMPTY_MAX[k]] == 0)
        ]
        if bad:
            raise ValueError(f"non-finite drift sums: {bad}")
        steps = lockstep_sums_from_metrics(values)
        gradient = None
        if self.drift_with_gradients:
            if wire.GRADIENT_SUM not in array_records(reply.content):
                raise KeyError(f"drift reply lacks the {wire.GRADIENT_SUM!r} ArrayRecord")
            gradient = arrays_to_params(array_records(reply.content)[wire.GRADIENT_SUM])
            ref = self.drift_initial
            if set(gradient) != set(ref) or any(gradient[k].shape != ref[k].shape for k in ref):
                raise ValueError("gradient arrays do not match the model's parameters")
            if not all(np.isfinite(g).all() for g in gradient.values()):
                raise ValueError("non-finite gradient")
        return sums, steps, gradient

    def _parse_client_rows(self, reply: Message, num_clients: int) -> list[dict]:
        """The cohort's per-client rows (``client/*`` lists; none unless ``client_metrics``); ValueError if malformed."""
        if not self.client_metrics:
            return []
        values = dict(next(iter(metric_records(reply.content).values())))
        rows = client_rows_from_lists(values)
        if len(rows) != num_clients:
            raise ValueError(f"{len(rows)} per-client rows for num-clients={num_clients}")
        return rows
