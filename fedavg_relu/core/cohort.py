"""Vectorized local SGD for a cohort of virtual clients that start from the same model.

Packed mode (:mod:`fedavg_relu.core.packed`) trains many clients per Flower message.
Training them one after another through :func:`fedavg_relu.core.training.run_local_sgd`
leaves the CPU mostly idle at federated sizes: a client holds tens of examples,
so each step is a handful of small matrix products wrapped in autograd, module
and optimizer calls. Here the clients of a cohort are stacked along a leading
axis and stepped together:

* every trained weight is a ``(k, out, in)`` tensor (one slice per client), a
  frozen one (``paper``'s A and B) is shared;
* a layer is one batched product (``bmm``) over the ``k`` clients, its backward
  is written out by hand (ReLU MLPs need three products per layer), and plain
  SGD folds the weight gradient into the update (``W.baddbmm_(G^T, H, alpha=-eta)``)
  so the gradient is never written to memory;
* the cohort is cut into chunks whose weights fit in the last-level cache
  (:data:`CHUNK_BYTES`): with 32 examples per client a step reads and writes each
  client's weights once for a few FLOPs per byte, so cache-resident chunks are
  what makes the products run near the matmul peak (measured in
  ``benchmarks/scale.py``).

The updates are the ones :func:`fedavg_relu.core.training.run_local_sgd` makes
(SGD with momentum and weight decay as ``torch.optim.SGD``, minibatches drawn
from each client's own seeded permutation, full batch when ``batch-size`` is 0);
only the float32 rounding differs, because sums are formed in another order.
``tests/test_cohort.py`` compares the two on every model family and loss.

Clients whose local data sizes differ are grouped by size (each group has one
number of steps and one batch size). FedProx's proximal term and SCAFFOLD's
correction are not supported here (packed mode runs FedAvg only).

Both functions compute on ``device`` (default: the model's): the received numpy
arrays, the frozen weights and each chunk's data move there, the minibatch orders are
drawn on the CPU and their indices moved, and what is returned comes back as numpy
(:mod:`fedavg_relu.core.device`; on the CPU every move is a no-op).

This module does not import flwr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedavg_relu.core.device import CPU
from fedavg_relu.core.mechanism import stacked_gauss_newton
from fedavg_relu.core.metrics import ClientDrift
from fedavg_relu.core.models import ReluMLP
from fedavg_relu.core.stacked import (
    CHUNK_BYTES, chunk_size, forward, gradients, loss_and_grad, patterns, per_client_sq_norm, prepare, relu_backward,
)
from fedavg_relu.core.training import LocalSGDSettings, client_seed, minibatch_indices


@dataclass
class CohortTraining:
    """Every client's outcome, in the order of the clients given."""

    local_params: dict[str, np.ndarray] | None  # name -> (K, *shape) W_k (when kept)
    weighted_sum: dict[str, np.ndarray]  # name -> sum_k n_k W_k, float64
    train_loss: np.ndarray  # (K,) mean minibatch loss over the tau steps
    first_loss: np.ndarray  # (K,) step 1's minibatch loss
    num_steps: np.ndarray  # (K,) int64
    num_examples: np.ndarray  # (K,) int64


