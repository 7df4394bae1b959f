"""FedAvg with Flower's server-side fixed clipping and Gaussian noise, measured by fedavg-relu.

A strategy file outside the package, used as ``strategy = "examples/dp_fedavg.py:dp_fedavg"``
(or an absolute path) with ``strategy-args`` for the DP settings::

    fedavg-relu run -c "strategy='$PWD/examples/dp_fedavg.py:dp_fedavg' \
        strategy-args='{\"noise_multiplier\": 0.5, \"clipping_norm\": 5.0}'"

The drift recorder wraps the result (every run goes through it): the clipped, noised
average is W^{r+1}, and the drift exchange measures the clients against it. Flower's DP
wrapper is used as it ships; the recorder is unaware of it and it of the recorder.
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg


def dp_fedavg(noise_multiplier: float = 0.5, clipping_norm: float = 5.0, **fedavg_kwargs):
    """``DifferentialPrivacyServerSideFixedClipping(FedAvg(**fedavg_kwargs), ...)``, sampling every available client.

    ``fedavg_kwargs`` are the run's sampling bounds (fraction_train, min_available_nodes, ...), which the
    registry passes because this function takes ``**kwargs``; the noise is scaled for the clients sampled.
    """
    inner = FedAvg(**fedavg_kwargs)
    sampled = max(int(inner.min_train_nodes), 1)
    return DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier, clipping_norm, sampled)
