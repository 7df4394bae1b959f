"""Replies handed to the strategy as they arrive, not all at once.

Flower's grids implement ``send_and_receive`` as push, then pull until every reply
is in, returning a list: the server holds every client's model at once (50 x 268 MB
at width 8192). :class:`StreamingGrid` wraps any Flower grid and makes
``send_and_receive`` a generator over the same public ``push_messages`` /
``pull_messages`` calls, so a consumer that folds each reply into a running sum
(:class:`strategies.drift.DriftMeasurement`) holds only the replies in flight.

It relies on Flower's ``Strategy.start`` passing ``send_and_receive``'s return value
to ``aggregate_train`` / ``aggregate_evaluate`` unconsumed (documented: "replies may
be a one-shot iterable"); ``tests/test_flower_contract.py`` checks that contract.

Every reply read leaves behind, until Python's cyclic collector runs, whatever
reference cycles its readers made (Flower's own ``RecordDict.array_records`` makes
one per call, see :mod:`fedavg_relu.flower.records`); the grid runs the collector after
every 512 MB of replies (:class:`fedavg_relu.flower.records.GarbageBudget`), so such
garbage is bounded too. A reply that arrives after its exchange timed out is pulled by
the next exchange and dropped, so slow clients do not leave models in Flower's store.

A grid that already yields replies lazily (``yields_replies = True``, e.g.
:class:`fedavg_relu.runtime.local_grid.LocalGrid`) is used as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

from fedavg_relu.flower import seam
from fedavg_relu.flower.records import GarbageBudget, array_bytes, release

#: Seconds between two pulls while nothing arrived, for grids that do not say (Flower's HTTP grid: 3 s).
DEFAULT_PULL_INTERVAL = 0.1


class StreamingGrid:
    """``grid`` with a lazy ``send_and_receive``; everything else is ``grid``'s own.

    ``node_of(reply)`` names the node a reply is about: the destination of the
    message it answers. Error replies made by Flower itself (node gone, upload
    expired) carry ``src_node_id = 1``, not the real node (FLOWER_NOTES).
    """

    def __init__(self, grid: Grid, budget: GarbageBudget | None = None) -> None:
        self._grid = grid
        self._dst: dict[str, int] = {}
        #: collects the reference cycles that reading replies leaves (fedavg_relu.flower.records)
        self.budget = budget if budget is not None else GarbageBudget()
        #: ids of messages whose exchange timed out before their reply came (see :meth:`_stream`)
        self.abandoned: set[str] = set()
        #: late replies to those, pulled and dropped so far
        self.late_replies = 0

    @property
    def inner(self) -> Grid:
        """The wrapped grid."""
        return self._grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        """Push ``messages`` and yield each reply as soon as it is pulled (until ``timeout`` seconds)."""
        if getattr(self._grid, "yields_replies", False):
            return iter(self._grid.send_and_receive(messages, timeout=timeout))
        return self._stream(messages, timeout)

    def _stream(self, messages: Iterable[Message], timeout: float | None) -> Iterator[Message]:
        messages = list(messages)
        ids = [str(i) for i in self._grid.push_messages(messages)]
        for msg in messages:  # push gave each message its id
            self._dst[str(msg.metadata.message_id)] = int(msg.metadata.dst_node_id)
        pending = set(ids)
        del messages
        interval = seam.pull_interval(self._grid, DEFAULT_PULL_INTERVAL)
        end = None if timeout is None else time.monotonic() + timeout
        while pending and (end is None or time.monotonic() < end):
            if self.abandoned:  # a pull of their own: a grid with deadlines (deployments) gives each pull one
                for late in self._grid.pull_messages(set(self.abandoned)):
                    self._drop_late(late)
            replies = list(self._grid.pull_messages(pending))  # new ids: none of them is abandoned
            arrived = len(replies)
            for reply in replies:
                pending.discard(str(reply.metadata.reply_to_message_id))
            while replies:
                reply = replies.pop(0)  # drop our reference before the consumer moves on
                nbytes = array_bytes(reply)
                yield reply
                del reply
                self.budget.spend(nbytes)
            if pending and not arrived:
                time.sleep(interval)
        # A reply that comes after its exchange timed out would stay in the grid's store (Flower's
        # in-memory LinkState keeps it until someone pulls it): one model per slow client, for the
        # rest of the run. The next exchanges also ask for these ids and drop what arrives.
        self.abandoned |= pending

    def _drop_late(self, reply: Message) -> bool:
        """True (and the reply's arrays freed) when ``reply`` answers a message of an exchange that timed out."""
        message_id = str(reply.metadata.reply_to_message_id)
        if message_id not in self.abandoned:
            return False
        self.abandoned.discard(message_id)
        self.late_replies += 1
        release(reply)
        return True

    def node_of(self, reply: Message) -> int:
        """The node ``reply`` is about (the destination of the message it answers)."""
        return self._dst.get(str(reply.metadata.reply_to_message_id), int(reply.metadata.src_node_id))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def node_of(grid, reply: Message) -> int:
    """The node a reply is about, through :meth:`StreamingGrid.node_of` when ``grid`` is one."""
    finder = getattr(grid, "node_of", None)
    return finder(reply) if finder is not None else int(reply.metadata.src_node_id)
