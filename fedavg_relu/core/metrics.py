"""The per-round quantities of THEORY.md, as pure functions.

Client side, :func:`measure_client_drift` compares client k's final local model
W_k with the new average W^{r+1} on client k's full local data and returns
scalars (plus the gradient at the average, for gradient dissimilarity).
Server side, :func:`summarize_drift` turns the clients' scalars into the round's
metrics, and :func:`distances_from_init` measures the lazy ball.

Norms are Frobenius norms over all trained parameters; ``p_k = n_k / sum_j n_j``
over the clients that reported. This module does not import flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass

import numpy as np
import torch

from fedavg_relu.core.aggregation import squared_difference
from fedavg_relu.core.device import module_device
from fedavg_relu.core.mechanism import nonlinear_drift
from fedavg_relu.core.models import ReluMLP, set_trainable
from fedavg_relu.core.training import full_gradient


def squared_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """``sum_l ||a_l - b_l||_F^2`` over the (identical) keys of ``a`` and ``b``."""
    if set(a) != set(b):
        raise ValueError(f"parameter names differ: {sorted(set(a) ^ set(b))}")
    return float(sum(squared_difference(a[k], b[k]) for k in a))


def distances_from_init(current: Mapping[str, np.ndarray], init: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per layer ``||W_l - W_l^0||`` and ``||W_l - W_l^0|| / ||W_l^0||``, and the same over all layers.

    Keys: ``distance-from-init/<name>``, ``relative-distance-from-init/<name>``,
    ``distance-from-init``, ``relative-distance-from-init``. A relative distance
    whose ``||W_l^0||`` is 0 (e.g. zero-initialised biases) is reported as NaN.
    """
    out: dict[str, float] = {}
    total_sq, init_sq = 0.0, 0.0
    for name in init:
        diff_sq = squared_difference(current[name], init[name])
        norm0_sq = squared_difference(init[name])
        total_sq += diff_sq
        init_sq += norm0_sq
        out[f"distance-from-init/{name}"] = math.sqrt(diff_sq)
        out[f"relative-distance-from-init/{name}"] = math.sqrt(diff_sq / norm0_sq) if norm0_sq > 0 else math.nan
    out["distance-from-init"] = math.sqrt(total_sq)
    out["relative-distance-from-init"] = math.sqrt(total_sq / init_sq) if init_sq > 0 else math.nan
    return out


def flip_fraction(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Fraction of (example, layer, neuron) whose ReLU on/off state differs between ``a`` and ``b``."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} layers of patterns")
    differ = sum(int((pa != pb).sum()) for pa, pb in zip(a, b, strict=True))
    total = sum(pa.numel() for pa in a)
    return differ / total if total else 0.0


@torch.no_grad()
def activation_patterns(model: ReluMLP, x: torch.Tensor) -> list[torch.Tensor]:
    """The measured layers' ReLU on/off masks of ``model`` on ``x``."""
    return model.forward_with_patterns(x)[1]


@dataclass(frozen=True)
class ClientDrift:
    """One client's end-of-round measurement (all on its full local data)."""

    num_examples: int  # n_k
    loss_at_global: float  # f_k(W^{r+1})
    loss_at_local: float  # f_k(W_k)
    grad_norm_global: float  # ||grad f_k(W^{r+1})||
    grad_norm_local: float  # ||grad f_k(W_k)||
    gradient_drift: float  # ||grad f_k(W_k) - grad f_k(W^{r+1})||
    param_distance: float  # ||W_k - W^{r+1}||
    flips_local: float  # pattern flips between W_k and W^{r+1}
    flips_init: float  # pattern flips between W^{r+1} and W^0 (NaN if W^0's patterns are unknown)
    # ||Δg - (1/n_k) Jᵀ H J ΔW|| / ||Δg|| (fedavg_relu.core.mechanism.nonlinear_drift); NaN when not measured
    nonlinear_fraction: float = math.nan

    def to_metrics(self) -> dict[str, float]:
        """Flat kebab-case metrics, ``num-examples`` included (``nonlinear-fraction`` only when measured)."""
        out = {k.replace("_", "-"): float(v) for k, v in asdict(self).items()}
        if math.isnan(self.nonlinear_fraction):
            del out["nonlinear-fraction"]
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> ClientDrift:
        """Inverse of :meth:`to_metrics`; raises ``KeyError`` naming a missing key.

        ``nonlinear-fraction`` is optional (NaN when absent: not measured).
        """
        values = {}
        for name, fld in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key not in metrics:
                if fld.default is not MISSING:
                    continue
                raise KeyError(f"drift reply lacks metric {key!r}")
            values[name] = metrics[key]
        values["num_examples"] = int(values["num_examples"])
        return cls(**values)


