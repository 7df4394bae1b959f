"""Validation of one client update before it may enter an average.

Pure functions on plain values (numpy arrays, dicts): the strategy layer
(`strategies/drift.py`) extracts them from Flower messages and calls
:func:`check_update`. Every rejection has one reason from :data:`REASONS`, so
that a round's metrics can count rejections per reason.

This module does not import flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

REASONS = (
    "malformed",  # not exactly one ArrayRecord and one MetricRecord, or unreadable arrays
    "array-names",  # missing or extra arrays
    "array-shape",  # an array's shape differs from the global model's
    "array-dtype",  # an array's dtype differs from the global model's
    "non-finite",  # NaN or inf in an array
    "metric-keys",  # missing or extra metric keys
    "num-examples",  # num-examples not a positive integer within the bound
    "non-finite-metric",  # NaN or inf in a metric value
    "update-norm",  # ||W_k - W^r|| above the configured bound
    "duplicate-node",  # a second reply of the same node in one round
    "unexpected-node",  # a reply from a node that was not sampled this round
)


class Rejected(Exception):
    """An update that must not be averaged; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
    keys = set(metrics)
    if keys != rules.metric_keys:
        missing, extra = sorted(rules.metric_keys - keys), sorted(keys - rules.metric_keys)
        raise Rejected("metric-keys", f"missing {missing}, unexpected {extra}")
    n = metrics["num-examples"]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or isinstance(n, float) and not n.is_integer():
        raise Rejected("num-examples", f"num-examples={n!r}: expected a positive integer")
    if not 1 <= n <= rules.max_num_examples:
        raise Rejected("num-examples", f"num-examples={n!r}: expected an integer in [1, {rules.max_num_examples}]")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise Rejected("non-finite-metric", f"{key}={value!r}")
    if rules.max_update_norm > 0 and global_params is not None:
        norm = math.sqrt(
            sum(float(np.sum((params[k].astype(np.float64) - np.asarray(global_params[k], np.float64)) ** 2)) for k in params)
        )
        if norm > rules.max_update_norm:
            raise Rejected("update-norm", f"||update|| = {norm:.4g} > max-update-norm = {rules.max_update_norm:.4g}")
    return int(n)
