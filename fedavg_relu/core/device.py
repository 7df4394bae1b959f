"""Which torch device a process computes on: run-config key ``device`` resolved on this machine.

``RunConfig`` checks the key's form (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``);
whether the machine has that device is known only where the process runs, so it is
checked here: by the server's preflight (:func:`fedavg_relu.core.preflight.run_problems`,
before any message is sent) and again by every process that resolves the key.

Tensors move at the boundaries only: numpy arrays from Flower records become tensors
on the device where training and measuring start, and results come back with
``.cpu().numpy()``. On ``cpu`` every move is a no-op (``torch.as_tensor`` and
``Tensor.to`` return the tensor itself), so the CPU path makes no extra copies.
Random permutations (minibatch orders) are always drawn on the CPU from a CPU
``torch.Generator`` and their indices moved: a run's minibatches do not depend on the
device.

This module does not import flwr.
"""

from __future__ import annotations

import torch

from fedavg_relu.core.config import DEVICE_EXPECTED, ConfigError, is_device_spec

CPU = torch.device("cpu")


def device_problem(spec: str) -> str | None:
    """Why ``device=spec`` cannot run on this machine (one ``key=value: expected ...`` line), or None."""
    if not is_device_spec(spec):
        return f"device={spec!r}: expected {DEVICE_EXPECTED}"
    if not spec.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return (
            f"device={spec!r}: expected a CUDA GPU on this machine, but torch {torch.__version__} sees none "
            '(torch.cuda.is_available() is False); use device="auto" or "cpu"'
        )
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        return f"device={spec!r}: expected a GPU index below {count} (this machine has {count} CUDA device(s))"
    return None


def resolve_device(spec: str) -> torch.device:
    """``device`` as a ``torch.device``: ``"auto"`` is cuda when ``torch.cuda.is_available()``, else cpu.

    Raises :class:`~fedavg_relu.core.config.ConfigError` naming the key, the value and what
    was expected when the spec is malformed or its GPU is not on this machine.
    """
    problem = device_problem(spec)
    if problem is not None:
        raise ConfigError([problem])
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    return torch.device(spec)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timer's fence); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s parameters (a model computes where its weights live)."""
    return next(module.parameters()).device
