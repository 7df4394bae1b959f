"""The mechanism behind the drift: its nonlinear part, and how far the tangent kernel moves.

Two quantities of THEORY.md's "mechanism" list, as pure functions.

Nonlinear drift fraction
    For client k with local model W_k and average W̄ = W^{r+1},
    ``Δg_k = ∇f_k(W_k) − ∇f_k(W̄)`` and ``ΔW_k = W_k − W̄``. The linearized network
    ``out(W) ≈ out(W̄) + J (W − W̄)`` (J: the Jacobian of all n_k × c outputs at W̄
    w.r.t. the trained parameters) predicts the Gauss–Newton change
    ``GN_k = Jᵀ H J ΔW_k``, where H is the Hessian of the client's *mean* loss
    w.r.t. the outputs. With :func:`fedavg_relu.core.models.compute_loss`'s
    normalisation, ``f_k = (1/(2 n_k)) Σ_i ||out_i − y_i||²`` gives ``H = I / n_k``,
    so ``GN_k = (1/n_k) Jᵀ J ΔW_k``; softmax cross-entropy (mean over examples)
    gives the block diagonal ``H_i = (diag(p_i) − p_i p_iᵀ) / n_k``. The fraction
    ``||Δg_k − GN_k|| / ||Δg_k||`` is what the linearized model cannot explain:
    activation flips and the curvature of the network (``Σ_i r_i ∇² out_i``, zero
    for a network that is linear in its trained parameters). GN_k costs one jvp
    (``J ΔW_k``) and one vjp (``Jᵀ u``); J is never formed.

NTK change
    The empirical tangent kernel on a fixed probe set ``X_p`` (n_p examples),
    **traced over the c outputs**: ``Θ(W)[i, i'] = Σ_j <∂out_j(x_i)/∂W, ∂out_j(x_i')/∂W>``,
    an ``(n_p, n_p)`` matrix (neural-tangents' default ``trace_axes=(-1,)``; at large
    width the full ``(n_p c, n_p c)`` Gram is close to ``Θ / c ⊗ I_c``). The full Gram
    is available with ``outputs="all"`` (row/column ``i * c + j``) but every recorded
    metric uses the trace. ``ntk-change = ||Θ(W) − Θ(W^0)||_F / ||Θ(W^0)||_F``.

    For a :class:`~fedavg_relu.core.models.ReluMLP` (every family) the Gram has a closed
    form, because each weight's gradient is an outer product: with ``h_l`` the input
    of layer l, ``s_l`` its scale and ``δ_l(i, j) = ∂out_j(x_i)/∂pre_l``,
    ``∂out_j(x_i)/∂W_l = s_l δ_l(i, j) h_l(x_i)ᵀ``, so
    ``<∂out_j(x_i)/∂W_l, ∂out_j'(x_i')/∂W_l> = s_l² <h_l(x_i), h_l(x_i')> <δ_l(i, j), δ_l(i', j')>``
    (a bias adds ``<δ_l(i, j), δ_l(i', j')>``). In the ``paper`` family with one
    trained layer, ``δ_1(i, j) = B_j ⊙ 1[pre_1(x_i) > 0]``: the inner products of the
    layer inputs times the masked output-weight products. :func:`ntk_gram` uses it
    for ReluMLPs and falls back to :func:`ntk_gram_autodiff` (torch.func, any module)
    otherwise.

Vectorized cohorts (stacked ``(k, out, in)`` weights, :mod:`fedavg_relu.core.cohort`) get
:func:`measure_cohort_nonlinear_drift_vectorized`, built on :func:`stacked_gauss_newton`
(hand-written jvp, the cohort's hand-written backward).

ReLU derivatives follow autograd's convention (0 at a pre-activation of exactly 0),
so every function here agrees with ``torch.autograd`` and ``torch.func``.

This module does not import flwr.

Why this module is longer than most: the three measurements of the proof's mechanism (a
client's nonlinear drift, its stacked cohort version, the NTK Gram in closed form and by
autodiff) share their Gauss-Newton and Jacobian products; apart, each would re-derive
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import functional as F

from fedavg_relu.core.device import module_device
from fedavg_relu.core.stacked import (
    CHUNK_BYTES, chunk_size, forward, gradients, layer_specs, loss_and_grad, per_client_sq_norm, prepare,
    retain_freed_memory,
)
from fedavg_relu.core.models import ReluMLP, compute_loss, trainable_names

#: Bytes of Jacobian rows :func:`ntk_gram_autodiff` holds at once (two blocks of rows).
NTK_BLOCK_BYTES = 2**30

Params = Mapping[str, "np.ndarray | torch.Tensor"]


# ----------------------------------------------------------------------------------------
# nonlinear drift fraction, one client
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonlinearDrift:
    """One client's split of the gradient drift into linearized and nonlinear parts."""

    fraction: float  # ||Δg − GN|| / ||Δg|| (0 when Δg = GN = 0, NaN when only Δg = 0)
    drift_norm: float  # ||Δg|| = ||∇f_k(W_k) − ∇f_k(W̄)||
    residual_norm: float  # ||Δg − GN||: what the linearized model cannot explain
    linear_norm: float  # ||GN|| = ||Jᵀ H J ΔW||


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _as_tensors(params: Params, names: Sequence[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"parameters lack the trained names {missing}")
    return {n: torch.as_tensor(np.asarray(params[n]) if not torch.is_tensor(params[n]) else params[n]).to(device, dtype)
            for n in names}


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.nan


def _sq(tensors) -> float:
    """``sum ||t||²``: per-tensor norms in the tensors' dtype (no copies), accumulated in float64."""
    return sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors)


