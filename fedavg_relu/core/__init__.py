"""The math and data of the project: no flwr import (``tests/test_layers.py`` enforces it).

Models, data and partitions, local SGD, the drift metrics and the mechanism
(nonlinear drift, NTK), the vectorized cohort and packed-mode math, the
centralized baseline, the aggregation rules, and the run config every layer
reads. Modules here import only each other.
"""
