"""Local SGD on one client, full-batch gradients, and evaluation.

This module does not import flwr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedavg_relu.core.device import module_device
from fedavg_relu.core.models import ReluMLP, compute_loss


@dataclass(frozen=True)
class LocalSGDSettings:
    """What a client needs to run one round of local SGD."""

    local_steps: int  # tau
    learning_rate: float  # eta (already width-scaled where asked)
    batch_size: int  # 0 = full batch (Local GD)
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "squared"
    proximal_mu: float = 0.0  # FedProx: adds mu * (W - W^r) to every gradient
    local_epochs: float = 0.0  # > 0: tau_k = ceil(local_epochs * n_k / batch) instead of local_steps

    def first_loss_is_full_loss(self, num_examples: int) -> bool:
        """Whether step 1's minibatch loss is f_k(W^r) bit for bit: full-batch steps on data that
        :func:`evaluate` would see in one batch (<= 4096 examples), so no extra forward is needed."""
        return (self.batch_size <= 0 or self.batch_size >= num_examples) and num_examples <= 4096

    def steps_for(self, num_examples: int) -> int:
        """This client's number of local steps tau_k."""
        if self.local_epochs <= 0:
            return self.local_steps
        batch = num_examples if self.batch_size <= 0 else min(self.batch_size, num_examples)
        return max(1, math.ceil(self.local_epochs * num_examples / batch))


@dataclass(frozen=True)
class LocalSGDResult:
    """Summary of one client's local training."""

    mean_batch_loss: float  # mean of the minibatch losses seen over the tau steps
    num_steps: int
    num_examples: int
    first_batch_loss: float = math.nan  # step 1's minibatch loss: f_k(W_start) when the batch is all the data


def client_seed(seed: int, partition_id: int, server_round: int) -> int:
    """A 63-bit seed that depends on (run seed, partition, round) and nothing else."""
    seq = np.random.SeedSequence([seed, partition_id, server_round])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def run_local_sgd(
    model: nn.Module,
    x: torch.Tensor,  # (n, d)
    y: torch.Tensor,  # (n,) int64 labels
    settings: LocalSGDSettings,
    generator: torch.Generator,
    correction: dict[str, torch.Tensor] | None = None,
) -> LocalSGDResult:
    """Run ``tau`` steps of (minibatch) SGD on ``model`` in place.

    Each step's gradient ``g`` becomes ``g + correction + mu (W - W_start)`` before the
    optimizer (SGD with momentum and weight decay) uses it: ``correction`` is
    SCAFFOLD's ``c - c_k`` (per trained parameter name), ``mu`` FedProx's
    proximal weight, ``W_start`` the model at the start of the round.

    Minibatches are drawn without replacement from a fresh permutation of the
    client's examples each epoch (``generator`` decides it); a batch size of 0 or
    one at least ``n`` is full-batch gradient descent. When ``n`` is not a
    multiple of the batch size, the leftover examples of an epoch are skipped
    (like ``drop_last``) and a new permutation starts.
    """
    steps = iter_local_sgd(model, x, y, settings, generator, correction)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def minibatch_indices(n: int, batch: int, steps: int, generator: torch.Generator) -> list[torch.Tensor] | None:
    """Each step's example indices (None: every step is the full batch).

    A fresh permutation of the ``n`` examples is drawn first and whenever fewer than
    ``batch`` remain in the current one (the leftover is skipped, like ``drop_last``).
    """
    order = torch.randperm(n, generator=generator)
    if batch >= n:
        return None
    cursor, out = 0, []
    for _ in range(steps):
        if cursor + batch > n:
            order = torch.randperm(n, generator=generator)
            cursor = 0
        out.append(order[cursor : cursor + batch])
        cursor += batch
    return out


def iter_local_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: LocalSGDSettings,
    generator: torch.Generator,
    correction: dict[str, torch.Tensor] | None = None,
):
    """:func:`run_local_sgd` one step at a time: yields the step number t (1-based) after step t.

    Returns (``StopIteration.value``) the :class:`LocalSGDResult`. Lets a caller step
    a cohort of clients in lockstep with exactly the updates ``run_local_sgd`` makes.
    Runs on the model's device (``x``, ``y`` and ``correction`` move there); the
    minibatch order is drawn on the CPU by ``generator`` whatever the device.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("client has no training examples")
    device = module_device(model)
    x, y = x.to(device), y.to(device)  # no-ops when they are there already
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else None
    extra = [correction[name].to(device) for name, _ in named] if correction is not None else None
    num_steps = settings.steps_for(n)
    optimizer = torch.optim.SGD(
        params,
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    batch = n if settings.batch_size <= 0 else min(settings.batch_size, n)
    batches = minibatch_indices(n, batch, num_steps, generator)
    losses = []
    model.train()
    for step in range(num_steps):
        if batches is None:
            xb, yb = x, y
        else:
            idx = batches[step].to(device)
            xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(model(xb), yb, settings.loss)
        loss.backward()
        if anchor is not None or extra is not None:
            with torch.no_grad():
                for i, p in enumerate(params):
                    if extra is not None:
                        p.grad.add_(extra[i])
                    if anchor is not None:
                        p.grad.add_(p - anchor[i], alpha=settings.proximal_mu)
        optimizer.step()
        losses.append(loss.item())
        yield step + 1
    return LocalSGDResult(float(np.mean(losses)), num_steps, n, losses[0])


@dataclass
class GradientAt:
    """Full-data loss, gradient and ReLU patterns of a model at one point."""

    loss: float
    grads: dict[str, torch.Tensor]  # trained parameter name -> gradient
    patterns: list[torch.Tensor]  # measured layers' (n, m) bool masks


def full_gradient(model: ReluMLP, x: torch.Tensor, y: torch.Tensor, loss: str) -> GradientAt:
    """Loss, gradient (w.r.t. trained parameters) and patterns on all of ``(x, y)``."""
    model.zero_grad(set_to_none=True)
    out, patterns = model.forward_with_patterns(x)
    value = compute_loss(out, y, loss)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params)
    return GradientAt(
        loss=float(value.detach()),
        grads={n: g.detach() for n, g in zip(names, grads, strict=True)},
        patterns=[p.detach() for p in patterns],
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, batch_size: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy (argmax of the output) on ``(x, y)``, on the model's device."""
    model.eval()
    device = module_device(model)
    x, y = x.to(device), y.to(device)
    total_loss, correct, n = 0.0, 0, x.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        out = model(xb)
        total_loss += float(compute_loss(out, yb, loss)) * xb.shape[0]
        correct += int((out.argmax(dim=1) == yb).sum())
    return total_loss / n, correct / n
