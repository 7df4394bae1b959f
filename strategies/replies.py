"""Replies, read: unpacked, tallied, averaged as they arrive.

The pieces the drift recorder (:mod:`strategies.recorder`) builds a round from:
:class:`Update` (one valid train reply, unpacked), :class:`ErrorTally` (each distinct
client error logged once, repeats counted), :class:`RunningAverage` (FedAvg's average
as a float64 running sum), and the readers of a reply's records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedavg_relu.core.aggregation import add_weighted
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.records import array_records, arrays_to_views, metric_records, params_to_arrays
from fedavg_relu.flower.validation import Rejected, check_record_layout


class RunAborted(RuntimeError):
    """The run cannot go on safely (e.g. a Ray actor died); the message says why."""


@dataclass
class Update:
    """One valid train reply, unpacked."""

    node: int
    message: Message
    params: dict[str, np.ndarray]
    metrics: dict[str, Any]
    num_examples: int
    norm: float
    index: int = -1  # position among the round's replies (the outlier gate's key)


class ErrorTally:
    """Error replies of one exchange: each distinct error logged once in full, repeats counted.

    ``log_repeats`` then says "the same error on N more clients" per distinct error.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.nodes: dict[str, list[int]] = {}

    def add(self, node: int, reason: str) -> None:
        """Count an error reply of ``node``; log its text when it is new."""
        if reason not in self.nodes:
            log(WARNING, "%s: node %d failed: %s", self.what, node, reason)
        self.nodes.setdefault(reason, []).append(node)

    def log_repeats(self) -> None:
        """One line per error text seen on more than one node."""
        for reason, nodes in self.nodes.items():
            if len(nodes) > 1:
                first = reason.strip().splitlines()[-1][:160] if reason.strip() else "(no reason given)"
                log(WARNING, "%s: the same error on %d more clients (%s)", self.what, len(nodes) - 1, first)

    @property
    def count(self) -> int:
        """Error replies counted."""
        return sum(len(v) for v in self.nodes.values())

    def most_common(self) -> str | None:
        """The error text seen on most nodes (None without errors)."""
        if not self.nodes:
            return None
        return max(self.nodes.items(), key=lambda item: len(item[1]))[0]


class RunningAverage:
    """``sum_k n_k W_k / sum_k n_k`` and the n-weighted mean of every metric, accumulated in float64.

    Equals Flower's ``aggregate_arrayrecords`` / ``aggregate_metricrecords`` (float32
    arithmetic there) to float32 rounding (``tests/test_streaming.py``).
    """

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.metric_sums: dict[str, float] = {}
        self.total = 0

    def add(self, update: Update) -> None:
        """Fold one update in."""
        n = update.num_examples
        for name, value in update.params.items():
            if name not in self.sums:
                self.sums[name] = np.zeros(np.shape(value), np.float64)
                self.dtypes[name] = np.asarray(value).dtype
            add_weighted(self.sums[name], value, n)
        for key, value in update.metrics.items():
            if key != wire.NUM_EXAMPLES:
                self.metric_sums[key] = self.metric_sums.get(key, 0.0) + n * float(value)
        self.total += n

    def result(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The average (None, None when nothing was added)."""
        if self.total == 0:
            return None, None
        params = {k: (v / self.total).astype(self.dtypes[k]) for k, v in self.sums.items()}
        return params_to_arrays(params), MetricRecord({k: v / self.total for k, v in self.metric_sums.items()})


def extract_update(msg: Message, layout: Mapping[str, str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    content = msg.content
    if len(array_records(content)) != 1 or len(metric_records(content)) != 1:
        raise Rejected(
            "malformed",
            f"{len(array_records(content))} ArrayRecords and {len(metric_records(content))} MetricRecords, expected 1 and 1",
        )
    if layout is not None:
        check_record_layout({name: type(record).__name__ for name, record in content.items()}, layout)
    try:
        params = arrays_to_views(next(iter(array_records(content).values())))  # read-only: only checked and summed
    except Exception as err:  # unreadable bytes, unknown dtype, ...
        raise Rejected("malformed", f"unreadable arrays: {type(err).__name__}: {err}") from err
    return params, dict(next(iter(metric_records(content).values())))


def client_order(row: Mapping[str, Any]) -> tuple[bool, int]:
    """Per-client rows by client (partition) id, rows without one last by node id: a file independent of reply order."""
    client = row.get("client")
    return (client is None, int(client if client is not None else row.get("node", 0)))


def accumulate(acc: dict[str, np.ndarray] | None, grad: Mapping[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """``acc += weight * grad`` per name in float64 (``acc`` None: a new sum)."""
    if acc is None:
        acc = {k: np.zeros(np.shape(v), np.float64) for k, v in grad.items()}
    for k, v in grad.items():
        add_weighted(acc[k], v, weight)
    return acc
