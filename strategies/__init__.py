"""Server strategies: the drift recorder that wraps any strategy, and SCAFFOLD and FedNova.

Every run's strategy is a :class:`strategies.recorder.DriftRecorder` around the strategy
the run config names (:func:`strategies.registry.build_strategy`).
"""

from .fednova import FedNova
from .recorder import DriftRecorder
from .scaffold import Scaffold

__all__ = ["DriftRecorder", "FedNova", "Scaffold"]