#: Columns of a per-client row (``clients.jsonl``), after ``round``, ``client`` and ``node``.
CLIENT_COLUMNS = (
    "num-examples", "local-steps", "loss-before", "loss-after", "gradient-drift", "relative-gradient-drift",
    "param-distance", "activation-flips-local", "nonlinear-drift-fraction",
)


def client_row(drift: ClientDrift, loss_before: float, local_steps: float, nonlinear: bool) -> dict[str, float]:
    """One client's row of the per-client table (:data:`CLIENT_COLUMNS`; the nonlinear fraction when ``nonlinear``).

    ``loss-before`` is f_k(W^r) (from its train reply), ``loss-after`` f_k(W^{r+1}),
    ``relative-gradient-drift`` the drift over ||grad f_k(W^{r+1})||, ``param-distance``
    ||W_k - W^{r+1}||: the values :func:`summarize_drift` averages.
    """
    row = {
        "num-examples": drift.num_examples,
        "local-steps": int(local_steps) if math.isfinite(local_steps) and float(local_steps).is_integer() else local_steps,
        "loss-before": float(loss_before),
        "loss-after": drift.loss_at_global,
        "gradient-drift": drift.gradient_drift,
        "relative-gradient-drift": _ratio(drift.gradient_drift, drift.grad_norm_global),
        "param-distance": drift.param_distance,
        "activation-flips-local": drift.flips_local,
    }
    if nonlinear:
        row["nonlinear-drift-fraction"] = drift.nonlinear_fraction
    return row


