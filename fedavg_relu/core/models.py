"""The three ReLU network families of THEORY.md and their losses.

``standard``
    ``depth`` hidden ReLU layers of width ``m`` (``input`` then ``hidden.0`` ..
    ``hidden.{L-2}``), a linear ``output`` layer; PyTorch's default init and
    biases; every parameter trained.
``ntk``
    The same MLP in NTK parameterization: weights N(0, 1), biases 0, and every
    layer's matrix product scaled by ``sqrt(2 / fan_in)``.
``paper``
    Allen-Zhu--Li--Song / Deng et al.: no biases; ``input`` A (m x d) and
    ``hidden.0`` .. ``hidden.{L-1}`` W_1..W_L (m x m) with entries N(0, 2/m);
    ``output`` B (c x m) with entries N(0, 1/c). A and B are frozen; only
    W_1..W_L are trained. Here ``depth`` counts the trained layers W_l, so the
    network has L + 1 ReLU layers.

In every family the *measured* ReLU layers (activation patterns, flips) are the
ones whose pre-activation depends on trained parameters: all ``depth`` hidden
layers of ``standard``/``ntk``, and the outputs of W_1..W_L in ``paper``.

This module does not import flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedavg_relu.core.config import RunConfig


class ScaledLinear(nn.Module):
    """``y = scale * x @ W.T + b`` with ``W ~ N(0, 1)``: one NTK-parameterized layer."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None
        self.scale = math.sqrt(2.0 / fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale * (x @ self.weight.T)
        return out if self.bias is None else out + self.bias


class ReluMLP(nn.Module):
    """A ReLU MLP ``input -> hidden.* -> output`` of one of the three families."""

    def __init__(self, family: str, input_dim: int, width: int, depth: int, output_dim: int) -> None:
        super().__init__()
        if family not in ("standard", "ntk", "paper"):
            raise ValueError(f"model-family={family!r}: expected one of standard, ntk, paper")
        self.family = family
        self.input_dim, self.width, self.depth, self.output_dim = input_dim, width, depth, output_dim
        if family == "standard":
            self.input = nn.Linear(input_dim, width)
            self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
            self.output = nn.Linear(width, output_dim)
        elif family == "ntk":
            self.input = ScaledLinear(input_dim, width)
            self.hidden = nn.ModuleList(ScaledLinear(width, width) for _ in range(depth - 1))
            self.output = ScaledLinear(width, output_dim)
        else:
            std_hidden = math.sqrt(2.0 / width)
            self.input = nn.Linear(input_dim, width, bias=False)
            self.hidden = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
            self.output = nn.Linear(width, output_dim, bias=False)
            with torch.no_grad():
                self.input.weight.normal_(0.0, std_hidden)  # A: N(0, 2/m)
                for layer in self.hidden:
                    layer.weight.normal_(0.0, std_hidden)  # W_l: N(0, 2/m)
                self.output.weight.normal_(0.0, math.sqrt(1.0 / output_dim))  # B: N(0, 1/c)
            self.input.weight.requires_grad_(False)
            self.output.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, d) -> (n, c)
        return self.forward_with_patterns(x)[0]

    def forward_with_patterns(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Output ``(n, c)`` and the measured layers' ReLU on/off masks, each ``(n, m)`` bool."""
        patterns: list[torch.Tensor] = []
        pre = self.input(x)  # (n, m)
        if self.family != "paper":  # A is frozen in `paper`: its pattern never changes
            patterns.append(pre > 0)
        h = F.relu(pre)
        for layer in self.hidden:
            pre = layer(h)
            patterns.append(pre > 0)
            h = F.relu(pre)
        return self.output(h), patterns


def build_model(cfg: RunConfig, input_dim: int, output_dim: int) -> ReluMLP:
    """The initial model W^0 of a run: deterministic in ``cfg.seed`` and the shapes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ReluMLP(cfg.model_family, input_dim, cfg.width, cfg.depth, output_dim)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trained parameters, in registration order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: nn.Module, copy: bool = True) -> dict[str, np.ndarray]:
    """The trained parameters as numpy arrays, keyed by parameter name: copies, or with
    ``copy=False`` (CPU models) views of the parameters' memory, valid until the model changes."""
    return {
        name: p.detach().cpu().numpy().copy() if copy or p.device.type != "cpu" else p.detach().numpy()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def set_trainable(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Load trained parameters in place; names and shapes must match exactly."""
    own = dict(model.named_parameters())
    expected = trainable_names(model)
    if sorted(params) != sorted(expected):
        raise ValueError(f"parameter names {sorted(params)} do not match the model's {sorted(expected)}")
    values = {name: np.asarray(params[name]) for name in expected}
    for name, value in values.items():  # check everything before changing anything
        if tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"parameter {name}: shape {tuple(value.shape)} != model's {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, value in values.items():
            target = own[name]
            if target.device.type == "cpu" and target.is_contiguous():
                np.copyto(target.detach().numpy(), value, casting="same_kind")  # one copy; `value` may be a read-only view
            else:
                target.copy_(torch.from_numpy(np.array(value)))


def compute_loss(output: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean per-example loss.

    ``squared``: ``0.5 * ||output - onehot(label)||^2`` averaged over examples (the
    paper's loss); ``cross-entropy``: softmax cross-entropy.
    """
    if loss == "squared":
        target = F.one_hot(labels, output.shape[1]).to(output.dtype)
        return 0.5 * ((output - target) ** 2).sum(dim=1).mean()
    if loss == "cross-entropy":
        return F.cross_entropy(output, labels)
    raise ValueError(f"loss={loss!r}: expected one of squared, cross-entropy")


def num_trainable(model: nn.Module) -> int:
    """Number of trained scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
