"""A deployment's ServerApp waits for a reply, upload included, at most ``round-timeout``.

:func:`bound_reply_waits` wraps Flower's ``HttpGrid`` (the ServerApp's grid in a
deployment) in :class:`ReplyDeadlineGrid`; simulation grids are left alone. The one
Flower internal used is the seam's item 10
(:func:`fedavg_relu.flower.seam.install_bounded_object_pulls`).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable
from logging import INFO

from fedavg_relu.flower import seam

# --- ServerApp side: a reply whose upload never finishes costs at most round-timeout ------------
#
# Flower 1.42's HttpGrid (the ServerApp's grid in a deployment) checks ``send_and_receive``'s
# timeout only *between* pulls. Inside one ``pull_messages`` call it fetches each reply's objects
# with ``pull_objects(...)`` at its default ``max_time=PULL_MAX_TIME`` (7200 s), retrying while an
# object is "unavailable". The SuperLink hands out a reply as soon as the SuperNode has pushed the
# message and its object tree, before the objects (the model) arrive. A SuperNode that dies in
# between leaves objects that stay unavailable until the SuperLink's object-push session expires
# (``OBJECT_PUSH_SESSION_TTL_SECONDS = 180``, not configurable): the whole exchange stalls ~3 min,
# whatever ``round-timeout`` says. :class:`ReplyDeadlineGrid` gives every object pull the deadline
# of the exchange it belongs to (push time + ``round-timeout``); at the deadline the pull fails and
# HttpGrid turns the reply into an error reply ("... the object-push session expired ..."), which
# the strategies count as a failed client.

_PULL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("fedavg_relu_pull_deadline", default=None)
#: Longest wait between two tries of an unavailable object while a deadline holds (Flower's cap: 10 s),
#: so a failed upload is given up at most this much after the deadline.
PULL_BACKOFF_CAP = 1.0


class ReplyDeadlineGrid:
    """A Flower grid whose replies take at most ``timeout`` seconds from push to pulled, uploads included.

    Wraps Flower's ``HttpGrid``; every other call is the wrapped grid's. ``push_messages`` notes
    each message's deadline (now + ``timeout``); ``pull_messages`` fetches reply objects until the
    earliest deadline of the ids it is asked for, and no longer. ``send_and_receive`` is push, then
    pull every ``pull_interval`` s until every reply is in or the deadline has passed (Flower's own
    loop sleeps 3 s between pulls and may pass its deadline by one sleep).

    Use :func:`bound_reply_waits`, which wraps only grids that need it.
    """

    #: Seconds between two pulls of ``send_and_receive`` while replies are missing.
    pull_interval = 0.5

    def __init__(self, grid, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: expected seconds > 0 (round-timeout)")
        seam.install_bounded_object_pulls(_PULL_DEADLINE, PULL_BACKOFF_CAP)
        self._grid = grid
        self.timeout = float(timeout)
        self._deadlines: dict[str, float] = {}
        from flwr.common.logger import log  # noqa: PLC0415

        log(INFO, "fedavg-relu: a reply, upload included, is waited for at most round-timeout = %gs", self.timeout)

    @property
    def inner(self):
        """The wrapped grid."""
        return self._grid

    def push_messages(self, messages: Iterable) -> list[str]:
        """Push through the wrapped grid; each pushed message's replies are due within ``timeout``."""
        now = time.monotonic()
        self._deadlines = {k: d for k, d in self._deadlines.items() if d > now - 3600}  # forget old exchanges
        ids = [str(i) if i is not None else "" for i in self._grid.push_messages(messages)]
        for message_id in ids:
            if message_id:
                self._deadlines[message_id] = now + self.timeout
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list:
        """The replies that are in; a reply whose objects do not arrive by its deadline becomes an error reply.

        HttpGrid fetches replies one after the other, so a stalled upload holds back replies
        that arrive meanwhile. When the deadline passed during the pull, one more pull takes
        every reply that is complete by then (the deadline has passed: nothing waits again).
        """
        ids = [str(i) for i in message_ids]
        deadline = min((self._deadlines[i] for i in ids if i in self._deadlines), default=None)
        token = _PULL_DEADLINE.set(deadline)
        try:
            replies = list(self._grid.pull_messages(ids))
            answered = {str(r.metadata.reply_to_message_id) for r in replies}
            late = [i for i in ids if i not in answered]
            if late and deadline is not None and time.monotonic() >= deadline:
                replies += list(self._grid.pull_messages(late))
        finally:
            _PULL_DEADLINE.reset(token)
        for reply in replies:
            self._deadlines.pop(str(reply.metadata.reply_to_message_id), None)
        return replies

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        """Push ``messages``; pull until every reply is in or ``timeout`` (at most ``self.timeout``) passed."""
        start = time.monotonic()
        pending = {i for i in self.push_messages(messages) if i}
        del messages
        wait = self.timeout if timeout is None else min(float(timeout), self.timeout)
        end = start + wait
        for message_id in pending:
            self._deadlines[message_id] = min(self._deadlines.get(message_id, end), end)
        replies: list = []
        while pending:
            got = self.pull_messages(pending)
            replies.extend(got)
            pending.difference_update(str(r.metadata.reply_to_message_id) for r in got)
            remaining = end - time.monotonic()
            if not pending or remaining <= 0:
                break
            time.sleep(min(self.pull_interval, remaining))
        for message_id in pending:
            self._deadlines.pop(message_id, None)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def bound_reply_waits(grid, timeout: float):
    """``grid`` wrapped in :class:`ReplyDeadlineGrid` when it is Flower's HttpGrid (a deployment); else ``grid``.

    The simulation grids hold replies in memory and cannot stall on an upload.
    """
    return ReplyDeadlineGrid(grid, timeout) if seam.is_http_grid(grid) else grid