def loss_output_gradient(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``∂f/∂out`` of the mean loss ``f`` (``out`` (n, c), ``y`` (n,) labels)."""
    onehot = F.one_hot(y, out.shape[-1]).to(out.dtype)
    n = out.shape[-2]
    if loss == "squared":
        return (out - onehot) / n
    if loss == "cross-entropy":
        return (torch.softmax(out, dim=-1) - onehot) / n
    raise ValueError(f"loss={loss!r}: expected one of squared, cross-entropy")


def loss_hessian_product(out: torch.Tensor, v: torch.Tensor, loss: str) -> torch.Tensor:
    """``H v`` with H the Hessian of the mean loss w.r.t. the outputs (``out``, ``v``: (..., n, c)).

    squared: ``H = I / n``; cross-entropy: per example ``(diag(p) − p pᵀ) / n``, ``p = softmax(out)``.
    """
    n = out.shape[-2]
    if loss == "squared":
        return v / n
    if loss == "cross-entropy":
        p = torch.softmax(out, dim=-1)
        pv = p * v
        return (pv - p * pv.sum(-1, keepdim=True)) / n
    raise ValueError(f"loss={loss!r}: expected one of squared, cross-entropy")


def gauss_newton_product(
    model: nn.Module, at: Params, direction: Params, x: torch.Tensor, loss: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, Callable]:
    """``Jᵀ H J v`` at ``at`` for ``v = direction`` (both keyed by the trained names).

    One jvp (``J v``) and one vjp (``Jᵀ (H J v)``) through ``torch.func``; J is
    never formed. Returns the product, the outputs at ``at`` (n, c) and the vjp
    function (``u (n, c) -> (Jᵀ u per name,)``), which a caller may reuse, e.g. for
    the gradient at ``at``. Runs on the model's device.
    """
    names = trainable_names(model)
    dtype, device = _dtype(model), module_device(model)
    w = _as_tensors(at, names, dtype, device)
    v = _as_tensors(direction, names, dtype, device)
    x = x.to(device, dtype)

    def outputs(p):
        return functional_call(model, p, (x,))

    _, jv = jvp(outputs, (w,), (v,))  # (n, c)
    out, pullback = vjp(outputs, w)
    (product,) = pullback(loss_hessian_product(out.detach(), jv, loss))
    return product, out.detach(), pullback


def nonlinear_drift(
    model: nn.Module,
    local_params: Params,
    global_params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    grad_local: Params | None = None,
    grad_global: Params | None = None,
) -> NonlinearDrift:
    """Client k's nonlinear drift fraction ``||Δg − (Jᵀ H J) ΔW|| / ||Δg||`` on its data ``(x, y)``.

    Parameters
    ----------
    model
        The architecture and frozen weights (its trained parameters are not used or changed).
    local_params, global_params
        W_k and W̄ = W^{r+1}, keyed by the trained parameter names.
    x, y
        Client k's full local data, ``(n_k, d)`` and ``(n_k,)`` labels.
    loss
        ``squared`` or ``cross-entropy`` (H as in :func:`loss_hessian_product`).
    grad_local, grad_global
        ``∇f_k(W_k)`` and ``∇f_k(W̄)`` when the caller already has them (e.g.
        :func:`fedavg_relu.core.training.full_gradient`'s ``grads``); computed otherwise
        (the one at W̄ from the same vjp, one backward more).

    Cost: one jvp and one vjp at W̄ (about three forward passes), plus what is
    not given: a backward at W̄, a forward and backward at W_k. Runs on the model's
    device (the data and parameters move there).
    """
    retain_freed_memory()  # m x m temporaries: reuse freed blocks instead of page-faulting new ones
    names = trainable_names(model)
    dtype, device = _dtype(model), module_device(model)
    x, y = x.to(device), y.to(device)
    w_local = _as_tensors(local_params, names, dtype, device)
    w_global = _as_tensors(global_params, names, dtype, device)
    delta = {n: w_local[n] - w_global[n] for n in names}
    gn, out, pullback = gauss_newton_product(model, w_global, delta, x, loss)
    del delta
    if grad_global is None:
        (g_global,) = pullback(loss_output_gradient(out, y, loss))
    else:
        g_global = _as_tensors(grad_global, names, dtype, device)
    del pullback
    if grad_local is None:  # our own tensors: the drift is formed in place
        x_ = x.to(dtype)
        drift = grad(lambda p: compute_loss(functional_call(model, p, (x_,)), y, loss))(w_local)
        for n in names:
            drift[n].sub_(g_global[n])
    else:
        g_local = _as_tensors(grad_local, names, dtype, device)
        drift = {n: g_local[n] - g_global[n] for n in names}
    del g_global
    drift_norm = math.sqrt(_sq(drift.values()))
    linear_norm = math.sqrt(_sq(gn.values()))
    for n in names:
        drift[n].sub_(gn[n])  # now the residual Δg − GN
    residual_norm = math.sqrt(_sq(drift.values()))
    return NonlinearDrift(
        fraction=_ratio(residual_norm, drift_norm),
        drift_norm=drift_norm,
        residual_norm=residual_norm,
        linear_norm=linear_norm,
    )


# ----------------------------------------------------------------------------------------
# nonlinear drift fraction, a vectorized cohort
# ----------------------------------------------------------------------------------------


def _stacked_jvp(specs, weight_of, inputs: list[torch.Tensor], delta_of) -> torch.Tensor:
    """``J ΔW_k`` for every client: the output tangent ``(k, n, c)`` at the shared weights.

    ``inputs``: each layer's input at those weights (``forward``'s, ``(k, n, in)``);
    ``delta_of(name)``: the stacked ``(k, *shape)`` tangent of a trained parameter.
    Per layer ``dpre = s (dh Wᵀ + h dWᵀ) + db`` and ``dh_next = dpre ⊙ 1[h_next > 0]``.
    """
    last = len(specs) - 1
    dh = None  # tangent of the layer input; None = 0 (the data has none)
    for i, spec in enumerate(specs):
        w, h = weight_of(spec.weight), inputs[i]
        dpre = None
        if dh is not None:
            dpre = torch.bmm(dh, w.transpose(1, 2)) if w.dim() == 3 else torch.matmul(dh, w.T)
        if spec.weight_trained:
            term = torch.bmm(h, delta_of(spec.weight).transpose(1, 2))
            dpre = term if dpre is None else dpre.add_(term)
        if dpre is not None and spec.scale != 1.0:
            dpre.mul_(spec.scale)
        if spec.bias_trained:
            db = delta_of(spec.bias).unsqueeze(1)  # (k, 1, out)
            dpre = db.expand(h.shape[0], h.shape[1], db.shape[2]).clone() if dpre is None else dpre.add_(db)
        if i < last:
            dh = None if dpre is None else dpre.mul_(inputs[i + 1] > 0)
        else:
            return dpre if dpre is not None else torch.zeros(h.shape[0], h.shape[1], w.shape[-2], dtype=h.dtype, device=h.device)
    raise AssertionError("no layers")


def stacked_gauss_newton(
    specs, weight_of, inputs: list[torch.Tensor], logits: torch.Tensor, delta_of, loss: str,
) -> dict[str, torch.Tensor]:
    """Every client's ``Jᵀ H J ΔW_k`` (name -> ``(k, *shape)``) at shared weights, on its own data.

    The pieces of :func:`fedavg_relu.core.cohort.measure_cohort_drift_vectorized` at W̄:
    ``weight_of`` gives W̄'s (shared) or frozen weights, ``inputs``/``logits`` are
    ``forward``'s at W̄ on the stacked data ``(k, n, d)``, ``delta_of(name)`` the
    stacked ``ΔW_k``. Costs one hand-written jvp and one backward.
    """
    jd = _stacked_jvp(specs, weight_of, inputs, delta_of)
    return gradients(specs, weight_of, inputs, loss_hessian_product(logits, jd, loss))


def measure_cohort_nonlinear_drift_vectorized(
    model: ReluMLP,
    local_params: Mapping[str, np.ndarray],
    global_params: Mapping[str, np.ndarray],
    datas: Sequence,
    loss: str,
    budget: int | None = None,
    device: torch.device | None = None,
) -> list[NonlinearDrift]:
    """:func:`nonlinear_drift` for stacked clients (``local_params``: name -> ``(K, *shape)``).

    Clients are grouped by data size and cut into chunks of ``budget`` bytes of
    weights, as in :func:`fedavg_relu.core.cohort.measure_cohort_drift_vectorized`.
    Per chunk: forward and backward at W̄ and at W_k, one jvp and one backward, on
    ``device`` (default: the model's).
    """
    specs, frozen, trained, device = prepare(model, device)
    budget = CHUNK_BYTES if budget is None else budget
    at_global = {n: torch.as_tensor(np.asarray(global_params[n]), device=device) for n in trained}
    sizes = np.array([len(d) for d in datas], np.int64)
    out: list = [None] * len(datas)
    per_chunk = chunk_size(sum(int(t.numel()) for t in at_global.values()), True, budget)

    def weights(values):
        return lambda name: values[name] if name in values else frozen[name]

    for n in np.unique(sizes):
        members = [int(i) for i in np.flatnonzero(sizes == n)]
        for first in range(0, len(members), per_chunk):
            chunk = members[first : first + per_chunk]
            x = torch.stack([datas[i].x for i in chunk]).to(device)
            y = torch.stack([datas[i].y for i in chunk]).to(device)
            local = {name: torch.as_tensor(np.asarray(local_params[name])[chunk], device=device) for name in trained}
            delta = {name: local[name] - at_global[name] for name in trained}
            logits, inputs = forward(specs, weights(at_global), x)
            _, g = loss_and_grad(logits, y, loss)
            grads_g = gradients(specs, weights(at_global), inputs, g)
            gn = stacked_gauss_newton(specs, weights(at_global), inputs, logits, delta.__getitem__, loss)
            del inputs, logits, g
            logits, inputs = forward(specs, weights(local), x)
            _, g = loss_and_grad(logits, y, loss)
            grads_l = gradients(specs, weights(local), inputs, g)
            del inputs, logits, g
            drift = {name: grads_l[name] - grads_g[name] for name in trained}
            drift_norm = per_client_sq_norm(drift.values()).sqrt().cpu()
            residual = per_client_sq_norm(drift[name] - gn[name] for name in trained).sqrt().cpu()
            linear = per_client_sq_norm(gn.values()).sqrt().cpu()
            for j, i in enumerate(chunk):
                out[i] = NonlinearDrift(
                    fraction=_ratio(float(residual[j]), float(drift_norm[j])),
                    drift_norm=float(drift_norm[j]), residual_norm=float(residual[j]), linear_norm=float(linear[j]),
                )
    return out


# ----------------------------------------------------------------------------------------
# empirical NTK
# ----------------------------------------------------------------------------------------


def probe_indices(num_examples: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``min(size, num_examples)`` distinct example indices, sorted, deterministic in ``seed``."""
    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples}: expected > 0")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_examples, generator=g)[: min(size, num_examples)].sort().values


def _check_outputs(outputs: str) -> None:
    if outputs not in ("trace", "all"):
        raise ValueError(f"outputs={outputs!r}: expected trace or all")


def ntk_gram(
    model: nn.Module, params: Params | None, x_probe: torch.Tensor, outputs: str = "trace", device: torch.device | None = None,
) -> torch.Tensor:
    """The empirical NTK Gram of the trained parameters on ``x_probe`` (float64, on the CPU).

    ``outputs="trace"``: ``(n, n)``, summed over the c outputs (the recorded
    metric's choice); ``"all"``: ``(n c, n c)``, row ``i * c + j`` for output j of
    example i. ``params`` (trained names) default to the model's own. Closed form
    for a :class:`~fedavg_relu.core.models.ReluMLP` (:func:`ntk_gram_closed_form`, computed
    on ``device``, default the model's), ``torch.func`` otherwise (:func:`ntk_gram_autodiff`,
    on the model's device).
    """
    if isinstance(model, ReluMLP):
        return ntk_gram_closed_form(model, params, x_probe, outputs, device)
    return ntk_gram_autodiff(model, params, x_probe, outputs)


def ntk_gram_closed_form(
    model: ReluMLP, params: Params | None, x_probe: torch.Tensor, outputs: str = "trace", device: torch.device | None = None,
) -> torch.Tensor:
    """:func:`ntk_gram` from the layers' inputs and back-propagated output directions.

    ``Θ = Σ_{trained W_l} s_l² (h_l h_lᵀ) ⊙ G_l + Σ_{trained b_l} G_l`` with ``G_l`` the Gram of
    ``δ_l(i, j) = ∂out_j(x_i)/∂pre_l`` (traced over j, or over all (j, j') pairs).
    ``δ`` starts at ``e_j`` on the outputs and is carried down only as far as the
    lowest trained layer. Cost: one forward, ``n c`` rows back through each layer
    above the lowest trained one, and the small Grams (float64); memory ``O(n c m)``.
    Computed on ``device`` (default: the model's), returned on the CPU.
    """
    _check_outputs(outputs)
    specs = layer_specs(model)
    names = trainable_names(model)
    dtype = _dtype(model)
    device = module_device(model) if device is None else torch.device(device)
    values = {name: p.to(device) for name, p in model.named_parameters()}
    if params is not None:
        values.update(_as_tensors(params, names, dtype, device))
    with torch.no_grad():
        x = x_probe.to(device, dtype)
        inputs = []
        h = x
        for i, spec in enumerate(specs):
            inputs.append(h)
            pre = spec.scale * (h @ values[spec.weight].T)
            if spec.bias is not None:
                pre = pre + values[spec.bias]
            h = torch.relu(pre) if i < len(specs) - 1 else pre
        n, c = x.shape[0], h.shape[1]
        lowest = min(i for i, s in enumerate(specs) if s.weight_trained or s.bias_trained)
        delta = torch.eye(c, dtype=dtype, device=device).expand(n, c, c)  # (n, c, out_l): ∂out_j(x_i)/∂pre_l
        theta = torch.zeros((n, n) if outputs == "trace" else (n * c, n * c), dtype=torch.float64, device=device)
        for i in range(len(specs) - 1, lowest - 1, -1):
            spec = specs[i]
            if spec.weight_trained or spec.bias_trained:
                d64 = delta.double()
                if outputs == "trace":
                    g_delta = torch.einsum("ijm,kjm->ik", d64, d64)  # (n, n)
                else:
                    flat = d64.reshape(n * c, -1)
                    g_delta = flat @ flat.T  # (n c, n c)
                if spec.weight_trained:
                    h64 = inputs[i].double()
                    g_h = h64 @ h64.T
                    if outputs == "all":
                        g_h = g_h.repeat_interleave(c, 0).repeat_interleave(c, 1)
                    theta += spec.scale**2 * g_h * g_delta
                if spec.bias_trained:
                    theta += g_delta
            if i > lowest:  # δ_{l-1} = s_l (δ_l W_l) ⊙ 1[h_l > 0]
                delta = (delta @ values[spec.weight]) * (inputs[i] > 0).unsqueeze(1).to(dtype)
                if spec.scale != 1.0:
                    delta = delta * spec.scale
    return theta.cpu()


def ntk_gram_autodiff(
    model: nn.Module,
    params: Params | None,
    x_probe: torch.Tensor,
    outputs: str = "trace",
    budget: int = NTK_BLOCK_BYTES,
) -> torch.Tensor:
    """:func:`ntk_gram` for any module through ``torch.func``, in blocks of Jacobian rows.

    A row of J is ``∂out_j(x_i)/∂W`` (all trained parameters): one single-example
    backward, vmapped over the rows of a block. ``Θ[a, b] = J_a J_bᵀ`` for every pair
    of blocks; two blocks of ``budget // 2`` bytes are held at once (at least one row
    each), so memory stays bounded at any width, at the price of recomputing rows:
    about ``(rows / block) · rows`` row gradients and ``rows² P`` multiply-adds
    (rows = n per output for the trace, n c for all pairs; P trained scalars).
    Computed on the model's device, returned on the CPU.
    """
    _check_outputs(outputs)
    names = trainable_names(model)
    dtype, device = _dtype(model), module_device(model)
    own = dict(model.named_parameters())
    w = _as_tensors(params if params is not None else {k: own[k].detach() for k in names}, names, dtype, device)
    x = x_probe.to(device, dtype)
    n = x.shape[0]
    with torch.no_grad():
        c = functional_call(model, w, (x[:1],)).shape[1]
    numel = sum(int(t.numel()) for t in w.values())
    per_block = max(1, budget // (2 * numel * w[names[0]].element_size()))
    eye = torch.eye(c, dtype=dtype, device=device)

    def row_gradient(p, xi, e):
        return grad(lambda q: (functional_call(model, q, (xi.unsqueeze(0),))[0] * e).sum())(p)

    rows_of = vmap(row_gradient, in_dims=(None, 0, 0))

    def gram(rows: list[tuple[int, int]]) -> torch.Tensor:
        blocks = [rows[s : s + per_block] for s in range(0, len(rows), per_block)]
        out = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=device)

        def jac(block):
            ex = torch.tensor([i for i, _ in block], device=device)
            oj = torch.tensor([j for _, j in block], device=device)
            return {k: v.reshape(len(block), -1) for k, v in rows_of(w, x[ex], eye[oj]).items()}

        for a, block_a in enumerate(blocks):
            ja = jac(block_a)
            ra = slice(a * per_block, a * per_block + len(block_a))
            for b in range(a, len(blocks)):
                jb = ja if b == a else jac(blocks[b])
                rb = slice(b * per_block, b * per_block + len(blocks[b]))
                block = sum((ja[k] @ jb[k].T).double() for k in names)
                out[ra, rb] = block
                out[rb, ra] = block.T
                del jb
        return out

    with torch.no_grad():
        if outputs == "trace":
            return sum(gram([(i, j) for i in range(n)]) for j in range(c)).cpu()
        return gram([(i, j) for i in range(n) for j in range(c)]).cpu()


def ntk_change(theta_now: torch.Tensor | np.ndarray, theta_init: torch.Tensor | np.ndarray) -> float:
    """``||Θ − Θ0||_F / ||Θ0||_F`` (0 when both are 0, NaN when only Θ0 is)."""
    now = torch.as_tensor(theta_now, dtype=torch.float64)
    init = torch.as_tensor(theta_init, dtype=torch.float64)
    if now.shape != init.shape:
        raise ValueError(f"Gram shapes differ: {tuple(now.shape)} vs {tuple(init.shape)}")
    return _ratio(float(torch.linalg.matrix_norm(now - init)), float(torch.linalg.matrix_norm(init)))
