"""Residual connections and Sinkhorn-Knopp against DESIGN.md §3, in float64 where exactness is claimed."""

import math

import pytest
import torch
from torch import nn

from nanoseek import ModelConfig, Transformer
from nanoseek.model import residual
from nanoseek.model.residual import (
    HyperConnection,
    ManifoldHyperConnection,
    PlainResidual,
    StreamCollapse,
    expand_streams,
    identity_like_logit,
    mix_streams,
    read_streams,
    rms_projection,
    sinkhorn,
    sinkhorn_unrolled,
)


def test_sinkhorn_is_nearly_doubly_stochastic_after_20_iterations():
    torch.manual_seed(0)
    m = sinkhorn(torch.randn(512, 4, 4, dtype=torch.float64), 20)
    assert (m >= 0).all()
    # rows are normalised last, so they are exact; columns converge (tolerance stated for logits of std 1)
    assert (m.sum(-1) - 1).abs().max() < 1e-12
    assert (m.sum(-2) - 1).abs().max() < 1e-3


def test_sinkhorn_is_invariant_to_a_constant_shift_and_handles_large_logits():
    logits = torch.randn(8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(logits + 500.0, 20), sinkhorn(logits, 20))
    huge = sinkhorn(logits * 1000, 20)  # exp underflows to exact zeros in whole columns: no 0/0
    assert torch.isfinite(huge).all() and (huge >= 0).all() and (huge.sum(-1) <= 1 + 1e-12).all()


def test_sinkhorn_gradcheck_float64():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,))


def test_sinkhorn_custom_backward_equals_unrolled_autograd():
    torch.manual_seed(1)
    logits = torch.randn(16, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 5, 5, dtype=torch.float64)
    (g_custom,) = torch.autograd.grad((sinkhorn(logits, 20) * weight).sum(), logits)
    (g_unrolled,) = torch.autograd.grad((sinkhorn_unrolled(logits, 20) * weight).sum(), logits)
    torch.testing.assert_close(g_custom, g_unrolled, rtol=1e-10, atol=1e-12)


def test_sinkhorn_rejects_zero_iterations():
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(torch.zeros(4, 4), 0)


def test_identity_like_init_gives_diagonal_095():
    n = 4
    m = sinkhorn(torch.eye(n, dtype=torch.float64) * identity_like_logit(n), 20)
    torch.testing.assert_close(torch.diagonal(m), torch.full((n,), 0.95, dtype=torch.float64))


def test_eye_init_diagonal_matches_design_note():
    # DESIGN.md §3: Sinkhorn(exp(I)) at n=4 has a diagonal of about 0.475
    m = sinkhorn(torch.eye(4, dtype=torch.float64), 20)
    assert abs(m[0, 0].item() - math.e / (math.e + 3)) < 1e-12
    assert abs(m[0, 0].item() - 0.475) < 0.001


def _shared_pair(residual: str, **kw) -> tuple[Transformer, Transformer]:
    """A plain model and a stream model with the same embedding, norms and block weights, in float64."""
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, seq_len=16)
    plain = Transformer(ModelConfig(**base)).double()
    other = Transformer(ModelConfig(**base, residual=residual, **kw)).double()
    missing, _ = other.load_state_dict(plain.state_dict(), strict=False), None
    assert not missing.unexpected_keys
    return plain, other


def test_hc_at_init_equals_plain_pre_norm_model():
    plain, hc = _shared_pair("hc", n_streams=4, stream_collapse="mean")
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(hc(idx), plain(idx), rtol=0, atol=1e-12)


def test_mhc_with_zero_gates_equals_plain_model_in_float64():
    plain, mhc = _shared_pair("mhc", n_streams=4, stream_collapse="mean", mhc_res_init="identity")
    for site in mhc.residual_sites():
        site.alpha.data.zero_()  # α = 0: static coefficients only; b_pre = logit(1/n), b_post = 0 by default
        assert torch.allclose(torch.sigmoid(site.b_pre), torch.full((4,), 0.25, dtype=torch.float64))
        assert torch.equal(site.b_post, torch.zeros(4, dtype=torch.float64))
    idx = torch.randint(0, 64, (2, 16))
    assert (mhc(idx) - plain(idx)).abs().max().item() < 1e-5


def test_default_mhc_starts_close_to_plain_but_not_identical():
    # with α = 0.01 the dynamic part is on: the model is near the residual but its streams can separate
    plain, mhc = _shared_pair("mhc")
    idx = torch.randint(0, 64, (2, 16))
    diff = (mhc(idx) - plain(idx)).abs().max().item()
    assert 0 < diff < 0.1


def test_learned_collapse_starts_as_the_mean():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    collapse = StreamCollapse("learned", 4, 8).double()
    torch.testing.assert_close(collapse(x), x.mean(dim=-2))
    assert torch.equal(StreamCollapse("sum", 4, 8)(x), x.sum(dim=-2))


def test_wrap_any_module_in_each_residual():
    block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = torch.randn(2, 5, 16)
    assert PlainResidual(block, 16)(x).shape == (2, 5, 16)
    streams = expand_streams(x, 4)
    for site in (HyperConnection(block, 16, n=4, layer_index=0), ManifoldHyperConnection(block, 16, n=4)):
        y = site(streams)
        assert y.shape == (2, 5, 4, 16)
        y.square().mean().backward()
        assert all(p.grad is not None for p in site.parameters())


