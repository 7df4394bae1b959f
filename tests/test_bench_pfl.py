"""The pfl-research path of ``benchmarks/scale.py`` trains what it claims: one pfl round is one FedAvg round.

Skipped only where ``pfl`` is not installed (it is in the ``dev`` and ``bench`` extras).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pfl")

ROOT = Path(__file__).resolve().parent.parent


def _peer():
    spec = importlib.util.spec_from_file_location("pfl_peer", ROOT / "benchmarks" / "pfl_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fedavg_round_numpy(params: dict, xs: list, ys: list, steps: int, lr: float) -> dict:
    """One FedAvg round by hand, in float64.

    The network is ``logits = relu(x W1^T + b1) W2^T + b2`` with the mean
    cross-entropy over a client's n examples. With ``p = softmax(logits)`` and
    ``Y`` the one-hot labels, the gradient of the mean loss is

    * ``dL/dlogits = (p - Y) / n``;
    * ``dL/dW2 = (dL/dlogits)^T h``, ``dL/db2 = sum over examples of dL/dlogits``;
    * ``dL/dh = dL/dlogits W2``, zero where ``h = 0`` (ReLU), giving ``dL/dpre``;
    * ``dL/dW1 = (dL/dpre)^T x``, ``dL/db1 = sum over examples of dL/dpre``.

    Each client k takes ``steps`` full-batch steps ``W <- W - lr dL/dW`` from the
    round's model; FedAvg's new model is the mean of the clients' models, weighted
    by their example counts (all equal here, so the plain mean).
    """
    outs = []
    for x, y in zip(xs, ys, strict=True):
        w = {k: v.astype(np.float64).copy() for k, v in params.items()}
        n = len(y)
        onehot = np.eye(w["2.weight"].shape[0])[y]
        for _ in range(steps):
            h = np.maximum(x @ w["0.weight"].T + w["0.bias"], 0.0)
            logits = h @ w["2.weight"].T + w["2.bias"]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            d_logits = (p - onehot) / n
            d_pre = (d_logits @ w["2.weight"]) * (h > 0)
            grads = {"2.weight": d_logits.T @ h, "2.bias": d_logits.sum(0), "0.weight": d_pre.T @ x, "0.bias": d_pre.sum(0)}
            for k in w:
                w[k] -= lr * grads[k]
        outs.append(w)
    return {k: np.mean([o[k] for o in outs], axis=0) for k in params}


def _pfl_round(seed: int, clients: int, examples: int, hidden: int, torch_seed: int):
    """One pfl FedAvg round (4 inputs -> ``hidden`` -> 3 classes, 2 local steps of lr 0.5) on random clients.

    Returns the start state, pfl's state after the round, and the clients' inputs and labels.
    """
    import torch

    peer = _peer()
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(examples, 4)).astype(np.float32) for _ in range(clients)]
    ys = [rng.integers(0, 3, size=examples) for _ in range(clients)]
    torch.manual_seed(torch_seed)
    start = {k: v.detach().clone() for k, v in peer.classifier(hidden, 4, 3).state_dict().items()}
    _, state = peer.fedavg_rounds([torch.from_numpy(x) for x in xs], [torch.from_numpy(y) for y in ys], hidden, 3,
                                  steps=2, lr=0.5, rounds=1, initial_state=start)
    return start, state, xs, ys


def test_one_pfl_round_is_one_fedavg_round():
    """3 clients x 6 examples, 4 inputs -> 7 hidden -> 3 classes, 2 local steps of lr 0.5: pfl == numpy to 1e-6."""
    start, state, xs, ys = _pfl_round(seed=3, clients=3, examples=6, hidden=7, torch_seed=1)
    expected = fedavg_round_numpy({k: v.numpy() for k, v in start.items()}, [x.astype(np.float64) for x in xs], ys, 2, 0.5)
    moved = max(float(np.abs(expected[k] - start[k].numpy()).max()) for k in expected)
    assert moved > 1e-2  # the round changed the model: the comparison below is not trivially true
    for k in expected:
        np.testing.assert_allclose(state[k].numpy(), expected[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_pfl_round_differs_from_a_wrong_fedavg():
    """The comparison can fail: one local step instead of two gives another model (off by more than 1e-3)."""
    start, state, xs, ys = _pfl_round(seed=4, clients=2, examples=5, hidden=6, torch_seed=2)
    wrong = fedavg_round_numpy({k: v.numpy() for k, v in start.items()}, [x.astype(np.float64) for x in xs], ys, 1, 0.5)
    assert max(float(np.abs(state[k].numpy() - wrong[k]).max()) for k in wrong) > 1e-3
