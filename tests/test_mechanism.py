"""Tests of fedavg_relu/core/mechanism.py: nonlinear drift fraction and empirical NTK.

Reference computations build the Jacobian explicitly with ``torch.func.jacrev`` on
tiny float64 networks; agreement is then to float64 rounding of sums of a few
hundred terms of size <= ~10, i.e. ~1e-13 absolute, checked at rtol 1e-9.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from fedavg_relu.core.data import TensorData
from fedavg_relu.core.mechanism import (
    NonlinearDrift,
    loss_hessian_product,
    measure_cohort_nonlinear_drift_vectorized,
    nonlinear_drift,
    ntk_change,
    ntk_gram,
    ntk_gram_autodiff,
    ntk_gram_closed_form,
    probe_indices,
)
from fedavg_relu.core.models import ReluMLP, compute_loss, get_trainable, set_trainable, trainable_names

D, C = 3, 2
F64 = torch.float64


def _net(family, depth, width=5, seed=0, d=D, c=C):
    torch.manual_seed(seed)
    return ReluMLP(family, d, width, depth, c).double()


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _flat_jacobian(model, params, x):
    """J as an (n c, P) matrix: row i * c + j is d out_j(x_i) / dW, columns in trained-name order."""
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    rows = x.shape[0] * model.output_dim
    return torch.cat([jac[name].reshape(rows, -1) for name in trainable_names(model)], dim=1)


def _autograd_gradient(model, params, x, y, loss):
    """grad f_k at ``params`` through plain autograd on a copy of the module, flattened."""
    m = copy.deepcopy(model)
    set_trainable(m, {k: v.numpy() for k, v in params.items()})
    value = compute_loss(m(x), y, loss)
    grads = torch.autograd.grad(value, [p for p in m.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads])


# ------------------------------------------------------------------------------ drift


def test_fraction_is_zero_when_the_network_is_linear_in_its_trained_layer():
    """paper, depth 1, with every pre-activation of the trained layer strictly positive at W̄ and W_k.

    out(x) = B relu(W_1 h(x)), h(x) = relu(A x) >= 0 (A frozen). With W̄ and W_k
    entrywise in [0.5, 1.5] and h != 0, every pre = W h > 0 for both (and, being
    linear in W, on the whole segment): the mask is 1, so out = B W h is *linear*
    in W and f_k = (1/2n) Σ ||B W h_i − y_i||² is exactly quadratic with Hessian
    (1/n) JᵀJ. Then Δg = (1/n) JᵀJ ΔW exactly and the residual is float64 rounding
    only: each gradient entry is a sum of n·c = 12 products of O(1) numbers,
    error <= ~12 · 2^-52 · ||g|| ≈ 3e-15 ||g||; with ||ΔW|| = O(1) the drift is
    O(||g||), so fraction <= ~1e-13. Checked at 1e-10. The patterns are asserted
    equal, and ||Δg|| is asserted not small, so the test is not vacuous.
    """
    model = _net("paper", 1, width=6)
    torch.manual_seed(1)
    x = torch.rand(6, D, dtype=F64) + 0.1  # positive inputs: h = relu(A x) has some positive entries
    y = torch.randint(0, C, (6,))
    gen = np.random.default_rng(2)
    w_bar = {"hidden.0.weight": torch.from_numpy(gen.uniform(0.5, 1.5, (6, 6)))}
    w_k = {"hidden.0.weight": torch.from_numpy(gen.uniform(0.5, 1.5, (6, 6)))}
    patterns = []
    for w in (w_bar, w_k):
        set_trainable(model, {k: v.numpy() for k, v in w.items()})
        patterns.append(model.forward_with_patterns(x)[1][0])
    assert bool(patterns[0].all()) and bool(patterns[1].all())
    out = nonlinear_drift(model, w_k, w_bar, x, y, "squared")
    assert out.drift_norm > 1e-2
    assert out.fraction < 1e-10
    assert out.linear_norm == pytest.approx(out.drift_norm, rel=1e-10)


def test_fraction_of_one_flipping_unit_by_hand():
    """paper, depth 1, width 1, d = 1, c = 1: A = 1, B = 1, x = 1, label 0 (target 1); n = 1.

    out(w) = relu(w · relu(1)) = relu(w). f(w) = ½ (relu(w) − 1)², f'(w) = (relu(w) − 1) 1[w > 0].
    W̄ = 2: out = 2, g = 1, J = 1. W_k = −1: the unit is off, g = 0.
    Δg = 0 − 1 = −1, ΔW = −3, GN = (1/n) J² ΔW = −3, residual = −1 − (−3) = 2:
    fraction = 2 / 1 = 2, drift 1, residual 2, linear 3.
    """
    model = ReluMLP("paper", 1, 1, 1, 1).double()
    with torch.no_grad():
        model.input.weight.fill_(1.0)
        model.output.weight.fill_(1.0)
    x = torch.ones(1, 1, dtype=F64)
    y = torch.zeros(1, dtype=torch.int64)
    out = nonlinear_drift(model, {"hidden.0.weight": np.array([[-1.0]])}, {"hidden.0.weight": np.array([[2.0]])}, x, y, "squared")
    assert out == NonlinearDrift(fraction=2.0, drift_norm=1.0, residual_norm=2.0, linear_norm=3.0)


@pytest.mark.parametrize("loss", ["squared", "cross-entropy"])
@pytest.mark.parametrize("family", ["standard", "ntk", "paper"])
def test_one_hidden_layer_against_explicit_jacobian(family, loss):
    """One hidden layer (width 5, d = 3, c = 2, n = 6), W_k = W̄ + 0.4 N(0, 1): patterns flip.

    Reference, all explicit: J = jacrev(out)(W̄) as (n c, P); H = I / n (squared,
    f = (1/2n) Σ ||out − y||²) or block diagonal (diag(p_i) − p_i p_iᵀ) / n
    (cross-entropy, p_i = softmax(out_i)); GN = Jᵀ H J ΔW; Δg from two autograd
    gradients. fraction = ||Δg − GN|| / ||Δg||, which is not ~0 here (flips and the
    curvature of the output in the trained weights), so the test also shows the
    metric is not vacuous. Given gradients (the caller's) give the same numbers.
    """
    model = _net(family, 1)
    torch.manual_seed(3)
    x = torch.randn(6, D, dtype=F64)
    y = torch.randint(0, C, (6,))
    w_bar = _params(model)
    w_k = {k: v + 0.4 * torch.randn_like(v) for k, v in w_bar.items()}
    n = x.shape[0]
    jac = _flat_jacobian(model, w_bar, x)  # (n c, P)
    dw = torch.cat([(w_k[k] - w_bar[k]).reshape(-1) for k in trainable_names(model)])
    out = functional_call(model, w_bar, (x,))
    if loss == "squared":
        hess = torch.eye(n * C, dtype=F64) / n
    else:
        p = torch.softmax(out, dim=1)
        hess = torch.block_diag(*[(torch.diag(p[i]) - torch.outer(p[i], p[i])) / n for i in range(n)])
    gn = jac.T @ hess @ jac @ dw
    g_local = _autograd_gradient(model, w_k, x, y, loss)
    g_global = _autograd_gradient(model, w_bar, x, y, loss)
    dg = g_local - g_global
    expected = float(torch.linalg.vector_norm(dg - gn) / torch.linalg.vector_norm(dg))
    assert expected > 0.05

    got = nonlinear_drift(model, w_k, w_bar, x, y, loss)
    assert got.fraction == pytest.approx(expected, rel=1e-9)
    assert got.drift_norm == pytest.approx(float(torch.linalg.vector_norm(dg)), rel=1e-9)
    assert got.linear_norm == pytest.approx(float(torch.linalg.vector_norm(gn)), rel=1e-9)

    def split(flat):
        out, at = {}, 0
        for name in trainable_names(model):
            size = w_bar[name].numel()
            out[name] = flat[at : at + size].reshape(w_bar[name].shape)
            at += size
        return out

    given = nonlinear_drift(model, w_k, w_bar, x, y, loss, grad_local=split(g_local), grad_global=split(g_global))
    assert given.fraction == pytest.approx(expected, rel=1e-9)


def test_loss_hessian_product_of_cross_entropy_by_hand():
    """One example, c = 2, out = (0, 0): p = (½, ½), H = diag(p) − ppᵀ = [[¼, −¼], [−¼, ¼]].

    H (1, 0) = (¼, −¼); n = 1. Squared: H v = v / n. An unknown loss raises.
    """
    out = torch.zeros(1, 2, dtype=F64)
    v = torch.tensor([[1.0, 0.0]], dtype=F64)
    assert loss_hessian_product(out, v, "cross-entropy").tolist() == [[0.25, -0.25]]
    assert loss_hessian_product(out, v, "squared").tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="loss='hinge'"):
        loss_hessian_product(out, v, "hinge")


@pytest.mark.parametrize("family,depth,loss", [
    ("standard", 2, "cross-entropy"), ("ntk", 1, "squared"), ("paper", 2, "squared"), ("paper", 1, "cross-entropy"),
])
@pytest.mark.parametrize("budget", [None, 1])
def test_cohort_version_equals_per_client(family, depth, loss, budget):
    """4 clients (sizes 5, 7, 5, 7: two size groups), W_k = W̄ + 0.2 N(0, 1) each, float32.

    Each client's NonlinearDrift from the stacked hand-written jvp/backward equals
    nonlinear_drift on that client alone (torch.func): the same float32 quantities
    summed in another order, so rtol 1e-4 on norms of size ~0.01-1 (and on the
    fraction, a ratio of two such norms). ``budget=1`` byte: chunks of one client.
    """
    torch.manual_seed(4)
    model = ReluMLP(family, D, 8, depth, C)
    w_bar = get_trainable(model)
    gen = np.random.default_rng(5)
    sizes = [5, 7, 5, 7]
    local = {k: np.stack([v + 0.2 * gen.standard_normal(v.shape).astype(np.float32) for _ in sizes]) for k, v in w_bar.items()}
    datas = [TensorData(torch.randn(n, D), torch.randint(0, C, (n,))) for n in sizes]
    got = measure_cohort_nonlinear_drift_vectorized(model, local, w_bar, datas, loss, budget=budget)
    for i, data in enumerate(datas):
        ref = nonlinear_drift(model, {k: v[i] for k, v in local.items()}, w_bar, data.x, data.y, loss)
        assert ref.fraction > 1e-3
        for field in ("fraction", "drift_norm", "residual_norm", "linear_norm"):
            assert getattr(got[i], field) == pytest.approx(getattr(ref, field), rel=1e-4, abs=1e-7), field


# ------------------------------------------------------------------------------ NTK


def test_paper_gram_by_hand():
    """paper, depth 1, m = 2, d = 1, c = 1; A = (1, −1)ᵀ, W_1 = I, B = (3, 5); x = 1, 2.

    h(x) = relu(A x) = (x, 0); pre = W_1 h = (x, 0): unit 1 on, unit 2 off.
    ∂out/∂W_1 = (B ⊙ 1[pre > 0])ᵀ hᵀ, so Θ(x, x') = <h, h'> · Σ_r B_r² 1_r 1'_r = x x' · 9:
    Θ = 9 [[1, 2], [2, 4]] = [[9, 18], [18, 36]] (c = 1: trace and all agree).
    """
    model = ReluMLP("paper", 1, 2, 1, 1).double()
    with torch.no_grad():
        model.input.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.hidden[0].weight.copy_(torch.eye(2))
        model.output.weight.copy_(torch.tensor([[3.0, 5.0]]))
    x = torch.tensor([[1.0], [2.0]], dtype=F64)
    expected = [[9.0, 18.0], [18.0, 36.0]]
    assert ntk_gram(model, None, x).tolist() == expected
    assert ntk_gram(model, None, x, outputs="all").tolist() == expected
    assert ntk_gram_autodiff(model, None, x).tolist() == expected


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("family", ["standard", "ntk", "paper"])
def test_grams_equal_jacrev(family, depth):
    """Θ_all = J Jᵀ (n c × n c) with J from jacrev; Θ_trace[i, i'] = Σ_j Θ_all[(i, j), (i', j)].

    Width 5, d = 3, c = 2, n = 4, at perturbed (non-initial) parameters passed in.
    The closed form and the autodiff Gram (default budget: one block; budget = 1
    byte: one row per block) equal the reference to float64 rounding.
    """
    model = _net(family, depth, seed=depth)
    torch.manual_seed(6)
    x = torch.randn(4, D, dtype=F64)
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in _params(model).items()}
    jac = _flat_jacobian(model, params, x)
    full = jac @ jac.T
    trace = full.reshape(4, C, 4, C).diagonal(dim1=1, dim2=3).sum(-1)
    for outputs, ref in (("trace", trace), ("all", full)):
        for theta in (
            ntk_gram_closed_form(model, params, x, outputs),
            ntk_gram_autodiff(model, params, x, outputs),
            ntk_gram_autodiff(model, params, x, outputs, budget=1),
        ):
            assert theta.dtype == F64
            torch.testing.assert_close(theta, ref, rtol=1e-9, atol=1e-12)


def test_ntk_gram_leaves_model_untouched_and_rejects_bad_outputs():
    """Passing params does not load them into the model; outputs must be trace or all."""
    model = _net("paper", 1)
    before = _params(model)
    x = torch.randn(3, D, dtype=F64)
    ntk_gram(model, {k: v + 1.0 for k, v in before.items()}, x)
    for k, v in _params(model).items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="outputs='diag'"):
        ntk_gram(model, None, x, outputs="diag")


def test_ntk_change_by_hand():
    """Θ0 = I_2 (||Θ0||_F = √2), Θ = diag(2, 1): ||Θ − Θ0||_F = 1, change = 1/√2.

    Θ0 = 0 with Θ = 0 gives 0; Θ0 = 0 with Θ ≠ 0 gives NaN; shapes must match.
    """
    assert ntk_change(np.diag([2.0, 1.0]), np.eye(2)) == pytest.approx(1 / math.sqrt(2))
    assert ntk_change(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0
    assert math.isnan(ntk_change(torch.eye(2), torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="shapes differ"):
        ntk_change(torch.eye(2), torch.eye(3))


def test_probe_indices_are_seeded_distinct_and_sorted():
    """64 of 150 indices: distinct, sorted, same for the same seed, different for another; capped at n."""
    a, b, other = probe_indices(150, 64, 0), probe_indices(150, 64, 0), probe_indices(150, 64, 1)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert len(set(a.tolist())) == 64 and a.tolist() == sorted(a.tolist()) and int(a.max()) < 150
    assert probe_indices(10, 64).tolist() == list(range(10))
    with pytest.raises(ValueError, match="num_examples=0"):
        probe_indices(0)
