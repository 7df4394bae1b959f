"""FedAvg that records THEORY.md's metrics every round.

The average is Flower's own :class:`flwr.serverapp.strategy.FedAvg` code path,
untouched; :class:`strategies.drift.DriftMeasurement` adds the measurements.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from .drift import DriftMeasurement


class DriftFedAvg(DriftMeasurement, FedAvg):
    """Flower's FedAvg plus per-round drift metrics (call ``setup_drift`` once)."""
