"""Validation of one client update before it may enter an average.

Pure functions on plain values (numpy arrays, dicts): the strategy layer
(:mod:`strategies.screening`) extracts them from Flower messages and calls
:func:`check_update`. Every rejection has one reason from :data:`REASONS`, so
that a round's metrics can count rejections per reason.

This module does not import flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedavg_relu.core.aggregation import squared_difference
from fedavg_relu.flower.schema import MAX_NUM_EXAMPLES, NUM_EXAMPLES, REASONS, TRAIN_METRICS, Rejected, check_metrics

__all__ = ["REASONS", "OutlierGate", "OutlierRules", "Rejected", "UpdateRules", "check_update", "update_norm"]


@dataclass(frozen=True)
class UpdateRules:
    """What a valid update looks like.

    Attributes
    ----------
    shapes
        Name -> (shape, dtype string) of every global-model array.
    metric_keys
        The exact set of metric keys a reply must carry (``num-examples`` included).
    max_num_examples
        Largest acceptable ``num-examples`` (guards the weighted average).
    max_update_norm
        Largest acceptable ``||W_k - W^r||``; 0 disables the check.
    """

    shapes: Mapping[str, tuple[tuple[int, ...], str]]
    metric_keys: frozenset[str]
    max_num_examples: int = 10**9
    max_update_norm: float = 0.0

    @classmethod
    def for_model(cls, params: Mapping[str, np.ndarray], metric_keys, max_num_examples: int = 10**9, max_update_norm: float = 0.0) -> UpdateRules:
        """Rules whose shapes and dtypes are those of ``params``."""
        shapes = {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in params.items()}
        return cls(shapes, frozenset(metric_keys), int(max_num_examples), float(max_update_norm))


def check_update(
    params: Mapping[str, np.ndarray],
    metrics: Mapping[str, object],
    rules: UpdateRules,
    global_params: Mapping[str, np.ndarray] | None = None,
) -> int:
    """Raise :class:`Rejected` unless the update is valid; return its ``num-examples``."""
    names, expected = set(params), set(rules.shapes)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise Rejected("array-names", f"missing {missing}, unexpected {extra}")
    for name, (shape, dtype) in rules.shapes.items():
        value = params[name]
        if tuple(value.shape) != shape:
            raise Rejected("array-shape", f"{name}: shape {tuple(value.shape)}, expected {shape}")
        if str(value.dtype) != dtype:
            raise Rejected("array-dtype", f"{name}: dtype {value.dtype}, expected {dtype}")
    for name in rules.shapes:
        if not np.isfinite(params[name]).all():
            raise Rejected("non-finite", f"{name} contains NaN or inf")
    if rules.metric_keys == TRAIN_METRICS.keys:  # the ClientApp's reply: the schema's kinds and bounds
        check_metrics(TRAIN_METRICS, metrics, {MAX_NUM_EXAMPLES: rules.max_num_examples})
    else:
        _check_other_metrics(metrics, rules)
    if rules.max_update_norm > 0 and global_params is not None:
        norm = update_norm(params, global_params)
        if norm > rules.max_update_norm:
            raise Rejected("update-norm", f"||update|| = {norm:.4g} > max-update-norm = {rules.max_update_norm:.4g}")
    return int(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]


def _check_other_metrics(metrics: Mapping[str, object], rules: UpdateRules) -> None:
    """Rules with their own metric keys: exactly those keys, finite numbers, a positive bounded count."""
    keys = set(metrics)
    if keys != rules.metric_keys:
        missing, extra = sorted(rules.metric_keys - keys), sorted(keys - rules.metric_keys)
        raise Rejected("metric-keys", f"missing {missing}, unexpected {extra}")
    n = metrics[NUM_EXAMPLES]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or isinstance(n, float) and not n.is_integer():
        raise Rejected("num-examples", f"num-examples={n!r}: expected a positive integer")
    if not 1 <= n <= rules.max_num_examples:
        raise Rejected("num-examples", f"num-examples={n!r}: expected an integer in [1, {rules.max_num_examples}]")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Rejected("metric-type", f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise Rejected("non-finite-metric", f"{key}={value!r}")


def update_norm(params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray]) -> float:
    """``||W_k - W^r||`` over the model's arrays (those in ``global_params``), in float64."""
    total = 0.0
    for k, value in params.items():
        if k not in global_params:  # e.g. SCAFFOLD's control-variate deltas travel beside the model
            continue
        total += squared_difference(value, global_params[k])
    return math.sqrt(total)


