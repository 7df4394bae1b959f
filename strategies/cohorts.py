"""Packed mode's layout: which Flower node simulates which virtual clients, decided on the server.

With ``clients-per-node = K > 1`` the node whose ``partition-id`` is j simulates the
virtual clients ``jK .. min(jK+K, P)-1``. The server asks each node for its
partition id (``query.cohort``; a node that is new or whose last answer was bad is
asked again the next round, so one bad reply costs that node one round, not the
run), builds the holder map from the answers, and names the clients in every packed
message (``virtual-clients``): nodes never derive their cohort from their own copy of
the run config.

The inner strategy samples clients exactly as it samples nodes: it is handed a
:class:`VirtualGrid` whose node ids are the virtual clients (client k is id k + 1).
Its messages (one per sampled client, all with the same content) are then packed into
one ``train.packed`` message per node that holds a sampled client
(:meth:`Cohorts.pack`). Its ``fraction_train``, ``min_train_nodes`` and sampling are
thereby the inner strategy's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from fedavg_relu.core.packed import node_clients
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.records import config_records, metric_records
from fedavg_relu.flower.schema import Rejected
from fedavg_relu.flower.streaming import node_of

from .replies import ErrorTally

#: Virtual client k is node id ``k + VIRTUAL_ID_OFFSET`` to the inner strategy (node id 0 is not a valid id).
VIRTUAL_ID_OFFSET = 1


class VirtualGrid:
    """The nodes the inner strategy samples from in packed mode: one per virtual client."""

    def __init__(self, num_partitions: int) -> None:
        self._ids = [k + VIRTUAL_ID_OFFSET for k in range(num_partitions)]

    def get_node_ids(self) -> list[int]:
        """Every virtual client's id."""
        return list(self._ids)

    def __getattr__(self, name: str):
        raise AttributeError(
            f"packed mode: the inner strategy called grid.{name} while configuring a round; only get_node_ids is "
            "available there (the server packs the strategy's messages into one per node)"
        )


@dataclass
class PackedRound:
    """One round's packing: the node messages and which clients went to which node."""

    messages: list[Message]
    assigned: dict[int, list[int]]  # node -> virtual clients it trains this round
    unheld: list[int] = field(default_factory=list)  # sampled clients no node holds this round


