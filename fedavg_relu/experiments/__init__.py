"""Experiments on top of the runtime: sweeps, strategy comparisons, figures, the paper's predictions.

Imports :mod:`fedavg_relu.runtime` and below; the command line
(:mod:`fedavg_relu.cli`) is the only module above.
"""
