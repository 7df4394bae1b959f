"""The stacked-layer primitives of a cohort of ReLU networks: forward, backward, loss, chunking.

A cohort (:mod:`fedavg_relu.core.cohort`) is ``k`` copies of one
:class:`~fedavg_relu.core.models.ReluMLP` that differ only in their trained weights,
stacked along a leading axis: a trained weight is ``(k, out, in)``, a frozen one
(``paper``'s A and B) is shared. Each layer is one batched product; its backward
is written out by hand (three products per ReLU layer). Local SGD on a cohort
(:mod:`fedavg_relu.core.cohort`) and the Gauss-Newton products of the drift mechanism
(:mod:`fedavg_relu.core.mechanism`) are both built on these functions.

This module does not import flwr.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedavg_relu.core.device import module_device
from fedavg_relu.core.models import ReluMLP, ScaledLinear

#: Bytes of trained weights (and momentum buffers) per chunk of clients stepped together:
#: about half of this machine's 32 MiB last-level cache (measured best at 16-24 MiB).
CHUNK_BYTES = 20 * 2**20


relu_backward = torch.ops.aten.threshold_backward


#: glibc keeps freed blocks up to these sizes in the heap instead of returning them to the
#: kernel: a chunk's activations (~9 MB each at width 4096) are otherwise unmapped when freed
#: and page-faulted in again on the next chunk, which measured ~1.4x slower here.
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 64 * 2**20, 256 * 2**20


_heap_tuned: list[bool] = []


def retain_freed_memory() -> bool:
    """Ask glibc (once per process) to reuse freed large blocks; False where there is no glibc."""
    if not _heap_tuned:
        ok = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
            ok = bool(libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold, _TRIM_THRESHOLD))
        except (OSError, AttributeError):
            ok = False
        _heap_tuned.append(ok)
    return _heap_tuned[0]


@dataclass(frozen=True)
class LayerSpec:
    """One affine layer of a :class:`~fedavg_relu.core.models.ReluMLP`: ``scale * h @ W.T + b``."""

    weight: str  # parameter name
    bias: str | None  # parameter name, None without bias
    scale: float
    weight_trained: bool
    bias_trained: bool


def layer_specs(model: ReluMLP) -> list[LayerSpec]:
    """The model's layers in forward order (input, hidden..., output)."""
    specs = []
    prefixes = ["input", *(f"hidden.{i}" for i in range(len(model.hidden))), "output"]
    modules = [model.input, *model.hidden, model.output]
    for prefix, module in zip(prefixes, modules, strict=True):
        scale = module.scale if isinstance(module, ScaledLinear) else 1.0
        bias = module.bias
        specs.append(
            LayerSpec(
                f"{prefix}.weight", None if bias is None else f"{prefix}.bias", float(scale),
                module.weight.requires_grad, bias is not None and bias.requires_grad,
            )
        )
    return specs


def prepare(
    model: ReluMLP, device: torch.device | None = None,
) -> tuple[list[LayerSpec], dict[str, torch.Tensor], list[str], torch.device]:
    """Heap settings (once per process), the layers, the frozen tensors, the trained names of ``model``
    and the device to compute on: ``device``, default the model's (the frozen tensors are moved there)."""
    retain_freed_memory()
    device = module_device(model) if device is None else torch.device(device)
    frozen = {name: p.detach().to(device) for name, p in model.named_parameters() if not p.requires_grad}
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    return layer_specs(model), frozen, trained, device


