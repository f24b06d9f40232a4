"""The fused kernels (residual_kernels.py) against the readable equations (residual.py) and hand formulas, float64."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model import residual as readable
from nanoseek.model import residual_kernels as kernels
from nanoseek.model.residual import READABLE
from nanoseek.model.residual_kernels import mix_streams, read_streams, rms_projection, sinkhorn


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


def test_sinkhorn_custom_backward_equals_the_readable_version_through_autograd():
    torch.manual_seed(1)
    logits = torch.randn(16, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 5, 5, dtype=torch.float64)
    (g_custom,) = torch.autograd.grad((sinkhorn(logits, 20) * weight).sum(), logits)
    (g_unrolled,) = torch.autograd.grad((readable.sinkhorn(logits, 20) * weight).sum(), logits)
    torch.testing.assert_close(g_custom, g_unrolled, rtol=1e-10, atol=1e-12)


def test_sinkhorn_rejects_zero_iterations():
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(torch.zeros(4, 4), 0)


def _stream_inputs(n: int = 3, c: int = 5, dtype=torch.float64):
    torch.manual_seed(4)
    return (
        torch.randn(2, 3, n, c, dtype=dtype),  # x
        torch.randn(2, 3, n, n, dtype=dtype),  # h_res
        torch.randn(2, 3, n, dtype=dtype),  # h_post (and h_pre)
        torch.randn(2, 3, c, dtype=dtype),  # y
    )


def test_fused_stream_functions_equal_the_readable_ones_and_the_formulas():
    x, h_res, h, y = (t.requires_grad_() for t in _stream_inputs())
    phi = torch.randn(15, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fused = (
        read_streams(x, h, w, 1e-6),
        mix_streams(x, h_res, h, y),
        rms_projection(x.flatten(-2), phi, 1e-6),
    )
    plain = (
        readable.read_streams(x, h, w, 1e-6),
        readable.mix_streams(x, h_res, h, y),
        readable.rms_projection(x.flatten(-2), phi, 1e-6),
    )
    read = sum(h[..., j, None] * x[..., j, :] for j in range(3))  # H_pre · x: (2, 3, 5)
    by_hand = (  # the readable versions are the formulas
        read * w / read.square().mean(-1, keepdim=True).add(1e-6).sqrt(),
        torch.stack([sum(h_res[..., i, j, None] * x[..., j, :] for j in range(3)) for i in range(3)], -2)
        + h[..., None] * y[..., None, :],
        x.flatten(-2) / x.flatten(-2).square().mean(-1, keepdim=True).add(1e-6).sqrt() @ phi,
    )
    for a, b in zip(plain, by_hand, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
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
    torch.library.opcheck(kernels._sinkhorn_op, (logits, 5), test_utils=fast)
    torch.library.opcheck(kernels._sinkhorn_backward_op, (grad, logits.detach(), 5), test_utils=fast[:2])


def test_channel_dot_products_agree_in_the_eager_and_compiled_forms(monkeypatch):
    a, b = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    eager = kernels._dot_over_channels(a, b)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(kernels._dot_over_channels(a, b), eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eager, torch.einsum("...ic,...jc->...ij", a, b), rtol=1e-12, atol=1e-12)


MODELS = [
    dict(residual="hc"),
    dict(residual="mhc"),
    dict(
        residual="mhc", stream_collapse="learned", n_streams=3, mhc_res_init="uniform", ffn="moe", moe_dispatch="loop"
    ),
]


def _model_pair(kind: dict, **fused_kind) -> tuple[Transformer, Transformer]:
    """Two float64 copies of one model, the second running the readable equations at every site."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=16, **kind)
    fused_cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=16, **kind, **fused_kind)
    torch.manual_seed(0)
    fused = Transformer(fused_cfg).double()
    with torch.no_grad():  # move the coefficients away from their symmetric start, so every path carries gradient
        for site in fused.residual_sites():
            for p in site.no_decay_parameters():
                p.add_(0.3 * torch.randn_like(p))
    reference = Transformer(cfg).double()
    reference.load_state_dict(fused.state_dict())
    for site in reference.residual_sites():
        site.ops = READABLE
    return fused, reference


@pytest.mark.parametrize("form", ["eager", "compiled"])
@pytest.mark.parametrize("recompute", [0, 2, 3])
@pytest.mark.parametrize("kind", MODELS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_model_with_fused_kernels_equals_the_readable_equations(kind, recompute, form, monkeypatch):
    """Logits, loss and every parameter's gradient of a whole model, fused (with or without block recompute, blocks
    of 2 or 3 of the 4 sites) vs readable, in float64. The kernels sum over the streams with batched matmuls
    eagerly and with loops of multiply-adds under torch.compile (which fuses them): "compiled" runs the latter
    forms, here without compiling, so that both are held to the equations."""
    fused, reference = _model_pair(kind, stream_recompute=recompute)
    if form == "compiled":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    idx = torch.randint(0, 64, (2, 16))
    losses = []
    for model in (fused, reference):
        logits, loss = model(idx, idx)
        loss.backward()
        losses.append((logits, loss))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def _saved_stream_storages(model: Transformer, idx: torch.Tensor) -> int:
    """How many distinct storages the size of the n-stream state autograd saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stream_bytes = idx.numel() * model.cfg.n_streams * model.cfg.d_model * 8
    storages = set()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes() == stream_bytes:
            storages.add(s.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)[1].backward()
    return len(storages)


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_block_recompute_keeps_the_stream_state_once_per_block(residual):
    """6 sites: without recompute the state is kept at every site (the first one's contiguous copy included);
    with blocks of 3, only the second block's start is (the first block starts from the C-wide embedding)."""
    idx = torch.randint(0, 64, (2, 16))
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, seq_len=16, residual=residual)
    counts = [
        _saved_stream_storages(Transformer(ModelConfig(**base, stream_recompute=k)).double(), idx) for k in (0, 3)
    ]
    assert counts == [6, 1]


def test_eager_block_recompute_replays_each_mix_once_and_keeps_nothing_afterwards(monkeypatch):
    """8 sites in blocks of 4: each block replays its 3 inner mixes once (not once per function and site), and the
    memo of replayed states is empty once backward is done."""
    calls = []
    mix = kernels._mix
    monkeypatch.setattr(kernels, "_mix", lambda *a: calls.append(1) or mix(*a))
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, seq_len=16, residual="mhc", stream_recompute=4)
    idx = torch.randint(0, 64, (2, 16))
    _, loss = Transformer(cfg)(idx, idx)
    forward_mixes = len(calls)
    loss.backward()
    assert (forward_mixes, len(calls) - forward_mixes) == (8, 2 * 3)
    assert kernels._memo.states == []
