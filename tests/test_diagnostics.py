"""Amax gain diagnostics (DESIGN.md §3) on hand-computed cases and on deep stacks."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.diagnostics import matrix_gains, mixing_gains, residual_gains
from nanoseek.model.residual import sinkhorn


def test_gains_of_a_2x2_matrix_by_hand():
    m = torch.tensor([[[1.0, -2.0], [0.5, 0.25]]])
    g = matrix_gains(m)
    # |row sums|: 3, 0.75 ; |column sums|: 1.5, 2.25
    assert (g.forward_max, g.forward_min, g.backward_max, g.backward_min) == (3.0, 0.75, 2.25, 1.5)


def test_gains_are_averaged_over_tokens():
    m = torch.stack([torch.eye(2), 2 * torch.eye(2)])  # two tokens
    assert matrix_gains(m).forward_max == pytest.approx(1.5)


def test_composite_is_the_product_bottom_to_top():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    g = mixing_gains([a, b])
    expected = matrix_gains(b @ a)  # b applied after a
    assert g.composite == expected
    assert g.composite != matrix_gains(a @ b)
    assert g.composite_by_depth[0] == matrix_gains(a)


def test_unconstrained_mixing_grows_with_depth_while_sinkhorn_mixing_stays_near_one():
    torch.manual_seed(0)
    depth, n = 32, 4
    raw = [torch.eye(n) + 0.2 * torch.randn(64, n, n) for _ in range(depth)]
    hc = mixing_gains(raw)
    by_depth = [hc.composite_by_depth[k - 1].forward_max for k in (4, 8, 16, 32)]
    assert by_depth == sorted(by_depth) and by_depth[-1] > 5 * by_depth[0] and by_depth[0] > 1.5
    mhc = mixing_gains([sinkhorn(torch.randn(64, n, n), 20) for _ in range(depth)])
    for g in (mhc.composite, *mhc.per_layer):
        assert abs(g.forward_max - 1) < 1e-5  # rows are exact
        assert abs(g.backward_max - 1) < 0.01
        assert g.forward_min > 0.99


def test_residual_gains_of_models():
    idx = torch.randint(0, 64, (2, 16))
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4)
    assert residual_gains(Transformer(ModelConfig(**base)), idx) is None
    hc = residual_gains(Transformer(ModelConfig(**base, residual="hc")), idx)
    assert len(hc.per_layer) == 6 and hc.composite.forward_max == pytest.approx(1.0, abs=0.05)
    model = Transformer(ModelConfig(**base, residual="mhc"))
    g = residual_gains(model, idx)
    assert len(g.per_layer) == 6
    assert abs(g.composite.forward_max - 1) < 1e-5 and abs(g.composite.backward_max - 1) < 1e-3
    assert all(not s._forward_pre_hooks for s in model.residual_sites())  # the capturing hooks are gone
