"""Train replies screened before any of them may reach the inner strategy's average.

:class:`ReplyScreen` reads one round's train replies as they arrive: error replies
are counted as failed, invalid ones as rejected per reason
(:data:`fedavg_relu.flower.schema.REASONS`), the rest become :class:`Update` s. With
FedAvg's own average (``stream=True``) each valid update is folded into a float64
running sum and released at once, so the server holds the replies in flight, not
one model per client; otherwise the valid replies are kept for the inner strategy.
The outlier rules hold back only the replies that look extreme until the round's
replies are all in (:class:`fedavg_relu.flower.validation.OutlierGate`).

Nothing here raises on a bad reply; only a reply that says the runtime lost its
worker ends the run (:class:`RunAborted`), because Flower 1.42 never replaces one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log

from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.records import release
from fedavg_relu.flower.seam import is_worker_lost
from fedavg_relu.flower.validation import OutlierGate, OutlierRules, Rejected, UpdateRules, check_update, update_norm

from .replies import ErrorTally, RunAborted, RunningAverage, Update, extract_update


@dataclass
class ScreenedRound:
    """What one round's train exchange left: valid updates (or their running sum) and the counts.

    Attributes
    ----------
    accepted
        The valid updates, in arrival order (empty when they were summed: ``average``).
    average
        The running float64 average of the valid updates (``stream=True`` only).
    trained
        ``(node, f_k(W^r))`` of every update that entered the average.
    local_steps
        node -> the local steps it reported (the per-client table).
    num_examples
        node -> the ``num-examples`` of its valid update (a drift reply must repeat it).
    rejected
        Nodes whose reply was rejected (``counts`` derives the failed ones: sampled, neither trained nor rejected).
    rejected_reasons
        Rejections per reason.
    first_error
        The most common error text of the exchange ("" without errors).
    """

    accepted: list[Update] = field(default_factory=list)
    average: RunningAverage | None = None
    trained: list[tuple[int, float]] = field(default_factory=list)
    local_steps: dict[int, float] = field(default_factory=dict)
    num_examples: dict[int, int] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    errors: dict[int, str] = field(default_factory=dict)  # node -> why it did not enter the average

    def take(self, update: Update) -> None:
        """Count ``update`` as trained (it enters the average)."""
        self.trained.append((update.node, float(update.metrics.get(wire.LOSS_BEFORE, math.nan))))
        self.local_steps[update.node] = float(update.metrics.get(wire.LOCAL_STEPS, math.nan))
        self.num_examples[update.node] = update.num_examples

    def reject(self, node: int, reason: str, detail: str = "") -> None:
        """Count a rejected reply of ``node``."""
        self.rejected.append(node)
        self.errors.setdefault(node, f"reply rejected: {detail or reason}")
        self.rejected_reasons[reason] = self.rejected_reasons.get(reason, 0) + 1

    def counts(self, sampled: Iterable[int]) -> dict[str, int]:
        """The round's client counts (``clients-sampled``, ``-trained``, ``-failed``, ``-rejected``, per reason)."""
        row = {
            wire.CLIENTS_SAMPLED: len(sampled),
            wire.CLIENTS_TRAINED: len(self.trained),
            # error replies and sampled nodes that sent nothing in time (a set difference: never negative)
            wire.CLIENTS_FAILED: len(set(sampled) - {node for node, _ in self.trained} - set(self.rejected)),
            wire.CLIENTS_REJECTED: sum(self.rejected_reasons.values()),
        }
        row.update({f"rejected-{reason}": self.rejected_reasons.get(reason, 0) for reason in wire.REASONS})
        return row


class ReplyScreen:
    """Screens a round's train replies (see the module docstring).

    Parameters
    ----------
    rules
        What a valid update is (array names, shapes, dtypes, metric keys, bounds).
    outliers
        Bounds relative to the round's other replies.
    layout
        Record name -> record type a reply must have exactly (e.g. ``{"arrays": "ArrayRecord", ...}``).
    """

    def __init__(self, rules: UpdateRules, outliers: OutlierRules, layout: Mapping[str, str]) -> None:
        self.rules = rules
        self.outliers = outliers
        self.layout = dict(layout)

    def screen(
        self,
        server_round: int,
        replies: Iterable[Message],
        sampled: list[int],
        node_of: Callable[[Message], int],
        global_params: Mapping | None,
        stream: bool,
    ) -> ScreenedRound:
        """Screen ``replies`` (a one-shot iterable) of nodes ``sampled``; see :class:`ScreenedRound`."""
        out = ScreenedRound(average=RunningAverage() if stream else None)
        errors = ErrorTally(f"round {server_round} train")
        gate = OutlierGate(self.outliers)
        held: list[Update] = []
        seen: set[int] = set()
        wanted = set(sampled)
        for index, msg in enumerate(replies):
            node = node_of(msg)
            update = self._one(msg, node, wanted, seen, errors, out, global_params)
            if update is None:
                continue
            update.index = index
            if gate.offer(index, update.num_examples, update.norm) and stream:
                out.average.add(update)  # type: ignore[union-attr]
                out.take(update)
                release(msg)  # summed: its bytes go now
            else:
                held.append(update)
        for update in held:
            reason = gate.final(update.index) if self.outliers.active else None
            if reason is not None:
                out.reject(update.node, reason, reason)
                n, u = gate.stats[update.index]
                log(WARNING, "round %d: reply of node %d rejected: %s (num-examples %d, ||update|| %.4g)",
                    server_round, update.node, reason, n, u)
                continue
            out.take(update)
            if stream:
                out.average.add(update)  # type: ignore[union-attr]
                release(update.message)
            else:
                out.accepted.append(update)
        errors.log_repeats()
        silent = [node for node in wanted if node not in seen]  # sent nothing in time
        out.errors.update({node: "no reply within round-timeout" for node in silent})
        out.first_error = errors.most_common() or ""
        return out

    def _one(self, msg, node, wanted, seen, errors, out: ScreenedRound, global_params) -> Update | None:
        """One reply: an :class:`Update`, or None (counted as an error or a rejection, and logged)."""
        if node in seen:
            out.reject(node, "duplicate-node")
            log(WARNING, "reply of node %d rejected: duplicate-node: it already replied this round", node)
            return None
        if wanted and node not in wanted:
            out.reject(node, "unexpected-node")
            log(WARNING, "reply of node %d rejected: unexpected-node: it was not sampled this round", node)
            return None
        seen.add(node)
        if msg.has_error():
            reason = msg.error.reason or ""
            errors.add(node, reason)
            out.errors[node] = reason or "error reply"
            if is_worker_lost(reason):
                raise RunAborted(
                    f"the runtime lost the worker serving node {node} ({reason.strip().splitlines()[-1][:200]}). "
                    "Flower 1.42 does not replace dead workers, so every later round would silently lose its "
                    "clients; the run stops here. The last complete round is checkpointed: rerun with resume=true "
                    "to continue (with fewer clients per round or a smaller model if memory ran out)."
                )
            return None
        try:
            params, metrics = extract_update(msg, self.layout)
            n = check_update(params, metrics, self.rules, global_params)
            norm = update_norm(params, global_params) if self.outliers.update_ratio > 0 and global_params else 0.0
        except Rejected as err:
            out.reject(node, err.reason, str(err))
            log(WARNING, "reply of node %d rejected: %s", node, err)
            return None
        return Update(node, msg, params, metrics, n, norm)