class Cohorts:
    """The holder map of packed mode and the packing of a round's messages.

    Parameters
    ----------
    num_partitions
        P, the virtual clients of the federation.
    clients_per_node
        K, the virtual clients a node simulates.
    wait_timeout
        Seconds to wait, before round 1, for the nodes the layout needs to connect.
    """

    def __init__(self, num_partitions: int, clients_per_node: int, wait_timeout: float = 600.0) -> None:
        if clients_per_node < 1 or num_partitions < 1:
            raise ValueError(f"clients-per-node={clients_per_node}, num-partitions={num_partitions}: expected >= 1")
        self.num_partitions = int(num_partitions)
        self.clients_per_node = int(clients_per_node)
        self.wait_timeout = float(wait_timeout)
        self.nodes_needed = -(-self.num_partitions // self.clients_per_node)
        self.partition_of: dict[int, int] = {}  # node -> its partition id (answers that were valid)
        self._waited = False

    def virtual_grid(self) -> VirtualGrid:
        """The grid the inner strategy samples clients from."""
        return VirtualGrid(self.num_partitions)

    def layout_config(self) -> dict[str, int]:
        """What every packed message carries besides its clients."""
        return {wire.NUM_PARTITIONS: self.num_partitions}

    # --- which node holds which clients ----------------------------------------------------
    def discover(self, grid, server_round: int) -> tuple[dict[int, int], int]:
        """client -> node for this round, and how many nodes' cohort replies were bad or missing.

        Nodes already known keep their answer; the others are asked (``query.cohort``).
        """
        node_ids = self._connected(grid)
        self.partition_of = {n: j for n, j in self.partition_of.items() if n in node_ids}  # gone: forgotten
        ask = [n for n in node_ids if n not in self.partition_of]
        failed = 0
        if ask:
            failed = self._ask(grid, ask, server_round)
        holder: dict[int, int] = {}
        for node, j in sorted(self.partition_of.items(), key=lambda item: (item[1], item[0])):
            clients = node_clients(j, self.clients_per_node, self.num_partitions) if j * self.clients_per_node < self.num_partitions else []
            if clients and clients[0] in holder:  # two nodes with one partition id: the first keeps it
                log(WARNING, "packed: nodes %d and %d both report partition-id %d; node %d stays idle",
                    holder[clients[0]], node, j, node)
                continue
            for k in clients:
                holder[k] = node
        if server_round == 1 or ask:
            log(INFO, "packed: %d virtual clients on %d nodes", len(holder), len(set(holder.values())))
            if len(holder) < self.num_partitions:
                log(WARNING, "packed: %d of %d virtual clients have no node this round", self.num_partitions - len(holder),
                    self.num_partitions)
        return holder, failed

    def _connected(self, grid) -> list[int]:
        """The connected nodes; before the first round, wait (up to ``wait_timeout``) for the layout's count."""
        deadline = time.monotonic() + (0.0 if self._waited else self.wait_timeout)
        while len(node_ids := list(grid.get_node_ids())) < self.nodes_needed and time.monotonic() < deadline:
            log(INFO, "packed: waiting for nodes (%d of %d)", len(node_ids), self.nodes_needed)
            time.sleep(1.0)
        if not self._waited and len(node_ids) < self.nodes_needed:
            log(WARNING, "packed: only %d of %d nodes connected after %.0fs; going on with them",
                len(node_ids), self.nodes_needed, self.wait_timeout)
        self._waited = True
        return node_ids

    def _ask(self, grid, nodes: list[int], server_round: int) -> int:
        """Ask ``nodes`` for their partition id; remember the valid answers; return how many were not."""
        messages = [
            Message(content=RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round, **self.layout_config()})}),
                    dst_node_id=n, message_type=wire.COHORT)
            for n in nodes
        ]
        errors = ErrorTally(f"round {server_round} cohort query")
        answered: set[int] = set()
        for reply in grid.send_and_receive(messages, timeout=self.wait_timeout):
            node = node_of(grid, reply)
            if node not in nodes or node in answered:
                log(WARNING, "packed: cohort reply of node %d dropped (not asked, or a second reply)", node)
                continue
            answered.add(node)
            if reply.has_error():
                errors.add(node, reply.error.reason or "")
                continue
            try:
                records = metric_records(reply.content)
                if len(records) != 1:
                    raise Rejected("malformed", f"{len(records)} MetricRecords, expected 1")
                values = wire.check_metrics(wire.COHORT_METRICS, next(iter(records.values())))
                self.partition_of[node] = int(values[wire.PARTITION_ID])
            except Rejected as err:
                log(WARNING, "round %d: cohort reply of node %d rejected (%s); the node sits this round out", server_round, node, err)
        errors.log_repeats()
        return len(nodes) - sum(1 for n in nodes if n in self.partition_of)

    # --- one message per node ---------------------------------------------------------------
    def pack(self, messages: Iterable[Message], holder: dict[int, int]) -> PackedRound:
        """The inner strategy's per-client messages as one ``train.packed`` message per holding node.

        Raises ``ValueError`` when the inner strategy sent clients different contents (packed
        mode trains a cohort from one message).
        """
        by_node: dict[int, list[int]] = {}
        content = None
        unheld = []
        for msg in messages:
            if content is None:
                content = msg.content
            elif msg.content is not content:
                raise ValueError(
                    "packed mode needs the strategy to send every client the same message; this one builds one "
                    "per client. Use one node per client (clients-per-node = 0)"
                )
            k = int(msg.metadata.dst_node_id) - VIRTUAL_ID_OFFSET
            if k in holder:
                by_node.setdefault(holder[k], []).append(k)
            else:
                unheld.append(k)
        out = []
        for node, ids in sorted(by_node.items()):
            record = RecordDict()
            for name, rec in content.items():  # type: ignore[union-attr]
                record[name] = rec
            configs = config_records(content)  # type: ignore[arg-type]
            name = wire.CONFIG if wire.CONFIG in configs else next(iter(configs), wire.CONFIG)
            node_config = ConfigRecord(dict(configs.get(name, ConfigRecord())))
            node_config[wire.VIRTUAL_CLIENTS] = sorted(ids)
            for key, value in self.layout_config().items():
                node_config[key] = value
            record[name] = node_config
            out.append(Message(content=record, dst_node_id=node, message_type=wire.PACKED_TRAIN))
        return PackedRound(out, {n: sorted(ids) for n, ids in by_node.items()}, unheld)
