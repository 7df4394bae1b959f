"""Server strategies; every one records the drift metrics through :mod:`strategies.drift`."""

from .drift import DriftMeasurement
from .fedavg import DriftFedAvg
from .fednova import DriftFedNova, FedNova
from .scaffold import DriftScaffold, Scaffold

__all__ = ["DriftFedAvg", "DriftFedNova", "DriftMeasurement", "DriftScaffold", "FedNova", "Scaffold"]
