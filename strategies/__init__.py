"""Server strategies; every one records the drift metrics through :mod:`strategies.drift`."""

from .drift import DriftMeasurement
from .fedavg import DriftFedAvg

__all__ = ["DriftFedAvg", "DriftMeasurement"]