def train_cohort_vectorized(
    model: ReluMLP,
    global_params: Mapping[str, np.ndarray],
    datas: Sequence,
    seeds: Sequence[int],
    settings: LocalSGDSettings,
    keep_local: bool = True,
    budget: int | None = None,
    lockstep_steps: Sequence[int] = (),
    on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    allocate: Callable[[dict[str, tuple[tuple[int, ...], np.dtype]]], dict[str, np.ndarray]] | None = None,
    device: torch.device | None = None,
) -> CohortTraining:
    """Train clients ``datas[i]`` (``x`` (n_i, d), ``y`` (n_i,)) from ``global_params`` with seeds ``seeds[i]``.

    ``model`` supplies the architecture and the frozen weights; its trained
    parameters are not used or changed. ``seeds[i]`` seeds client i's minibatch
    order exactly like :func:`fedavg_relu.core.task.train_client`
    (``torch.Generator().manual_seed(seed)``).

    With ``lockstep_steps`` every chunk does step t before any does step t+1, and
    after each of those steps ``on_step(t, params)`` sees every client's current
    parameters (name -> ``(K, *shape)``, clients in the given order); all clients
    must then run the same number of steps. The updates are the same either way.

    ``allocate`` (name -> (shape, dtype) -> name -> array) supplies the arrays the kept
    W_k are written into, e.g. disk-backed ones (:meth:`fedavg_relu.core.spill.LocalModelStore.allocate`);
    default: ``np.empty`` in memory. ``device``: where the cohort trains (default: the model's);
    ``on_step`` then sees tensors on the CPU.
    """
    if settings.proximal_mu > 0:
        raise ValueError("proximal-mu > 0 is not supported by vectorized cohort training")
    if len(datas) != len(seeds) or not datas:
        raise ValueError("need one seed per client and at least one client")
    if lockstep_steps and not keep_local:
        raise ValueError("lockstep needs the local models (keep_local=True)")
    budget = CHUNK_BYTES if budget is None else budget
    specs, frozen, trained, device = prepare(model, device)
    start = {name: torch.as_tensor(np.asarray(global_params[name]), device=device) for name in trained}
    num_trained = sum(int(t.numel()) for t in start.values())
    size = len(datas)
    sizes = np.array([len(d) for d in datas], np.int64)
    out = CohortTraining(
        local_params=allocate_arrays({n: ((size, *start[n].shape), np.dtype(np.float32)) for n in trained}, allocate)
        if keep_local else None,
        weighted_sum={n: np.zeros(tuple(start[n].shape), np.float64) for n in trained},
        train_loss=np.zeros(size), first_loss=np.zeros(size), num_steps=np.zeros(size, np.int64), num_examples=sizes,
    )
    widths = sum(int(start[spec.weight].shape[0]) if spec.weight in start else int(frozen[spec.weight].shape[0])
                 for spec in specs)
    runs = []
    fold: dict[str, torch.Tensor] = {}  # name -> sum over folded chunks of n sum_k W_k^tau (float32)
    for n in np.unique(sizes):  # one group per local data size: same steps, same batch
        members = [int(i) for i in np.flatnonzero(sizes == n)]
        batch = int(n) if settings.batch_size <= 0 else min(settings.batch_size, int(n))
        if settings.steps_for(int(n)) == 1 and not keep_local and settings.momentum == 0:
            # nothing per client is ever materialized (one shared step, folded): chunk by activations
            per_chunk = max(1, budget // (4 * widths * batch))
        else:
            per_chunk = chunk_size(num_trained, settings.momentum > 0, budget)
        for first in range(0, len(members), per_chunk):
            chunk = members[first : first + per_chunk]
            run = _train_chunk(specs, frozen, start, [datas[i] for i in chunk], [seeds[i] for i in chunk], settings, chunk, out,
                               fold, device)
            if not lockstep_steps:
                for _ in run:  # one chunk after another
                    pass
            else:
                runs.append((chunk, run))
    if lockstep_steps:
        _lockstep(runs, trained, start, size, settings, sizes, set(lockstep_steps), on_step)
    for name, acc in fold.items():
        out.weighted_sum[name] += acc.double().cpu().numpy()
    return out


def allocate_arrays(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], allocate=None) -> dict[str, np.ndarray]:
    """``allocate(shapes)``, or empty in-memory arrays."""
    if allocate is not None:
        return allocate(shapes)
    return {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}


def _lockstep(runs, trained, start, size, settings, sizes, steps_wanted, on_step) -> None:
    """Advance every chunk one step at a time; call ``on_step`` with all clients' parameters at the wanted steps."""
    tau = {settings.steps_for(int(n)) for n in sizes}
    if len(tau) != 1:
        raise ValueError("lockstep needs the same number of local steps on every client (local-epochs=0)")
    for t in range(1, tau.pop() + 1):
        current = []
        for chunk, run in runs:
            step, params = next(run)
            if step != t:
                raise RuntimeError("lockstep out of step")
            current.append((chunk, params))
        if t in steps_wanted and on_step is not None:
            stacked = {name: torch.empty((size, *start[name].shape), dtype=start[name].dtype) for name in trained}
            for chunk, params in current:
                for name in trained:
                    stacked[name][chunk] = params[name].cpu()
            on_step(t, stacked)
    for _, run in runs:
        for _ in run:  # writes the chunk's outcome
            pass


