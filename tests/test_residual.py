"""Residual connections and Sinkhorn-Knopp against DESIGN.md §3, in float64 where exactness is claimed."""

import math

import pytest
import torch
from torch import nn

from nanoseek import ModelConfig, Transformer
from nanoseek.model.residual import (
    RESIDUALS,
    HyperConnection,
    ManifoldHyperConnection,
    PlainResidual,
    StreamCollapse,
    expand_streams,
    identity_like_logit,
    sinkhorn,
)


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
    site = model.residual_sites()[1]  # the FFN's
    x = torch.randn(2, 8, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coefficients = site.coefficients(x)
        mixed = site(x)
    assert all(c.dtype == torch.float32 for c in coefficients)
    assert mixed.dtype == torch.float32  # the streams stay fp32 under autocast
    torch.testing.assert_close(site.mixing_matrix(x), coefficients[2])


@pytest.mark.parametrize("kind", ["mhc", "moe"])
def test_a_float32_graph_has_no_autocast_switch_so_the_compile_cache_keeps_it(kind):
    """torch 2.13's AOTAutograd cache bypasses any graph that switches autocast; only bf16 models need the switch."""
    kw = dict(residual="mhc") if kind == "mhc" else dict(ffn="moe", n_routed_experts=4, top_k=2, n_shared_experts=1)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, seq_len=16, **kw))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def switches(autocast: bool) -> int:
        graphs.clear()
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.compile(model, backend=record)(torch.randint(0, 64, (2, 16)))
        enter = torch.amp.autocast_mode._enter_autocast
        return sum(node.target is enter for gm in graphs for node in gm.graph.nodes)

    assert switches(autocast=False) == 0
    assert switches(autocast=True) > 0  # the float32 regions of a bf16 model
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", sorted(RESIDUALS))
def test_each_kind_reports_its_parameters_flops_and_coefficients(kind):
    """What a residual class reports about itself agrees with the modules it builds."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, residual=kind, stream_collapse="learned")
    model = Transformer(cfg)
    cls = RESIDUALS[kind]
    sites = model.residual_sites()
    assert all(type(s) is cls for s in sites)
    own = [p for s in sites for p in s.parameters() if all(p is not q for q in s.fn.parameters())]
    assert cls.num_params(cfg) == sum(p.numel() for p in own) + sum(p.numel() for p in model.collapse.parameters())
    assert {id(p) for s in sites for p in s.no_decay_parameters()} == {id(p) for p in own}
    assert (cls.flops_per_token(cfg) == 0) == (kind == "plain")
    x = cls.expand(torch.randn(2, 5, 32), cfg)
    h_res = sites[0].mixing_matrix(x)
    if kind == "plain":
        assert h_res is None and x.shape == (2, 5, 32)
    else:
        assert h_res.shape == (2, 5, 4, 4) and x.shape == (2, 5, 4, 32)
        assert model.collapse(sites[1](x)).shape == (2, 5, 32)
