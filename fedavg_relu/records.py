"""Conversions between parameter dicts and Flower records."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def params_to_arrays(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``params`` (name -> array), in order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in params.items()})


def arrays_to_params(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The ``name -> numpy array`` dict of an ``ArrayRecord``."""
    return {name: array.numpy() for name, array in record.items()}
