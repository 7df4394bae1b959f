"""The cohort kernel's fused layer (bias and scale inside the product) gives the unfused layer's numbers.

``fedavg_relu.core.stacked._affine`` forms ``scale * h @ W^T + b`` as one ``addmm`` /
``baddbmm``; here it is checked against the same formula written out with plain
tensor operations in float64, for every layout the cohort meets: shared or
stacked weights, no, shared or stacked bias, scale 1 or not. The full training
is checked against the per-client reference in ``tests/test_cohort.py`` (rtol 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from fedavg_relu.core.stacked import _affine


@pytest.mark.parametrize("stacked_w", [False, True])
@pytest.mark.parametrize("bias", [None, "shared", "stacked"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_fused_affine_equals_the_formula(stacked_w, bias, scale):
    """k = 3 clients, n = 4 rows, 5 -> 6: out[i] = scale * h[i] @ W_i^T + b_i, to rtol 1e-5."""
    g = torch.Generator().manual_seed(0)
    k, n, d, m = 3, 4, 5, 6
    h = torch.randn(k, n, d, generator=g)
    w = torch.randn(k, m, d, generator=g) if stacked_w else torch.randn(m, d, generator=g)
    b = {None: None, "shared": torch.randn(m, generator=g), "stacked": torch.randn(k, m, generator=g)}[bias]
    out = _affine(h, w, b, scale)
    for i in range(k):
        wi = (w[i] if stacked_w else w).double()
        want = scale * h[i].double() @ wi.T
        if b is not None:
            want = want + (b[i] if b.dim() == 2 else b).double()
        torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-6)
    assert out.shape == (k, n, m)


def test_fused_affine_uses_the_bias():
    """A bias of 1 adds exactly 1 to every entry of a zero product (h = 0)."""
    out = _affine(torch.zeros(2, 3, 4), torch.randn(5, 4), torch.ones(5), 0.5)
    assert torch.equal(out, torch.ones(2, 3, 5))