def chunk_size(num_trained: int, momentum: bool, budget: int | None = None) -> int:
    """Clients per chunk: as many as keep ``budget`` bytes (default :data:`CHUNK_BYTES`) of float32 weights
    (x2 with momentum), at least 1."""
    budget = CHUNK_BYTES if budget is None else budget
    per_client = 4 * num_trained * (2 if momentum else 1)
    return max(1, budget // max(per_client, 1))


def forward(specs, weight_of: Callable[[str], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``(k, n, c)`` of the stacked clients and each layer's input ``h`` (post-ReLU; ``x`` first).

    ``weight_of(name)`` is a shared ``(out, in)`` / ``(out,)`` tensor or a stacked
    ``(k, out, in)`` / ``(k, out)`` one. A hidden unit is on where its ``h`` > 0,
    which is the model's pattern ``pre > 0``.
    """
    inputs = []
    h = x
    for i, spec in enumerate(specs):
        inputs.append(h)
        w = weight_of(spec.weight)
        bias = weight_of(spec.bias) if spec.bias is not None else None
        pre = _affine(h, w, bias, spec.scale)
        h = pre.relu_() if i < len(specs) - 1 else pre
    return h, inputs


def _affine(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``scale * h @ w^T + bias`` in one product: the bias and the scale go into the GEMM (``addmm``/``baddbmm``),
    not into two more passes over the ``(k, n, out)`` result.

    ``h`` is ``(k, n, in)``; ``w`` a shared ``(out, in)`` or stacked ``(k, out, in)``;
    ``bias`` a shared ``(out,)``, a stacked ``(k, out)`` or None.
    """
    k, n, _ = h.shape
    if w.dim() == 2 and (bias is None or bias.dim() == 1):  # all shared: one plain product over the k n rows
        flat = h.reshape(k * n, h.shape[2])
        if bias is None:
            out = torch.mm(flat, w.T)
            return (out.mul_(scale) if scale != 1.0 else out).view(k, n, -1)
        return torch.addmm(bias, flat, w.T, alpha=scale).view(k, n, -1)
    wt = w.transpose(1, 2) if w.dim() == 3 else w.T.expand(k, *w.T.shape)
    if bias is None:
        out = torch.bmm(h, wt)
        return out.mul_(scale) if scale != 1.0 else out
    return torch.baddbmm(bias.unsqueeze(1) if bias.dim() == 2 else bias, h, wt, alpha=scale)


def loss_and_grad(logits: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's mean loss (float64, ``(k,)``) and d(its mean loss)/d logits (overwrites ``logits``' copy)."""
    num = logits.shape[1]
    onehot = F.one_hot(y, logits.shape[2]).to(logits.dtype)
    if loss == "squared":
        diff = logits - onehot
        return 0.5 * diff.square().sum(2).mean(1, dtype=torch.float64), diff.div_(num)
    if loss == "cross-entropy":
        logp = torch.log_softmax(logits, dim=2)
        value = -(logp * onehot).sum(2).mean(1, dtype=torch.float64)
        return value, logp.exp_().sub_(onehot).div_(num)
    raise ValueError(f"loss={loss!r}: expected one of squared, cross-entropy")


def gradients(specs, weight_of, inputs: list[torch.Tensor], grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every client's gradient of its mean loss w.r.t. each trained parameter, stacked ``(k, *shape)``."""
    out: dict[str, torch.Tensor] = {}
    for i in range(len(specs) - 1, -1, -1):
        spec, h_in = specs[i], inputs[i]
        w = weight_of(spec.weight)
        if spec.weight_trained:
            out[spec.weight] = torch.bmm(grad.transpose(1, 2), h_in)
            if spec.scale != 1.0:
                out[spec.weight].mul_(spec.scale)
        if spec.bias_trained:
            out[spec.bias] = grad.sum(1)
        if i > 0:
            below = torch.bmm(grad, w) if w.dim() == 3 else torch.matmul(grad, w)
            if spec.scale != 1.0:
                below.mul_(spec.scale)
            grad = relu_backward(below, h_in, 0)
    return out


def patterns(specs, inputs: list[torch.Tensor], input_measured: bool) -> list[torch.Tensor]:
    """The measured layers' on/off masks ``(k, n, m)``: hidden layers' outputs, and the input layer's when measured."""
    hidden_outputs = inputs[1:]  # the input of layer i+1 is the output of layer i
    masks = [h > 0 for h in hidden_outputs]
    return masks if input_measured else masks[1:]


def per_client_sq_norm(tensors) -> torch.Tensor:
    """``sum over tensors of ||t_i||^2`` for each client i (leading axis), float64."""
    total = None
    for t in tensors:
        sq = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).double().square()
        total = sq if total is None else total + sq
    return total
