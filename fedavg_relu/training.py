"""Local SGD on one client, full-batch gradients, and evaluation.

This module does not import flwr.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .models import ReluMLP, compute_loss


@dataclass(frozen=True)
class LocalSGDSettings:
    """What a client needs to run one round of local SGD."""

    local_steps: int  # tau
    learning_rate: float  # eta (already width-scaled where asked)
    batch_size: int  # 0 = full batch (Local GD)
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "squared"


@dataclass(frozen=True)
class LocalSGDResult:
    """Summary of one client's local training."""

    mean_batch_loss: float  # mean of the minibatch losses seen over the tau steps
    num_steps: int
    num_examples: int


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
) -> LocalSGDResult:
    """Run ``tau`` steps of (minibatch) SGD on ``model`` in place.

    Minibatches are drawn without replacement from a fresh permutation of the
    client's examples each epoch (``generator`` decides it); a batch size of 0 or
    one at least ``n`` is full-batch gradient descent. When ``n`` is not a
    multiple of the batch size, the leftover examples of an epoch are skipped
    (like ``drop_last``) and a new permutation starts.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("client has no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    batch = n if settings.batch_size <= 0 else min(settings.batch_size, n)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    losses = []
    model.train()
    for _ in range(settings.local_steps):
        if batch == n:
            xb, yb = x, y
        else:
            if cursor + batch > n:
                order = torch.randperm(n, generator=generator)
                cursor = 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(model(xb), yb, settings.loss)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return LocalSGDResult(float(np.mean(losses)), settings.local_steps, n)


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
    """Mean loss and accuracy (argmax of the output) on ``(x, y)``."""
    model.eval()
    total_loss, correct, n = 0.0, 0, x.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        out = model(xb)
        total_loss += float(compute_loss(out, yb, loss)) * xb.shape[0]
        correct += int((out.argmax(dim=1) == yb).sum())
    return total_loss / n, correct / n
