"""Tests for fedavg_relu.core.models: the three ReLU families, parameter I/O and the losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.models import (
    ReluMLP,
    ScaledLinear,
    build_model,
    compute_loss,
    get_trainable,
    num_trainable,
    set_trainable,
    trainable_names,
)

FAMILIES = ("standard", "ntk", "paper")

# Large-width statistics: the sample variance of N iid entries has relative std
# sqrt(2/N) for Gaussian entries (sqrt(0.8/N) for uniform ones, so the Gaussian
# figure is conservative), and the sample mean has std sigma/sqrt(N). Every check
# allows 6 of those standard deviations: a false alarm has probability ~1e-9,
# while a wrong init (e.g. variance 1/m instead of 2/m, a 50% error) fails by far.
D_BIG, M_BIG, C_BIG = 64, 1024, 10
SIGMAS = 6.0


def _model(family: str, d: int, m: int, depth: int, c: int, seed: int = 0) -> ReluMLP:
    return build_model(RunConfig(model_family=family, width=m, depth=depth, seed=seed), d, c)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _assert_moments(t: torch.Tensor, variance: float) -> None:
    """Sample mean ~ 0 and sample variance ~ ``variance`` within SIGMAS standard errors."""
    x = t.detach().double().flatten()
    n = x.numel()
    mean_tol = SIGMAS * math.sqrt(variance / n)
    var_rel_tol = SIGMAS * math.sqrt(2.0 / n)
    assert abs(float(x.mean())) < mean_tol, (float(x.mean()), mean_tol)
    rel_err = abs(float(x.var()) / variance - 1.0)
    assert rel_err < var_rel_tol, (float(x.var()), variance, rel_err, var_rel_tol)


# --- structure -----------------------------------------------------------------------
def test_standard_parameter_names_shapes_and_all_trainable():
    """standard, d=5 m=8 depth=2 c=3: input (8,5)+(8,), hidden.0 (8,8)+(8,), output (3,8)+(3,), all trained."""
    model = _model("standard", 5, 8, 2, 3)
    assert _shapes(model) == {
        "input.weight": (8, 5), "input.bias": (8,),
        "hidden.0.weight": (8, 8), "hidden.0.bias": (8,),
        "output.weight": (3, 8), "output.bias": (3,),
    }
    assert trainable_names(model) == list(_shapes(model))
    assert num_trainable(model) == 40 + 8 + 64 + 8 + 24 + 3  # = 147


def test_paper_parameter_names_shapes_and_frozen_a_b():
    """paper, d=5 m=8 depth=2 c=3: A (8,5) and B (3,8) frozen, W_1, W_2 (8,8) trained, no biases."""
    model = _model("paper", 5, 8, 2, 3)
    assert _shapes(model) == {
        "input.weight": (8, 5),
        "hidden.0.weight": (8, 8), "hidden.1.weight": (8, 8),
        "output.weight": (3, 8),
    }
    assert trainable_names(model) == ["hidden.0.weight", "hidden.1.weight"]
    assert not model.input.weight.requires_grad and not model.output.weight.requires_grad
    assert num_trainable(model) == 2 * 64
    assert all(getattr(mod, "bias", None) is None for mod in model.modules() if isinstance(mod, torch.nn.Linear))


def test_ntk_parameter_names_shapes_zero_biases():
    """ntk, d=5 m=8 depth=2 c=3: same names/shapes as standard, ScaledLinear layers, every bias exactly 0."""
    model = _model("ntk", 5, 8, 2, 3)
    assert _shapes(model) == _shapes(_model("standard", 5, 8, 2, 3))
    assert trainable_names(model) == list(_shapes(model))
    assert all(isinstance(layer, ScaledLinear) for layer in (model.input, model.hidden[0], model.output))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert torch.count_nonzero(p) == p.numel(), name  # weights are N(0,1) draws, not zeros


def test_unknown_family_is_rejected():
    """ReluMLP("resnet", ...) raises ValueError naming model-family."""
    with pytest.raises(ValueError, match=r"model-family='resnet'"):
        ReluMLP("resnet", 5, 8, 1, 3)


# --- initial statistics (m=1024, d=64, c=10) -------------------------------------------------
def test_paper_init_statistics():
    """paper: A and W_l entries N(0, 2/m) = N(0, 1/512); B entries N(0, 1/c) = N(0, 0.1).

    N = 65,536 (A), 1,048,576 (each W_l), 10,240 (B): variance tolerance 6*sqrt(2/N) = 3.3%, 0.83%, 8.4%.
    """
    model = _model("paper", D_BIG, M_BIG, 2, C_BIG)
    _assert_moments(model.input.weight, 2.0 / M_BIG)
    for layer in model.hidden:
        _assert_moments(layer.weight, 2.0 / M_BIG)
    _assert_moments(model.output.weight, 1.0 / C_BIG)


def test_ntk_init_statistics_and_scale():
    """ntk: every weight entry N(0, 1); scale = sqrt(2/fan_in) = sqrt(2/64) for input, sqrt(2/1024) after."""
    model = _model("ntk", D_BIG, M_BIG, 2, C_BIG)
    for layer, fan_in in ((model.input, D_BIG), (model.hidden[0], M_BIG), (model.output, M_BIG)):
        _assert_moments(layer.weight, 1.0)
        assert layer.scale == pytest.approx(math.sqrt(2.0 / fan_in), rel=1e-12)
        assert torch.count_nonzero(layer.bias) == 0
    assert model.input.scale == pytest.approx(0.17677669529663687)  # sqrt(1/32)
    assert model.hidden[0].scale == pytest.approx(0.044194173824159216)  # sqrt(1/512)


def test_ntk_layer_applies_scale():
    """ScaledLinear computes scale * x @ W.T + b: for x=ones(4), W=ones(2,4), b=(1,-1): sqrt(2/4)*4 + b."""
    layer = ScaledLinear(4, 2)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    out = layer(torch.ones(1, 4))
    expected = math.sqrt(0.5) * 4.0  # = 2.828427...
    torch.testing.assert_close(out, torch.tensor([[expected + 1.0, expected - 1.0]]))


def test_standard_init_statistics():
    """standard: nn.Linear default W ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in).

    (U(-a, a) has variance a^2/3, a = 1/sqrt(fan_in).) Biases share the bound.
    """
    model = _model("standard", D_BIG, M_BIG, 2, C_BIG)
    for layer, fan_in in ((model.input, D_BIG), (model.hidden[0], M_BIG), (model.output, M_BIG)):
        bound = 1.0 / math.sqrt(fan_in)
        weight, bias = layer.weight.detach(), layer.bias.detach()
        _assert_moments(weight, 1.0 / (3.0 * fan_in))
        assert float(weight.abs().max()) <= bound
        assert float(weight.abs().max()) > 0.99 * bound  # the support is really that wide
        assert float(bias.abs().max()) <= bound
        assert torch.count_nonzero(bias) == bias.numel()


# --- activation patterns -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_number_of_pattern_layers_equals_depth(family, depth):
    """forward_with_patterns returns `depth` boolean (n, m) masks in every family (paper omits A's layer)."""
    model = _model(family, 5, 8, depth, 3)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    out, patterns = model.forward_with_patterns(x)
    assert out.shape == (7, 3)
    assert len(patterns) == depth
    for mask in patterns:
        assert mask.shape == (7, 8) and mask.dtype == torch.bool
    torch.testing.assert_close(model(x), out)


def test_standard_patterns_on_hand_made_network():
    """standard d=2 m=3 depth=2 c=2 with hand-set weights; masks = (pre-activation > 0), strictly.

    W0=[[1,0],[0,1],[1,-1]], b0=[0,0,1.5]; x1=[1,2]: pre=[1,2,.5] -> TTT; x2=[-1,.5]: [-1,.5,0] -> FTF (0 is off).
    h1: [1,2,.5], [0,.5,0]. W1=[[1,-1,0],[0,1,1],[-1,0,2]], b1=[.5,-1,0]:
    x1: [1-2+.5, 2+.5-1, -1+1] = [-.5,1.5,0] -> FTF; x2: [-.5+.5, .5-1, 0] = [0,-.5,0] -> FFF.
    h2: [0,1.5,0], [0,0,0]; Wout=[[1,2,3],[0,1,0]], bout=[.25,0]: out = [[3.25,1.5],[.25,0]].
    """
    model = _model("standard", 2, 3, 2, 2)
    f32 = np.float32
    set_trainable(model, {
        "input.weight": np.array([[1, 0], [0, 1], [1, -1]], f32),
        "input.bias": np.array([0, 0, 1.5], f32),
        "hidden.0.weight": np.array([[1, -1, 0], [0, 1, 1], [-1, 0, 2]], f32),
        "hidden.0.bias": np.array([0.5, -1, 0], f32),
        "output.weight": np.array([[1, 2, 3], [0, 1, 0]], f32),
        "output.bias": np.array([0.25, 0], f32),
    })
    out, patterns = model.forward_with_patterns(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
    assert len(patterns) == 2
    assert patterns[0].tolist() == [[True, True, True], [False, True, False]]
    assert patterns[1].tolist() == [[False, True, False], [False, False, False]]
    assert out.tolist() == [[3.25, 1.5], [0.25, 0.0]]


def test_paper_patterns_exclude_frozen_input_layer():
    """paper d=2 m=2 depth=1 c=1: only W_1's mask is measured, not A's.

    A=[[1,0],[0,-1]], x=[1,2]: Ax=[1,-2] (A's mask TF), h1=[1,0]; W1=[[-1,0],[1,0]]: pre=[-1,1] -> FT;
    h2=[0,1]; B=[[2,3]]: out = 3.
    """
    model = _model("paper", 2, 2, 1, 1)
    with torch.no_grad():
        model.input.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        model.hidden[0].weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.output.weight.copy_(torch.tensor([[2.0, 3.0]]))
    out, patterns = model.forward_with_patterns(torch.tensor([[1.0, 2.0]]))
    assert len(patterns) == 1
    assert patterns[0].tolist() == [[False, True]]
    assert out.tolist() == [[3.0]]


def test_ntk_patterns_and_output_match_numpy_forward():
    """ntk d=4 m=6 depth=2 c=3: masks and output equal a numpy forward with scale sqrt(2/fan_in)."""
    model = _model("ntk", 4, 6, 2, 3, seed=3)
    with torch.no_grad():  # non-zero biases, so the scale matters for the signs
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("bias"):
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()) * (i + 1))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    w = {k: v.astype(np.float64) for k, v in get_trainable(model).items()}
    h, masks = x.numpy().astype(np.float64), []
    for layer, fan_in in (("input", 4), ("hidden.0", 6)):
        pre = math.sqrt(2.0 / fan_in) * h @ w[f"{layer}.weight"].T + w[f"{layer}.bias"]
        masks.append(pre > 0)
        h = np.maximum(pre, 0.0)
    expected_out = math.sqrt(2.0 / 6) * h @ w["output.weight"].T + w["output.bias"]
    out, patterns = model.forward_with_patterns(x)
    for got, want in zip(patterns, masks, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_allclose(out.detach().numpy(), expected_out, rtol=1e-5, atol=1e-6)


# --- determinism ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_is_deterministic_in_seed(family):
    """Same cfg.seed -> identical state dicts; a different seed -> different weights."""
    a, b, c = (_model(family, 5, 8, 2, 3, seed=s) for s in (7, 7, 8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["hidden.0.weight"], sc["hidden.0.weight"])


def test_build_model_leaves_global_rng_untouched():
    """torch's global RNG state is the same before and after build_model, so the next draw is unchanged."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    _model("paper", 5, 8, 2, 3, seed=99)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)


# --- parameter I/O ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_get_set_trainable_round_trip(family):
    """set_trainable(get_trainable(m) transformed) then get_trainable returns the transformed arrays."""
    model = _model(family, 5, 8, 2, 3)
    params = get_trainable(model)
    assert list(params) == trainable_names(model)
    new = {k: 2.0 * v + 1.0 for k, v in params.items()}
    set_trainable(model, new)
    got = get_trainable(model)
    for k in new:
        np.testing.assert_array_equal(got[k], new[k])
    got[k][...] = 0.0  # get_trainable returns copies, not views of the model
    assert float(np.abs(get_trainable(model)[k]).sum()) > 0


def test_get_trainable_excludes_frozen_parameters():
    """paper: get_trainable holds W_1 only; A and B are not exported."""
    assert list(get_trainable(_model("paper", 5, 8, 1, 3))) == ["hidden.0.weight"]


def test_set_trainable_rejects_wrong_names():
    """A missing name, an extra name, or a frozen layer's name raises ValueError."""
    model = _model("paper", 5, 8, 2, 3)
    params = get_trainable(model)
    missing = {"hidden.0.weight": params["hidden.0.weight"]}
    with pytest.raises(ValueError, match=r"parameter names \['hidden.0.weight'\] do not match"):
        set_trainable(model, missing)
    with pytest.raises(ValueError, match=r"do not match the model's"):
        set_trainable(model, {**params, "input.weight": np.zeros((8, 5), np.float32)})


def test_set_trainable_rejects_wrong_shape():
    """hidden.1.weight of shape (8, 7) instead of (8, 8) raises ValueError naming both shapes."""
    model = _model("paper", 5, 8, 2, 3)
    params = get_trainable(model)
    params["hidden.1.weight"] = np.zeros((8, 7), np.float32)
    with pytest.raises(ValueError, match=r"parameter hidden.1.weight: shape \(8, 7\) != model's \(8, 8\)"):
        set_trainable(model, params)


# --- losses ---------------------------------------------------------------------------
def test_squared_loss_hand_computed():
    """out=[[.5,.2],[.1,.3]], y=[0,1]: out-onehot=[[-.5,.2],[.1,-.7]]; row sums .29, .50; 0.5*mean = 0.1975."""
    out = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=torch.float64)
    value = compute_loss(out, torch.tensor([0, 1]), "squared")
    assert float(value) == pytest.approx(0.1975, abs=1e-12)


def test_cross_entropy_hand_computed_and_equals_torch():
    """Same example: log(1+e^{-.3}) = .5543552, log(1+e^{-.2}) = .5981389; mean 0.5762471 = F.cross_entropy."""
    out = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    value = compute_loss(out, y, "cross-entropy")
    assert float(value) == pytest.approx(0.5762470569250595, abs=1e-12)
    assert float(value) == pytest.approx(float(F.cross_entropy(out, y)), abs=1e-15)


def test_unknown_loss_is_rejected():
    """compute_loss(..., "hinge") raises ValueError naming loss."""
    with pytest.raises(ValueError, match=r"loss='hinge'"):
        compute_loss(torch.zeros(2, 2), torch.tensor([0, 1]), "hinge")