def test_mhc_mixing_matches_equation_by_hand():
    """x_{l+1} = H_res x + H_postᵀ F(norm(H_pre x)) with F = identity, for one token, in float64."""
    torch.manual_seed(3)
    site = ManifoldHyperConnection(nn.Identity(), 3, n=2).double()
    site.norm.weight.data = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    h_pre, h_post, h_res = site.coefficients(x)
    v = x.flatten()
    h = (v / v.pow(2).mean().add(site.eps).sqrt()) @ site.phi
    a = site.alpha
    torch.testing.assert_close(h_pre, torch.sigmoid(a[0] * h[:2] + site.b_pre))
    torch.testing.assert_close(h_post, 2 * torch.sigmoid(a[1] * h[2:4] + site.b_post))
    torch.testing.assert_close(h_res, sinkhorn(a[2] * h[4:].view(2, 2) + site.b_res, 20))
    read = h_pre @ x
    normed = read / read.pow(2).mean().add(site.eps).sqrt() * site.norm.weight
    expected = h_res @ x + h_post[:, None] * normed[None, :]
    torch.testing.assert_close(site(x), expected)


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_coefficients_stay_float32_under_bf16_autocast(residual):
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, residual=residual))
    site = model.residual_sites()[0]
    site.record = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (2, 8)))
    assert all(c.dtype == torch.float32 for c in site.recorded)


def _stream_inputs(n: int = 3, c: int = 5, dtype=torch.float64):
    torch.manual_seed(4)
    return (
        torch.randn(2, 3, n, c, dtype=dtype),  # x
        torch.randn(2, 3, n, n, dtype=dtype),  # h_res
        torch.randn(2, 3, n, dtype=dtype),  # h_post (and h_pre)
        torch.randn(2, 3, c, dtype=dtype),  # y
    )


def test_fused_stream_functions_equal_the_straightforward_formulas():
    x, h_res, h, y = (t.requires_grad_() for t in _stream_inputs())
    phi = torch.randn(15, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fused = (
        read_streams(x, h, w, 1e-6),
        mix_streams(x, h_res, h, y),
        rms_projection(x.flatten(-2), phi, 1e-6),
    )
    v = x.flatten(-2)
    plain = (
        torch.nn.functional.rms_norm(torch.einsum("...n,...nc->...c", h, x), (5,), w, eps=1e-6),
        h_res @ x + h.unsqueeze(-1) * y.unsqueeze(-2),
        torch.nn.functional.rms_norm(v, (15,), eps=1e-6) @ phi,
    )
    inputs = (x, h_res, h, y, phi, w)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        w = torch.randn_like(a)
        grads_a = torch.autograd.grad((a * w).sum(), inputs, allow_unused=True)
        grads_b = torch.autograd.grad((b * w).sum(), inputs, allow_unused=True)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            assert (ga is None) == (gb is None)
            if ga is not None:
                torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_fused_stream_functions_gradcheck_float64():
    x, h_res, h, y = (t.requires_grad_() for t in _stream_inputs(n=2, c=3))
    phi = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: read_streams(*a, 1e-6), (x, h, w))
    assert torch.autograd.gradcheck(mix_streams, (x, h_res, h, y))
    assert torch.autograd.gradcheck(lambda v, p: rms_projection(v, p, 1e-6), (x.flatten(-2), phi))
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # HC's use: per stream, φ = Wᵀ (a view)
    assert torch.autograd.gradcheck(lambda v, w: rms_projection(v, w.t(), 1e-6), (x, weight))


def test_mixing_keeps_the_stream_dtype_and_computes_in_float32():
    """bf16 streams with fp32 coefficients: the result is bf16, rounded once from an fp32 computation."""
    x, h_res, h, y = (t.float() for t in _stream_inputs())
    xb, yb = x.bfloat16(), y.bfloat16()
    out = mix_streams(xb, h_res, h, yb)
    assert out.dtype == torch.bfloat16
    exact = h_res @ xb.float() + h.unsqueeze(-1) * yb.float().unsqueeze(-2)
    torch.testing.assert_close(out.float(), exact, rtol=2**-8, atol=0)  # within one bf16 rounding
    assert read_streams(xb, h, torch.ones(5), 1e-6).dtype == torch.float32


def test_sinkhorn_operator_registration_is_consistent_for_torch_compile():
    """The fake (shape-only) implementations and the autograd registration match the real kernels."""
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fast = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(residual._sinkhorn_op, (logits, 5), test_utils=fast)
    torch.library.opcheck(residual._sinkhorn_backward_op, (grad, logits.detach(), 5), test_utils=fast[:2])


def test_channel_dot_products_agree_in_the_eager_and_compiled_forms(monkeypatch):
    a, b = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    eager = residual._dot_over_channels(a, b)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(residual._dot_over_channels(a, b), eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eager, torch.einsum("...ic,...jc->...ij", a, b), rtol=1e-12, atol=1e-12)