def measure_client_drift(
    model: ReluMLP,
    local_params: Mapping[str, np.ndarray],
    global_params: Mapping[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    init_patterns: Sequence[torch.Tensor] | None = None,
    nonlinear: bool = False,
) -> tuple[ClientDrift, dict[str, np.ndarray]]:
    """Compare the gradient at the local model with the gradient at the average.

    Costs two full-data gradients (at W_k and at W^{r+1}); the activation
    patterns come from the same forward passes. With ``nonlinear`` also the
    nonlinear drift fraction (:func:`fedavg_relu.core.mechanism.nonlinear_drift`, given
    both gradients: one jvp and one vjp more). Returns the scalars and the
    gradient at W^{r+1} (numpy, per trained parameter). Runs on the model's device
    (``x`` and ``y`` move there; ``init_patterns`` must be there already).
    """
    device = module_device(model)
    x, y = x.to(device), y.to(device)
    set_trainable(model, local_params)
    at_local = full_gradient(model, x, y, loss)
    set_trainable(model, global_params)
    at_global = full_gradient(model, x, y, loss)
    names = list(at_global.grads)
    fraction = math.nan
    if nonlinear:
        fraction = nonlinear_drift(
            model, local_params, global_params, x, y, loss, grad_local=at_local.grads, grad_global=at_global.grads,
        ).fraction
    drift = ClientDrift(
        num_examples=int(x.shape[0]),
        loss_at_global=at_global.loss,
        loss_at_local=at_local.loss,
        grad_norm_global=_norm(at_global.grads[n] for n in names),
        grad_norm_local=_norm(at_local.grads[n] for n in names),
        gradient_drift=math.sqrt(sum(squared_difference(at_local.grads[n], at_global.grads[n]) for n in names)),
        param_distance=math.sqrt(sum(squared_difference(local_params[n], global_params[n]) for n in names)),
        flips_local=flip_fraction(at_local.patterns, at_global.patterns),
        flips_init=flip_fraction(at_global.patterns, init_patterns) if init_patterns is not None else math.nan,
        nonlinear_fraction=fraction,
    )
    return drift, {n: g.cpu().numpy() for n, g in at_global.grads.items()}


def _norm(tensors) -> float:
    """Frobenius norm over several tensors (float32 storage, float64 accumulation of the per-tensor norms)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors))


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.nan


def summarize_drift(
    drifts: Sequence[ClientDrift],
    learning_rate: float,
    mean_global_gradient_sq: float | None = None,
) -> dict[str, float]:
    """The round's drift metrics from the clients' measurements.

    Parameters
    ----------
    drifts
        One measurement per client that answered the drift exchange.
    learning_rate
        The local step size eta (for effective smoothness in step-size units).
    mean_global_gradient_sq
        ``||sum_k p_k grad f_k(W^{r+1})||^2`` (needs the gradient vectors);
        ``None`` leaves gradient dissimilarity out.

    Returns
    -------
    dict
        ``global-loss`` (sum_k p_k f_k(W^{r+1})), ``local-loss``,
        ``model-divergence`` (sum_k p_k ||W_k - W^{r+1}||^2),
        ``model-divergence-max`` (max_k ||W_k - W^{r+1}||),
        ``gradient-drift-mean``/``-max``, ``relative-gradient-drift-mean``/``-max``
        (drift / ||grad f_k(W^{r+1})||), ``effective-smoothness-mean``/``-max``
        (drift / ||W_k - W^{r+1}||, over clients with a nonzero distance),
        ``effective-smoothness-lr-mean``/``-max`` (the same times eta),
        ``activation-flips-local``/``-init`` (pooled fractions = sum_k p_k f_k),
        ``gradient-dissimilarity`` (sum_k p_k ||g_k||^2 / ||sum_k p_k g_k||^2),
        and, when some client measured it, ``nonlinear-drift-fraction-mean``/``-max``
        over the clients whose fraction is a number (p renormalised over them: a
        client that did not measure it, or whose ||Δg|| is 0 while its linearized
        change is not, is left out rather than turning the mean into NaN).
        Means are p-weighted.
    """
    if not drifts:
        return {}
    n = np.array([d.num_examples for d in drifts], dtype=np.float64)
    p = n / n.sum()
    drift = np.array([d.gradient_drift for d in drifts])
    dist = np.array([d.param_distance for d in drifts])
    gnorm = np.array([d.grad_norm_global for d in drifts])
    rel = np.array([_ratio(a, b) for a, b in zip(drift, gnorm, strict=True)])
    moved = dist > 0
    out = {
        "global-loss": float(p @ np.array([d.loss_at_global for d in drifts])),
        "local-loss": float(p @ np.array([d.loss_at_local for d in drifts])),
        "model-divergence": float(p @ dist**2),
        "model-divergence-max": float(dist.max()),
        "gradient-drift-mean": float(p @ drift),
        "gradient-drift-max": float(drift.max()),
        "relative-gradient-drift-mean": float(p @ rel),
        "relative-gradient-drift-max": float(rel.max()),
        "activation-flips-local": float(p @ np.array([d.flips_local for d in drifts])),
        "activation-flips-init": float(p @ np.array([d.flips_init for d in drifts])),
    }
    if moved.any():
        smooth = drift[moved] / dist[moved]
        pm = p[moved] / p[moved].sum()
        out["effective-smoothness-mean"] = float(pm @ smooth)
        out["effective-smoothness-max"] = float(smooth.max())
    else:
        out["effective-smoothness-mean"] = out["effective-smoothness-max"] = math.nan
    out["effective-smoothness-lr-mean"] = out["effective-smoothness-mean"] * learning_rate
    out["effective-smoothness-lr-max"] = out["effective-smoothness-max"] * learning_rate
    if mean_global_gradient_sq is not None:
        out["gradient-dissimilarity"] = _ratio(float(p @ gnorm**2), mean_global_gradient_sq)
    fraction = np.array([d.nonlinear_fraction for d in drifts], dtype=np.float64)
    known = ~np.isnan(fraction)
    if known.any():
        pk = p[known] / p[known].sum()
        out["nonlinear-drift-fraction-mean"] = float(pk @ fraction[known])
        out["nonlinear-drift-fraction-max"] = float(fraction[known].max())
    return out
