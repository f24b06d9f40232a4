"""The transformer LM: shapes, losses, KV cache, padding, analytic size and FLOPs, config validation."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoseek import KVCache, ModelConfig, Transformer

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=24)
KINDS = [
    dict(residual="plain"),
    dict(residual="hc"),
    dict(residual="mhc"),
    dict(residual="mhc", stream_collapse="learned", n_streams=2, ffn="relu2"),
    dict(residual="hc", n_streams=1, qk_norm=True, n_kv_heads=2, tie_embeddings=False),
    dict(residual="plain", head_size=6, qkv_bias=True, n_kv_heads=2),  # Qwen-style heads: 4 × 6 ≠ d_model
    dict(residual="mhc", stream_recompute=3),
]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_shapes_and_finite_loss(kind):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, **kind))
    idx = torch.randint(0, 64, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 64)
    logits, loss = model(idx, idx)
    assert torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 1.0  # near uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_kv_cache_logits_equal_full_sequence(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, **kind)
    model = Transformer(cfg).double().eval()
    idx = torch.randint(0, 64, (2, 20))
    full = model(idx)
    cache = KVCache(cfg, batch_size=2, max_len=24, dtype=torch.float64)
    steps = [model(idx[:, :7], cache=cache), model(idx[:, 7:12], cache=cache)]  # a prefill and a chunk
    steps += [model(idx[:, i : i + 1], cache=cache) for i in range(12, 20)]  # then one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.pos == 20


def test_left_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, residual="mhc")
    model = Transformer(cfg).double().eval()
    short, long = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 8))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0, :3] = False
    torch.testing.assert_close(model(batch, pad_mask=pad)[0, 3:], model(short)[0])
    torch.testing.assert_close(model(batch, pad_mask=pad)[1], model(long)[0])
    # and through the cache: prefill the padded prompts, then decode one token
    cache = KVCache(cfg, 2, 16, dtype=torch.float64)
    model(batch, cache=cache, pad_mask=pad)
    nxt = torch.randint(0, 64, (2, 1))
    step = model(nxt, cache=cache)
    torch.testing.assert_close(step[0, 0], model(torch.cat([short, nxt[:1]], 1))[0, -1])
    assert torch.isfinite(model(batch, pad_mask=pad)).all()


def test_kv_cache_overflow_is_a_clear_error():
    cfg = ModelConfig(**SMALL)
    model = Transformer(cfg)
    cache = KVCache(cfg, 1, 4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="seq_len=24"):
        Transformer(ModelConfig(**SMALL))(torch.zeros(1, 25, dtype=torch.long))


def test_ignored_targets_do_not_count():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL))
    idx = torch.randint(0, 64, (2, 10))
    targets = idx.clone()
    targets[:, :5] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 64), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_analytic_parameter_count_matches_tensors(kind):
    model = Transformer(ModelConfig(**SMALL, **kind))
    assert model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_analytic_flops_within_10_percent_of_flop_counter(kind):
    cfg = ModelConfig(**{**SMALL, "d_model": 64, "seq_len": 32}, **kind)
    model = Transformer(cfg)
    idx = torch.randint(0, 64, (2, 32))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the math kernel is made of matmuls the counter sees
        model(idx, idx)[1].backward()
    measured = counter.get_total_flops() / idx.numel()
    analytic = model.flops_per_token(seq_len=32)
    assert abs(analytic / measured - 1) < 0.10, (analytic, measured)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(n_streams=0), "n_streams"),
        (dict(residual="highway"), "residual"),
        (dict(ffn="gelu"), "ffn"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(sinkhorn_iters=0), "sinkhorn_iters"),
        (dict(stream_recompute=-1), "stream_recompute"),
        (dict(mhc_res_init="random"), "mhc_res_init"),
        (dict(stream_collapse="max"), "stream_collapse"),
        (dict(d_model=12, n_heads=4), "d_model"),  # head_dim 3 is odd: no rotary pairs
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(head_size=5), "head_size"),  # odd: no rotary pairs
        (dict(head_size=-8), "head_size"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        ModelConfig(**kwargs)
    assert "invalid" in str(err.value)


def test_qkv_bias_and_head_size_are_off_by_default_so_weight_names_do_not_change():
    names = set(Transformer(ModelConfig(**SMALL)).state_dict())
    assert not any(n.endswith(".bias") for n in names) and "blocks.0.attn.fn.kv.weight" in names
    model = Transformer(ModelConfig(**SMALL, head_size=6, qkv_bias=True))
    attn = model.blocks[0].attn.fn
    assert attn.q.weight.shape == (24, 32) and attn.proj.weight.shape == (32, 24) and attn.kv.bias.shape == (48,)
    assert not attn.q.bias.any() and not attn.kv.bias.any()  # biases start at zero


def test_rotary_embedding_rotates_each_pair_by_its_angle():
    """Pair (x_i, x_{i+D/2}) at position p turns by p · base^(-2i/D): hand values in float64, D = 4, base 100."""
    from nanoseek.model.attention import apply_rotary, rotary_tables

    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    for p in (0, 3):
        out = apply_rotary(x, rotary_tables(4, p, 1, 100.0, None)).flatten()
        for i, theta in enumerate((p * 1.0, p * 0.1)):  # frequencies 100^0 and 100^(-1/2)
            c, s = math.cos(theta), math.sin(theta)
            x1, x2 = x.flatten()[i].item(), x.flatten()[i + 2].item()
            assert out[i].item() == pytest.approx(x1 * c - x2 * s, abs=1e-6)
            assert out[i + 2].item() == pytest.approx(x2 * c + x1 * s, abs=1e-6)
