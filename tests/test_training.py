"""Tests for fedavg_relu.core.training: local SGD, full-data gradients, evaluation, client seeds."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.models import build_model, get_trainable, set_trainable, trainable_names
from fedavg_relu.core.training import (
    LocalSGDSettings,
    client_seed,
    evaluate,
    full_gradient,
    run_local_sgd,
)

D, M, C, N = 3, 4, 2, 6  # the tiny standard network and client of most tests


def _tiny(family: str = "standard", d: int = D, m: int = M, depth: int = 1, c: int = C, seed: int = 0):
    return build_model(RunConfig(model_family=family, width=m, depth=depth, seed=seed), d, c)


def _data(n: int = N, d: int = D, c: int = C, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.arange(n) % c  # every class present
    return x, y


def _squared(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0.5 * mean_i ||out_i - onehot(y_i)||^2, written out independently of compute_loss."""
    return 0.5 * ((out - F.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).sum(dim=1).mean()


def _trained(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _assert_params_close(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0.0, atol=atol, msg=name)


# --- run_local_sgd -------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [0, N, 10])
def test_full_batch_gd_matches_reference_loop(batch_size):
    """tau=4 steps of full-batch GD (batch 0, n or >n) equal W <- W - lr * dF/dW from autograd on a copy."""
    model = _tiny()
    x, y = _data()
    ref = copy.deepcopy(model)
    lr, tau = 0.3, 4
    ref_losses = []
    for _ in range(tau):
        loss = _squared(ref(x), y)
        grads = torch.autograd.grad(loss, _trained(ref))
        with torch.no_grad():
            for p, g in zip(_trained(ref), grads, strict=True):
                p -= lr * g
        ref_losses.append(float(loss.detach()))
    w0 = get_trainable(model)
    result = run_local_sgd(model, x, y, LocalSGDSettings(tau, lr, batch_size), torch.Generator().manual_seed(0))
    _assert_params_close(model, ref, atol=1e-6)
    moved = max(float(np.abs(get_trainable(model)[k] - w0[k]).max()) for k in w0)
    assert moved > 1e-3  # the comparison is not vacuous: the weights did change
    assert result.num_steps == tau and result.num_examples == N
    assert result.mean_batch_loss == pytest.approx(float(np.mean(ref_losses)), rel=1e-6)
    assert ref_losses[-1] < ref_losses[0]


def test_weight_decay_step_without_momentum():
    """One step with momentum=0, weight decay wd: W1 = W0 - lr * (grad + wd * W0) (lr=0.5, wd=0.1)."""
    model = _tiny()
    x, y = _data()
    lr, wd = 0.5, 0.1
    w0 = [p.detach().clone() for p in _trained(model)]
    ref = copy.deepcopy(model)
    grads = torch.autograd.grad(_squared(ref(x), y), _trained(ref))
    run_local_sgd(model, x, y, LocalSGDSettings(1, lr, 0, momentum=0.0, weight_decay=wd), torch.Generator())
    for p, p0, g in zip(_trained(model), w0, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - lr * (g + wd * p0), rtol=0.0, atol=1e-6)
        assert not torch.allclose(p.detach(), p0 - lr * g, rtol=0.0, atol=1e-6)  # decay made a difference


def test_momentum_two_steps_match_heavy_ball_reference():
    """momentum beta=0.9, 2 full-batch steps: v1=g1, W1=W0-lr v1; v2=beta v1+g2, W2=W1-lr v2."""
    model = _tiny()
    x, y = _data()
    lr, beta = 0.2, 0.9
    ref = copy.deepcopy(model)
    velocity = None
    for _ in range(2):
        grads = torch.autograd.grad(_squared(ref(x), y), _trained(ref))
        velocity = list(grads) if velocity is None else [beta * v + g for v, g in zip(velocity, grads, strict=True)]
        with torch.no_grad():
            for p, v in zip(_trained(ref), velocity, strict=True):
                p -= lr * v
    run_local_sgd(model, x, y, LocalSGDSettings(2, lr, 0, momentum=beta), torch.Generator())
    _assert_params_close(model, ref, atol=1e-6)


def test_paper_family_trains_only_hidden_layers():
    """paper: after local GD the frozen A and B are bit-identical and W_1 has moved."""
    model = _tiny("paper", d=D, m=8, depth=1, c=C)
    x, y = _data()
    a0, b0, w0 = (t.detach().clone() for t in (model.input.weight, model.output.weight, model.hidden[0].weight))
    run_local_sgd(model, x, y, LocalSGDSettings(3, 1.0, 0), torch.Generator())
    assert torch.equal(model.input.weight, a0) and torch.equal(model.output.weight, b0)
    assert float((model.hidden[0].weight.detach() - w0).abs().max()) > 1e-4


def test_same_generator_seed_gives_identical_parameters():
    """Minibatch SGD (batch 2, tau 5, crossing an epoch): seed 11 twice -> bit-identical; seed 12 -> different."""
    x, y = _data()
    settings = LocalSGDSettings(5, 0.3, 2)
    models = [_tiny() for _ in range(3)]
    for model, seed in zip(models, (11, 11, 12), strict=True):
        run_local_sgd(model, x, y, settings, torch.Generator().manual_seed(seed))
    p11, p11b, p12 = (get_trainable(m) for m in models)
    assert all(np.array_equal(p11[k], p11b[k]) for k in p11)
    assert any(not np.allclose(p11[k], p12[k], rtol=0.0, atol=1e-7) for k in p11)


class _RowRecorder(nn.Module):
    """Wraps a model and records which rows of ``x`` every forward pass saw."""

    def __init__(self, inner: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.x, self.batches = inner, x, []

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        rows = [int((self.x == row).all(dim=1).nonzero().item()) for row in xb]
        self.batches.append(rows)
        return self.inner(xb)


def test_minibatches_without_replacement_follow_documented_permutation():
    """n=6, batch 2, 6 steps: steps 1-3 are randperm#1 in chunks of 2, steps 4-6 randperm#2; each epoch uses every row once."""
    x, y = _data()
    recorder = _RowRecorder(_tiny(), x)
    run_local_sgd(recorder, x, y, LocalSGDSettings(6, 0.1, 2), torch.Generator().manual_seed(5))
    batches = recorder.batches
    assert [len(b) for b in batches] == [2] * 6
    for epoch in (batches[:3], batches[3:]):
        assert sorted(itertools.chain.from_iterable(epoch)) == list(range(N))
    ref_gen = torch.Generator().manual_seed(5)
    perm1, perm2 = torch.randperm(N, generator=ref_gen).tolist(), torch.randperm(N, generator=ref_gen).tolist()
    assert batches == [perm1[0:2], perm1[2:4], perm1[4:6], perm2[0:2], perm2[2:4], perm2[4:6]]


def test_minibatch_sgd_matches_reference_loop_on_same_permutation():
    """3 steps of batch-2 SGD equal a manual loop over torch.randperm(6, generator=seed 5) in chunks of 2."""
    model = _tiny()
    x, y = _data()
    lr = 0.4
    ref = copy.deepcopy(model)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    for step in range(3):
        idx = order[2 * step : 2 * step + 2]
        grads = torch.autograd.grad(_squared(ref(x[idx]), y[idx]), _trained(ref))
        with torch.no_grad():
            for p, g in zip(_trained(ref), grads, strict=True):
                p -= lr * g
    run_local_sgd(model, x, y, LocalSGDSettings(3, lr, 2), torch.Generator().manual_seed(5))
    _assert_params_close(model, ref, atol=1e-6)


def test_empty_client_is_rejected():
    """A client with n=0 examples raises ValueError."""
    with pytest.raises(ValueError, match="no training examples"):
        run_local_sgd(_tiny(), torch.zeros(0, D), torch.zeros(0, dtype=torch.int64),
                      LocalSGDSettings(1, 0.1, 0), torch.Generator())


# --- full_gradient -------------------------------------------------------------------
@pytest.mark.parametrize(("family", "loss"), [("paper", "squared"), ("standard", "cross-entropy"), ("ntk", "squared")])
def test_full_gradient_matches_independent_autograd(family, loss):
    """Loss and gradient w.r.t. the trained parameters equal autograd on a deep copy; patterns equal the forward's."""
    model = _tiny(family, d=5, m=16, depth=2, c=3, seed=4)
    x, y = _data(n=10, d=5, c=3, seed=1)
    before = get_trainable(model)
    got = full_gradient(model, x, y, loss)

    ref = copy.deepcopy(model)
    out = ref(x)
    value = _squared(out, y) if loss == "squared" else -F.log_softmax(out, dim=1)[torch.arange(10), y].mean()
    grads = torch.autograd.grad(value, _trained(ref))
    assert got.loss == pytest.approx(float(value.detach()), rel=1e-6)
    assert list(got.grads) == trainable_names(model)
    for (name, g_got), g_ref in zip(got.grads.items(), grads, strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7, msg=name)
        assert float(g_ref.abs().max()) > 0, name

    _, patterns = model.forward_with_patterns(x)
    assert len(got.patterns) == len(patterns) == 2
    for a, b in zip(got.patterns, patterns, strict=True):
        assert torch.equal(a, b)
    after = get_trainable(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # measuring does not move the model


# --- evaluate ------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [4096, 3, 1])
def test_evaluate_hand_made_case(batch_size):
    """Identity net (out = relu(x)), x=[[1,0],[0,2],[3,1],[.5,1]], y=[0,1,1,0].

    argmax = [0,1,0,1] -> accuracy 2/4 = 0.5; squared losses 0.5*||x_i - e_{y_i}||^2 =
    [0, .5*1, .5*9, .5*(.25+1)] = [0, .5, 4.5, .625], mean 5.625/4 = 1.40625 (any batch split).
    """
    model = _tiny("standard", d=2, m=2, depth=1, c=2)
    eye, zero = np.eye(2, dtype=np.float32), np.zeros(2, np.float32)
    set_trainable(model, {"input.weight": eye, "input.bias": zero, "output.weight": eye, "output.bias": zero})
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [0.5, 1.0]])
    y = torch.tensor([0, 1, 1, 0])
    loss, accuracy = evaluate(model, x, y, "squared", batch_size=batch_size)
    assert loss == pytest.approx(1.40625, abs=1e-6)
    assert accuracy == 0.5


# --- client_seed ---------------------------------------------------------------------
def test_client_seed_is_deterministic_and_distinct():
    """client_seed over seeds 0..2 x partitions 0..3 x rounds 1..3: 36 distinct values in [0, 2**63), stable on repeat."""
    grid = list(itertools.product(range(3), range(4), range(1, 4)))
    seeds = [client_seed(*t) for t in grid]
    assert len(set(seeds)) == len(grid)
    assert seeds == [client_seed(*t) for t in grid]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    assert client_seed(0, 1, 2) != client_seed(1, 0, 2) != client_seed(2, 1, 0)  # argument order matters
    torch.Generator().manual_seed(max(seeds))  # usable as a torch seed
