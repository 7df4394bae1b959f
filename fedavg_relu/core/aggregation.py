"""Server-side update rules that Flower does not ship (numpy and torch, no flwr).

``add_weighted`` / ``squared_difference``
    ``acc += w * value`` in float64, in place (the running sums of streamed averages),
    and ``||a - b||^2`` in float64: both in cache-sized pieces (:data:`PIECE`).
``fednova_average``
    FedNova (Wang et al., NeurIPS 2020): normalised averaging that removes the
    objective inconsistency of clients running different numbers of local steps.
``scaffold_server_update`` / ``scaffold_client_control``
    SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Params = Mapping[str, np.ndarray]

#: Elements per piece of :func:`add_weighted` and :func:`squared_difference`. A mixed-dtype
#: (float32 into float64) add over a whole 2048 x 2048 array took 10 ms here; the same add in
#: pieces of 64 Ki elements, which stay in the L2 cache while they are cast and added, 2 ms.
#: The per-element arithmetic is the same, so the sums are bit-identical.
PIECE = 1 << 16


def fednova_normalizer(local_steps: float, momentum: float = 0.0) -> float:
    """``a_k``: the l1 norm of client k's gradient-accumulation vector.

    Plain SGD: ``a_k = tau_k``. Heavy-ball momentum rho (PyTorch's
    ``v <- rho v + g; w <- w - eta v``):
    ``a_k = (tau_k - rho (1 - rho^tau_k) / (1 - rho)) / (1 - rho)``. Increasing in tau_k, and
    defined for a real tau_k (a packed cohort reports the one whose a is its clients' mean a_k).
    """
    if momentum == 0.0:
        return float(local_steps)
    rho = momentum
    return (local_steps - rho * (1 - rho**local_steps) / (1 - rho)) / (1 - rho)


def fednova_steps_for(normalizer: float, momentum: float = 0.0) -> float:
    """The (real) tau with ``fednova_normalizer(tau, momentum) == normalizer``: bisection to 1e-12 relative."""
    if momentum == 0.0:
        return float(normalizer)
    lo, hi = 0.0, max(1.0, float(normalizer)) * 2 / (1 - momentum) + 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if fednova_normalizer(mid, momentum) < normalizer:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def fednova_average(
    global_params: Params,
    local_params: Sequence[Params],
    num_examples: Sequence[int],
    local_steps: Sequence[float],
    momentum: float = 0.0,
    server_learning_rate: float = 1.0,
) -> dict[str, np.ndarray]:
    """``x - eta_g * tau_eff * sum_k p_k (x - y_k) / a_k`` with ``tau_eff = sum_k p_k a_k``.

    With equal ``tau_k`` and ``eta_g = 1`` this is FedAvg's ``sum_k p_k y_k``.
    """
    p = np.asarray(num_examples, np.float64)
    p = p / p.sum()
    a = np.array([fednova_normalizer(float(t), momentum) for t in local_steps])
    tau_eff = float(p @ a)
    out = {}
    for name, x in global_params.items():
        x64 = np.asarray(x, np.float64)
        d = sum(pk / ak * (x64 - np.asarray(y[name], np.float64)) for pk, ak, y in zip(p, a, local_params, strict=True))
        out[name] = (x64 - server_learning_rate * tau_eff * d).astype(np.asarray(x).dtype)
    return out


def scaffold_client_control(
    client_control: Params, server_control: Params, global_params: Params, local_params: Params,
    local_steps: int, learning_rate: float,
) -> dict[str, np.ndarray]:
    """Option II: ``c_k+ = c_k - c + (x - y_k) / (tau_k * eta)``."""
    scale = 1.0 / (local_steps * learning_rate)
    return {
        name: (
            np.asarray(client_control[name], np.float64) - np.asarray(server_control[name], np.float64)
            + scale * (np.asarray(global_params[name], np.float64) - np.asarray(local_params[name], np.float64))
        ).astype(np.asarray(global_params[name]).dtype)
        for name in global_params
    }


def scaffold_server_update(
    global_params: Params, server_control: Params, local_params: Sequence[Params], control_deltas: Sequence[Params],
    num_examples: Sequence[int], num_clients_total: int, server_learning_rate: float = 1.0,
    weighting: str = "examples", total_examples: float | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SCAFFOLD's server step with one consistent weighting of the clients.

    ``weighting="uniform"`` (the paper's, Karimireddy et al. 2020, eq. 5):
    ``x <- x + eta_g (1/|S|) sum_S (y_k - x)`` and ``c <- c + (1/N) sum_S dc_k``, so that
    ``c = (1/N) sum_k c_k`` over all N clients at every round.

    ``weighting="examples"`` (FedAvg's weighting; eta_g = 1 gives FedAvg's model):
    ``x <- x + eta_g sum_S (n_k/n_S) (y_k - x)`` and ``c <- c + sum_S (n_k/n) dc_k`` with
    ``n = total_examples`` the examples of all N clients, so that ``c = sum_k (n_k/n) c_k``.

    Either way the invariant holds exactly under partial participation (every c_k starts
    at 0 with c; only the sampled clients' c_k change, by dc_k).
    """
    p = np.asarray(num_examples, np.float64)
    if weighting == "uniform":
        p_model = np.full(len(local_params), 1.0 / len(local_params))
        p_control = np.full(len(local_params), 1.0 / max(num_clients_total, len(local_params)))
    elif weighting == "examples":
        if total_examples is None or total_examples < p.sum():
            raise ValueError(f"total_examples={total_examples}: expected the examples of all clients (>= {p.sum():.0f})")
        p_model = p / p.sum()
        p_control = p / float(total_examples)
    else:
        raise ValueError(f"weighting={weighting!r}: expected 'uniform' or 'examples'")
    new_x, new_c = {}, {}
    for name, x in global_params.items():
        x64 = np.asarray(x, np.float64)
        dy = sum(pk * (np.asarray(y[name], np.float64) - x64) for pk, y in zip(p_model, local_params, strict=True))
        dc = sum(pk * np.asarray(d[name], np.float64) for pk, d in zip(p_control, control_deltas, strict=True))
        new_x[name] = (x64 + server_learning_rate * dy).astype(np.asarray(x).dtype)
        new_c[name] = (np.asarray(server_control[name], np.float64) + dc).astype(np.asarray(x).dtype)
    return new_x, new_c


def _flat(array: np.ndarray) -> torch.Tensor:
    """A flat tensor over ``array``'s memory (a copy only when it is not C-contiguous), read-only use only."""
    with warnings.catch_warnings():  # a read-only array (decoded from a message) is only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array)).reshape(-1)


def add_weighted(acc: np.ndarray, value: np.ndarray, weight: float) -> None:
    """``acc += weight * value`` in acc's float64, in place, without a float64 temporary of ``value``.

    ``acc`` must be C-contiguous (an accumulator from ``np.zeros``); ``value`` is only read
    (a read-only array decoded from a message is not copied). Runs in pieces of :data:`PIECE`.
    """
    if not acc.flags.c_contiguous or not acc.flags.writeable:
        raise ValueError("add_weighted: the accumulator must be a writable C-contiguous array")
    if np.shape(value) != acc.shape:
        raise ValueError(f"add_weighted: value of shape {np.shape(value)} added to an accumulator of shape {acc.shape}")
    total, part = torch.from_numpy(acc).reshape(-1), _flat(value)
    for start in range(0, total.numel(), PIECE):
        total[start : start + PIECE].add_(part[start : start + PIECE], alpha=weight)


def squared_difference(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor | None = None) -> float:
    """``||a - b||_F^2`` (``||a||_F^2`` when ``b`` is None) accumulated in float64, in pieces of
    :data:`PIECE` (no full-size temporary).

    ``a`` and ``b`` (numpy arrays or tensors of the same shape and device) are only read.
    """
    x = a.reshape(-1) if isinstance(a, torch.Tensor) else _flat(a)
    y = None if b is None else b.reshape(-1) if isinstance(b, torch.Tensor) else _flat(b)
    if y is not None and x.shape != y.shape:
        raise ValueError(f"squared_difference: shapes differ: {tuple(np.shape(a))} and {tuple(np.shape(b))}")
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.numel(), PIECE):
        d = x[start : start + PIECE].double()
        if y is not None:
            d = d - y[start : start + PIECE].double()
        total += torch.dot(d, d)
    return float(total)