def check_record_layout(layout: Mapping[str, str], expected: Mapping[str, str]) -> None:
    """Raise :class:`Rejected` ("record-layout") unless a reply's records are exactly ``expected``.

    ``layout`` and ``expected`` map record name -> record type ("ArrayRecord",
    "MetricRecord", "ConfigRecord"). Flower's own aggregation raises and ends the
    whole run on replies whose record names differ from each other; here such a
    reply is one rejection.
    """
    if dict(layout) != dict(expected):
        missing = sorted(f"{k} ({t})" for k, t in expected.items() if layout.get(k) != t)
        extra = sorted(f"{k} ({t})" for k, t in layout.items() if expected.get(k) != t)
        raise Rejected("record-layout", f"missing {missing}, unexpected {extra}")


@dataclass(frozen=True)
class OutlierRules:
    """Bounds on a reply relative to the round's other replies (0 switches a rule off).

    A reply is an outlier when its ``num-examples`` exceeds ``examples_ratio`` times
    the median of the other replies' counts, or its ``||W_k - W^r||`` exceeds
    ``update_ratio`` times the median of the other replies' update norms. Needs at
    least ``min_peers`` other replies; with fewer nothing is judged. Finite but
    extreme values (every entry 3e38, a count of 10^9) would otherwise be averaged
    in and wreck the model for good.
    """

    examples_ratio: float = 100.0
    update_ratio: float = 100.0
    min_peers: int = 2

    @property
    def active(self) -> bool:
        """True when at least one rule is on."""
        return self.examples_ratio > 0 or self.update_ratio > 0


def outlier_reason(num_examples: float, norm: float, peers: list[tuple[float, float]], rules: OutlierRules) -> str | None:
    """The outlier reason of a reply with ``(num_examples, norm)`` among ``peers`` (others' pairs), or None.

    Examples: peers with counts (10, 12, 14) have median 12; with ``examples_ratio``
    100 a count above 1,200 is "examples-outlier".
    """
    if len(peers) < rules.min_peers:
        return None
    if rules.examples_ratio > 0:
        median_n = float(np.median([p[0] for p in peers]))
        if num_examples > rules.examples_ratio * median_n:
            return "examples-outlier"
    if rules.update_ratio > 0:
        median_u = float(np.median([p[1] for p in peers]))
        if median_u > 0 and norm > rules.update_ratio * median_u:
            return "update-outlier"
    return None


class OutlierGate:
    """:func:`outlier_reason` for replies that arrive one at a time and are summed as they come.

    ``offer`` judges a reply against the replies received before it: within bounds
    it may be summed at once (True); otherwise, or with fewer than ``min_peers``
    earlier replies, it is held (False) and judged by ``final`` once all replies are
    in, against the median of all the others. Only replies that look like outliers
    (and the first ``min_peers``) are ever held, so memory stays bounded by what is
    in flight. A reply summed early is not judged again.
    """

    def __init__(self, rules: OutlierRules) -> None:
        self.rules = rules
        self.stats: dict[int, tuple[float, float]] = {}

    def offer(self, key: int, num_examples: float, norm: float) -> bool:
        """Record the reply's statistics; True when it may be summed now."""
        peers = list(self.stats.values())
        self.stats[key] = (float(num_examples), float(norm))
        if not self.rules.active:
            return True
        return len(peers) >= self.rules.min_peers and outlier_reason(num_examples, norm, peers, self.rules) is None

    def final(self, key: int) -> str | None:
        """A held reply's verdict against every other reply: None (sum it) or the outlier reason."""
        n, u = self.stats[key]
        peers = [v for k, v in self.stats.items() if k != key]
        return outlier_reason(n, u, peers, self.rules)
