"""A Flower ``Grid`` that runs the ClientApp in this process.

The strategy, the messages and the ClientApp handlers are the real ones; only
the transport is replaced: every message is handed to ``client_app(message,
context)`` with that node's own ``Context`` (its ``state`` persists across
messages, as on a SuperNode), in order. Messages and replies are deep-copied, as
the wire would (some strategies consume reply arrays in place, and a node's state
must not share objects with its replies). A handler's exception becomes an error
reply, as Flower's engines do. No Ray, no network, no start-up cost: for unit
tests of the strategy hooks and for quick studies on one core.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedavg_relu.flower.seam import CLIENT_APP_EXCEPTION, ensure_task_identity

__all__ = ["CLIENT_APP_EXCEPTION", "LocalGrid", "ensure_task_identity"]


class LocalGrid(Grid):
    """In-process nodes ``1..num_nodes`` with ``partition-id`` ``0..num_nodes-1``.

    Parameters
    ----------
    client_app
        The ClientApp (or any ``(Message, Context) -> Message`` callable).
    num_nodes
        How many nodes.
    run_config
        The run config every node's context carries.
    node_configs
        Optional per-node node configs (default ``partition-id``/``num-partitions``).
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: Mapping[str, Any],
        node_configs: list[dict[str, Any]] | None = None,
    ) -> None:
        ensure_task_identity()
        self.client_app = client_app
        self.run_id = uuid.uuid4().int % 2**62  # each LocalGrid is a run of its own (e.g. its nodes' spill folders)
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts: dict[int, Context] = {
            i + 1: Context(
                run_id=self.run_id, node_id=i + 1, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config)
            )
            for i, cfg in enumerate(configs)
        }
        # every message, for inspection in tests, with its configs but without its arrays: the arrays
        # of every round would pile up for the whole run (the model at m = 8192 is 268 MB a round)
        self.sent: list[Message] = []

    yields_replies = True  # send_and_receive hands each reply over as soon as it is made
    simulated = True  # every node is in this process (fedavg_relu.flower.seam.is_simulation_grid)

    # --- the part of the Grid API strategies use ------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """The node ids."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp, in order, yielding each reply as it is made.

        Lazy, like a wire that streams: a message is handled when the consumer asks for
        the next reply, so a consumer that folds replies into a sum holds one at a time.
        """
        for message in messages:
            self.sent.append(_without_arrays(message))
            context = self.contexts.get(message.metadata.dst_node_id)
            if context is None:
                yield Message(Error(CLIENT_APP_EXCEPTION, "unknown node"), reply_to=message)
                continue
            try:
                # copies in both directions stand in for the wire: no object is shared between
                # the server, the node's state and the reply (some strategies consume arrays in place)
                reply = copy.deepcopy(self.client_app(copy.deepcopy(message), context))
            except Exception as err:  # a faulty client is an error reply, never a crash
                reply = Message(Error(CLIENT_APP_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=message)
            yield reply

    # --- the rest of the abstract API: not needed in process ------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used in process
        """Not used in process."""

    @property
    def run(self):  # pragma: no cover - not used in process
        """Not used in process."""
        raise NotImplementedError("LocalGrid has no Run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:  # noqa: D401
        """Build a message (as ``Message(...)`` would)."""
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_nodes(self):  # pragma: no cover
        """Not used in process."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        """Not used in process."""
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        """Not used in process."""
        raise NotImplementedError("use send_and_receive")


def _without_arrays(message: Message) -> Message:
    """A record of ``message``: its type, destination, group and config records, not its arrays."""
    content = RecordDict(dict(message.content.config_records))
    return Message(
        content=content,
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
        group_id=message.metadata.group_id,
    )