def measure_cohort_drift_vectorized(
    model: ReluMLP,
    local_params: Mapping[str, np.ndarray],
    global_params: Mapping[str, np.ndarray],
    init_params: Mapping[str, np.ndarray] | None,
    datas: Sequence,
    loss: str,
    with_gradient: bool = False,
    budget: int | None = None,
    nonlinear: bool = False,
    device: torch.device | None = None,
) -> tuple[list, dict[str, np.ndarray] | None]:
    """:func:`fedavg_relu.core.metrics.measure_client_drift` for stacked clients.

    ``local_params`` maps each trained name to the clients' stacked W_k
    ``(K, *shape)``. Per client, on its full data: loss and gradient at W_k and at
    W^{r+1} (``global_params``), their norms and distance, ``||W_k - W^{r+1}||``, and
    the fraction of ReLU patterns that differ between W_k and W^{r+1} and between
    W^{r+1} and W^0 (``init_params``; None: not measured, NaN). Returns one
    :class:`~fedavg_relu.core.metrics.ClientDrift` per client (in order) and, with
    ``with_gradient``, ``sum_k n_k grad f_k(W^{r+1})`` (float64).

    ``nonlinear`` also fills in the nonlinear drift fraction
    ``||Δg_k − Jᵀ H J ΔW_k|| / ||Δg_k||`` in the same pass: the Gauss–Newton
    products come from :func:`fedavg_relu.core.mechanism.stacked_gauss_newton` at W^{r+1}
    (one hand-written jvp and one backward per chunk, reusing the forward at W^{r+1}),
    and Δg_k is the drift already formed; the values are
    :func:`fedavg_relu.core.mechanism.measure_cohort_nonlinear_drift_vectorized`'s.
    ``device``: where it is measured (default: the model's).
    """
    budget = CHUNK_BYTES if budget is None else budget
    specs, frozen, trained, device = prepare(model, device)
    at_global = {n: torch.as_tensor(np.asarray(global_params[n]), device=device) for n in trained}
    at_init = ({n: torch.as_tensor(np.asarray(init_params[n]), device=device) for n in trained}
               if init_params is not None else None)
    input_measured = model.family != "paper"
    sizes = np.array([len(d) for d in datas], np.int64)
    drifts: list = [None] * len(datas)
    grad_sum = {n: np.zeros(tuple(at_global[n].shape), np.float64) for n in trained} if with_gradient else None
    per_chunk = chunk_size(sum(int(t.numel()) for t in at_global.values()), True, budget)
    for n in np.unique(sizes):
        members = [int(i) for i in np.flatnonzero(sizes == n)]
        for first in range(0, len(members), per_chunk):
            chunk = members[first : first + per_chunk]
            k = len(chunk)
            x = torch.stack([datas[i].x for i in chunk]).to(device)
            y = torch.stack([datas[i].y for i in chunk]).to(device)
            local = {name: torch.as_tensor(np.asarray(local_params[name])[chunk], device=device) for name in trained}

            def weights(values):
                return lambda name: values[name] if name in values else frozen[name]

            init_masks = None
            if at_init is not None:
                _, init_inputs = forward(specs, weights(at_init), x)
                init_masks = patterns(specs, init_inputs, input_measured)
                del init_inputs
            logits, inputs = forward(specs, weights(at_global), x)
            loss_g, grad = loss_and_grad(logits, y, loss)
            masks_g = patterns(specs, inputs, input_measured)
            grads_g = gradients(specs, weights(at_global), inputs, grad)
            gauss_newton = None
            if nonlinear:
                gauss_newton = stacked_gauss_newton(
                    specs, weights(at_global), inputs, logits, lambda name: local[name] - at_global[name], loss,
                )
            del inputs, logits, grad
            logits, inputs = forward(specs, weights(local), x)
            loss_l, grad = loss_and_grad(logits, y, loss)
            masks_l = patterns(specs, inputs, input_measured)
            grads_l = gradients(specs, weights(local), inputs, grad)
            del inputs, logits, grad
            norm_g = per_client_sq_norm(grads_g.values()).sqrt()
            norm_l = per_client_sq_norm(grads_l.values()).sqrt()
            drift = per_client_sq_norm(grads_l[name] - grads_g[name] for name in trained).sqrt()
            residual = (
                per_client_sq_norm(grads_l[name] - grads_g[name] - gauss_newton[name] for name in trained).sqrt()
                if gauss_newton is not None else None
            )
            distance = per_client_sq_norm(local[name] - at_global[name] for name in trained).sqrt()
            units = sum(m[0].numel() for m in masks_g)
            flips_l = sum((a != b).reshape(k, -1).sum(1) for a, b in zip(masks_l, masks_g, strict=True))
            flips_i = (
                sum((a != b).reshape(k, -1).sum(1) for a, b in zip(masks_g, init_masks, strict=True)).cpu()
                if init_masks is not None else None
            )
            # the per-client values, on the CPU in one transfer each (no-ops there)
            loss_g, loss_l, norm_g, norm_l, drift, distance, flips_l = (
                t.cpu() for t in (loss_g, loss_l, norm_g, norm_l, drift, distance, flips_l)
            )
            residual = residual.cpu() if residual is not None else None
            for j, i in enumerate(chunk):
                drifts[i] = ClientDrift(
                    num_examples=int(n), loss_at_global=float(loss_g[j]), loss_at_local=float(loss_l[j]),
                    grad_norm_global=float(norm_g[j]), grad_norm_local=float(norm_l[j]),
                    gradient_drift=float(drift[j]), param_distance=float(distance[j]),
                    flips_local=float(flips_l[j]) / units if units else 0.0,
                    flips_init=(float(flips_i[j]) / units if units else 0.0) if flips_i is not None else math.nan,
                    nonlinear_fraction=_ratio(float(residual[j]), float(drift[j])) if residual is not None else math.nan,
                )
            if grad_sum is not None:
                for name in trained:
                    grad_sum[name] += float(n) * grads_g[name].sum(0, dtype=torch.float64).cpu().numpy()
    return drifts, grad_sum


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.nan


def _train_chunk(specs, frozen, start, datas, seeds, settings: LocalSGDSettings, positions, out: CohortTraining,
                 fold: dict[str, torch.Tensor] | None = None, device: torch.device = CPU):
    """Step ``datas`` (equal sizes) together; write their outcome into ``out`` at ``positions``.

    A generator: yields ``(t, params)`` after step t (``params``: the stacked trained
    parameters, name -> ``(k, *shape)``, complete only once each has been updated,
    i.e. after step 1); the outcome is written when it is exhausted.

    A trained parameter stays one shared tensor until its first update makes the
    clients differ (the first forward and backward are then plain products over all
    the chunk's examples). Without momentum and when the local models are not kept,
    the last update is not applied client by client: only
    ``sum_k W_k^tau = (1 - eta wd) sum_k W_k^{tau-1} - eta sum_k g_k`` is needed, and
    ``sum_k g_k`` of a weight is one product over the chunk's stacked examples.
    """
    k = len(datas)
    n = len(datas[0])
    steps = settings.steps_for(n)
    batch = n if settings.batch_size <= 0 else min(settings.batch_size, n)
    x = torch.stack([d.x for d in datas]).to(device)  # (k, n, d)
    y = torch.stack([d.y for d in datas]).to(device)  # (k, n)
    orders = [minibatch_indices(n, batch, steps, torch.Generator().manual_seed(s)) for s in seeds]  # on the CPU
    rows = torch.arange(k, device=device).unsqueeze(1)
    params: dict[str, torch.Tensor] = {}  # name -> (k, *shape) once the clients differ
    buffers: dict[str, torch.Tensor] = {}
    folded: dict[str, torch.Tensor] = {}  # name -> n sum_k W_k^tau of this chunk (float32), folded without ``fold``
    lr, wd, momentum = settings.learning_rate, settings.weight_decay, settings.momentum
    losses = torch.zeros(steps, k, dtype=torch.float64, device=device)

    def current(name: str) -> torch.Tensor:
        return params[name] if name in params else start[name] if name in start else frozen[name]

    def update(name: str, grad_k: Callable[[], torch.Tensor], step_k, add_grad_sum, last: bool) -> None:
        """``torch.optim.SGD``'s step on every client's parameter ``name``.

        ``grad_k()``: the (k, *shape) gradients; ``step_k(base, alpha)``: ``base + alpha * g``
        formed without writing g (in place when ``base`` is the stacked parameter);
        ``add_grad_sum(acc, alpha)``: ``acc += alpha * sum_k g_k`` (for a weight, inside the product).
        """
        shared = name not in params
        base = start[name] if shared else params[name]
        if momentum == 0 and last and out.local_params is None:
            # n sum_k W_k^tau = n (1 - eta wd) sum_k W_k^{tau-1} - n eta sum_k g_k, accumulated over the chunks
            # in one float32 tensor (added to the float64 sum once, after the last chunk)
            acc = fold.get(name) if fold is not None else None
            if acc is None:
                acc = torch.zeros_like(start[name])
                if fold is not None:
                    fold[name] = acc
                else:
                    folded[name] = acc
            decay = float(n) * (1.0 - lr * wd)
            if shared:
                acc.add_(base, alpha=decay * k)
            else:
                acc.add_(base.sum(0), alpha=decay)
            add_grad_sum(acc, -float(n) * lr)
            return
        if momentum == 0:
            if shared:
                params[name] = step_k(base.mul(1.0 - lr * wd).expand(k, *base.shape), -lr, False)
            else:
                if wd:
                    base.mul_(1.0 - lr * wd)
                step_k(base, -lr, True)
            return
        g = grad_k()
        if wd:
            g = g.add(base, alpha=wd)
        buf = buffers.get(name)
        if buf is None:
            buffers[name] = buf = g.clone() if not g.is_contiguous() else g
        else:
            buf.mul_(momentum).add_(g)
        params[name] = base - lr * buf if shared else base.add_(buf, alpha=-lr)

    for t in range(steps):
        if orders[0] is None:
            xb, yb = x, y
        else:
            idx = torch.stack([o[t] for o in orders]).to(device)  # (k, b)
            xb, yb = x[rows, idx], y[rows, idx]
        logits, inputs = forward(specs, current, xb)
        losses[t], grad = loss_and_grad(logits, yb, settings.loss)
        last = t == steps - 1
        for i in range(len(specs) - 1, -1, -1):  # output layer first; input gradients use the weights before the update
            spec, h_in, g_out, a = specs[i], inputs[i], grad, specs[i].scale
            below = None
            if i > 0:
                w = current(spec.weight)
                below = torch.bmm(g_out, w) if w.dim() == 3 else torch.matmul(g_out, w)
                if a != 1.0:
                    below.mul_(a)
                below = relu_backward(below, h_in, 0)
            if spec.weight_trained:
                update(
                    spec.weight,
                    lambda g_out=g_out, h_in=h_in, a=a: torch.bmm(g_out.transpose(1, 2), h_in).mul_(a),
                    lambda base, alpha, inplace, g_out=g_out, h_in=h_in, a=a: (
                        base.baddbmm_(g_out.transpose(1, 2), h_in, alpha=alpha * a) if inplace
                        else torch.baddbmm(base, g_out.transpose(1, 2), h_in, alpha=alpha * a)
                    ),
                    lambda acc, alpha, g_out=g_out, h_in=h_in, a=a: acc.addmm_(
                        g_out.reshape(-1, g_out.shape[2]).T, h_in.reshape(-1, h_in.shape[2]), alpha=alpha * a
                    ),
                    last,
                )
            if spec.bias_trained:
                update(
                    spec.bias,
                    lambda g_out=g_out: g_out.sum(1),
                    lambda base, alpha, inplace, g_out=g_out: (
                        base.add_(g_out.sum(1), alpha=alpha) if inplace else torch.add(base, g_out.sum(1), alpha=alpha)
                    ),
                    lambda acc, alpha, g_out=g_out: acc.add_(g_out.sum((0, 1)), alpha=alpha),
                    last,
                )
            grad = below
        yield t + 1, params
    for name in start:
        if name in folded:
            out.weighted_sum[name] += folded[name].double().cpu().numpy()
            continue
        if fold is not None and name in fold:
            continue
        stack = params[name]
        torch.from_numpy(out.weighted_sum[name]).add_(stack.sum(0, dtype=torch.float64).cpu(), alpha=float(n))
        if out.local_params is not None:
            out.local_params[name][positions] = stack.cpu().numpy()
    losses = losses.cpu()
    out.train_loss[positions] = losses.mean(0).numpy()
    out.first_loss[positions] = losses[0].numpy()
    out.num_steps[positions] = steps


def cohort_seeds(seed: int, client_ids: Sequence[int], server_round: int) -> list[int]:
    """Each client's minibatch seed, as the standard path draws it."""
    return [client_seed(seed, k, server_round) for k in client_ids]
