"""Batched generation with the KV cache: cache equivalence, padding, stop conditions, sampling distributions."""

import copy

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.attention import KVCache
from nanoseek.model.generate import autocast_copy, generate, sample_next

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=48)
PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 8, 6, 2], [4]]  # different lengths: left padding


def letters(ids: list[int]) -> str:
    """A decode function with one character per token."""
    return "".join(chr(65 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.7, top_k=10), dict(temperature=1.3, top_p=0.9)])
def test_cached_and_uncached_sampling_give_the_same_tokens(model, kwargs):
    runs = [
        generate(model, PROMPTS, 20, generator=torch.Generator().manual_seed(1), use_cache=c, **kwargs)
        for c in (True, False)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, rtol=0, atol=1e-5)
    assert runs[0].tokens.shape == (3, 20) and runs[0].mask.all()
    # a different seed gives different samples
    other = generate(model, PROMPTS, 20, generator=torch.Generator().manual_seed(2), **kwargs)
    assert not torch.equal(other.tokens, runs[0].tokens)


@pytest.mark.parametrize(
    "extra", [{}, {"residual": "mhc", "ffn": "moe", "n_routed_experts": 4, "top_k": 2, "moe_dispatch": "loop"}]
)
def test_shared_prompt_prefill_gives_the_same_tokens_and_logprobs_in_float64(extra):
    """Groups of repeated prompts (as GRPO samples them), of different lengths and interleaved: prefilling each
    distinct prompt once and copying its cache rows decodes exactly what one prefill per row decodes."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CFG.__dict__, **extra})).double().eval()
    prompts = [PROMPTS[i] for i in (0, 1, 0, 2, 1, 0, 2, 2)]
    runs = [
        generate(
            model,
            prompts,
            20,
            generator=torch.Generator().manual_seed(1),
            share_prompts=share,
            stop=("QQ",),
            decode=letters,
        )  # fmt: skip
        for share in (True, False)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].mask, runs[1].mask)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, rtol=0, atol=1e-12)
    assert len({tuple(r) for r in runs[0].tokens.tolist()}) > 3  # copies of a prompt sampled different tokens


DECODE_SHAPES = {
    "plain-gqa-qknorm": dict(n_heads=4, n_kv_heads=2, qk_norm=True),
    "mhc-moe": dict(residual="mhc", ffn="moe", n_routed_experts=4, top_k=2, moe_dispatch="loop"),
    "hc": dict(residual="hc"),
}


@pytest.mark.parametrize("extra", DECODE_SHAPES.values(), ids=DECODE_SHAPES.keys())
@torch.no_grad()
def test_the_prefill_and_decode_steps_equal_the_cached_forward_in_float64(extra):
    """prefill_step (left-padded prompts into an empty cache, returning keys and values) and decode_step (one token
    over the cache's slots under a mask, returning the new key and value) are what torch.compile compiles; forward
    with a KVCache is the reference. From left-padded prompts and a rotary offset, then step by step, they give the
    same logits, keys and values to float64 rounding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CFG.__dict__, **extra})).double().eval()
    ids, pad = torch.zeros(3, 7, dtype=torch.long), torch.zeros(3, 7, dtype=torch.bool)
    for i, p in enumerate(PROMPTS):
        ids[i, 7 - len(p) :], pad[i, 7 - len(p) :] = torch.tensor(p), True
    reference, fixed = (KVCache(model.cfg, 3, CFG.seq_len, dtype=torch.float64) for _ in range(2))
    reference.offset = fixed.offset = 5  # as a server's cache after its slots moved
    want = model(ids, cache=reference, pad_mask=pad)[:, -1]
    got, k, v = model.prefill_step(ids, pad, torch.tensor(5))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(k, reference.k[:, :, :, :7], rtol=0, atol=1e-12)
    torch.testing.assert_close(v, reference.v[:, :, :, :7], rtol=0, atol=1e-12)
    fixed.k[:, :, :, :7], fixed.v[:, :, :, :7], fixed.valid[:, :7], fixed.pos = k, v, pad, 7
    tokens = torch.tensor([3, 1, 4])
    for _ in range(6):
        want = model(tokens[:, None], cache=reference)[:, -1]
        slot, position = torch.tensor(fixed.pos), torch.tensor(fixed.pos + fixed.offset)
        got, k, v = model.decode_step(tokens, fixed.k, fixed.v, fixed.valid, slot, position)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(k, reference.k[:, :, :, fixed.pos : fixed.pos + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(v, reference.v[:, :, :, fixed.pos : fixed.pos + 1], rtol=0, atol=1e-12)
        fixed.k[:, :, :, fixed.pos : fixed.pos + 1], fixed.v[:, :, :, fixed.pos : fixed.pos + 1] = k, v
        fixed.pos += 1
        tokens = want.argmax(-1)


AUTOCAST_SHAPES = {
    **DECODE_SHAPES,
    "hc-untied-bias-grouped-moe": dict(
        residual="hc", tie_embeddings=False, qkv_bias=True, ffn="moe", n_routed_experts=4, n_shared_experts=1, top_k=2
    ),
}


@pytest.mark.parametrize("extra", AUTOCAST_SHAPES.values(), ids=AUTOCAST_SHAPES.keys())
@torch.no_grad()
def test_a_copy_with_bf16_matmul_weights_computes_what_the_model_does_under_autocast(extra):
    """autocast_copy stores exactly the matmul-only weights in bf16 (attention and feed-forward projections, routed
    experts, an untied head); under bf16 autocast it gives the model's logits bit for bit, in a forward and along a
    sampled generation. Storing the router, the residual coefficients or the norms in bf16 too would not (checked
    below, so the comparison can fail)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CFG.__dict__, **extra})).eval()
    low = autocast_copy(model, torch.bfloat16)
    names = set(model.autocast_weight_names())
    assert {n for n, p in low.named_parameters() if p.dtype == torch.bfloat16} == names and names
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched
    ids = torch.randint(0, CFG.vocab_size, (3, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = low(ids)
        assert torch.equal(logits, model(ids))
        runs = [generate(m, PROMPTS, 12, generator=torch.Generator().manual_seed(1)) for m in (model, low)]
        everything = copy.deepcopy(model).to(torch.bfloat16)(ids)  # every parameter in bf16: other numbers
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert not torch.equal(everything.float(), logits.float())


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decoding_of_the_bf16_weight_copy_gives_the_models_tokens_under_autocast():
    """What GRPO does under bf16: the compiled prefill and decode steps over autocast_copy's weights give the same
    tokens and log-probabilities as over the float32 model's (whose graph casts the weights itself)."""
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    low = autocast_copy(model, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [
            generate(m, PROMPTS, 20, generator=torch.Generator().manual_seed(2), compile=True) for m in (model, low)
        ]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logprobs, runs[1].logprobs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [DECODE_SHAPES["plain-gqa-qknorm"], DECODE_SHAPES["mhc-moe"]], ids=["plain", "mhc-moe"]
)
def test_compiled_decoding_gives_the_same_tokens_as_eager(extra):
    """generate(compile=True) runs the torch.compile'd step: the same tokens (greedy and seeded sampling, left-padded
    prompts, rows ending early at a stop string) and log-probabilities as eager decoding (a float64 model)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CFG.__dict__, **extra})).double().eval()
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9)):
        runs = [
            generate(
                model,
                PROMPTS,
                30,
                generator=torch.Generator().manual_seed(3),
                stop=("QQ",),
                decode=letters,
                compile=c,
                **kwargs,
            )  # fmt: skip
            for c in (False, True)
        ]
        assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].mask, runs[1].mask)
        torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, rtol=0, atol=1e-6)  # (stored in float32)
        eager_prefill = generate(model, PROMPTS, 30, generator=torch.Generator().manual_seed(3), stop=("QQ",),
                                 decode=letters, compile=True, compile_prefill=False, **kwargs)  # fmt: skip
        assert torch.equal(eager_prefill.tokens, runs[0].tokens)  # a compiled decode after an eager prefill
        torch.testing.assert_close(eager_prefill.logprobs, runs[0].logprobs, rtol=0, atol=1e-6)
    # a second call, with other prompt lengths and batch size, reuses the compiled step and still agrees
    again = [generate(model, [[9, 8, 7, 6, 5, 4, 3, 2]], 12, temperature=0.0, compile=c) for c in (False, True)]
    assert torch.equal(again[0].tokens, again[1].tokens)


def test_greedy_follows_the_argmax_and_ignores_left_padding(model):
    batch = generate(model, PROMPTS, 12, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for t in range(12):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
            expected_lp = torch.log_softmax(logits, -1)[seq[-1]]
            assert abs(batch.logprobs[i, t].item() - expected_lp.item()) < 1e-5
        assert batch.tokens[i].tolist() == seq[len(prompt) :]


def test_logprobs_are_of_the_tempered_distribution(model):
    gen = generate(model, PROMPTS[:1], 6, temperature=0.5, generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([PROMPTS[0] + gen.tokens[0].tolist()])
    logits = model(seq)[0, len(PROMPTS[0]) - 1 : -1]  # (6, V) predicting the generated tokens
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, gen.tokens[0][:, None])[:, 0]
    torch.testing.assert_close(gen.logprobs[0], expected, rtol=0, atol=1e-5)


def test_stop_string_ends_a_row_with_the_token_that_completes_it(model):
    free = generate(model, PROMPTS, 16, temperature=0)
    text = letters(free.tokens[0].tolist())
    stop = text[4:7]
    end = text.index(stop) + len(stop)  # number of tokens kept in row 0
    out = generate(model, PROMPTS, 16, temperature=0, stop=[stop], decode=letters)
    assert out.mask[0].sum() == end and out.finished[0]
    assert letters(out.completions()[0]).endswith(stop)
    assert out.tokens[0, :end].tolist() == free.tokens[0, :end].tolist()
    assert (out.tokens[0, end:] == 0).all() and (out.logprobs[0, end:] == 0).all()
    # other rows continue unless they meet the stop string too
    for i in (1, 2):
        row = letters(free.tokens[i].tolist())
        assert out.finished[i] == (stop in row)


def test_end_of_text_token_ends_a_row_and_all_rows_ending_stops_early(model):
    free = generate(model, PROMPTS, 16, temperature=0)
    eos = int(free.tokens[1, 2])
    out = generate(model, PROMPTS, 16, temperature=0, eos_id=eos)
    first = free.tokens[1].tolist().index(eos)
    assert out.mask[1].sum() == first + 1 and out.finished[1] and out.tokens[1, first] == eos
    one = generate(model, PROMPTS[1:2], 16, temperature=0, eos_id=eos)
    assert one.tokens.shape == (1, first + 1)  # nothing left to generate: the loop stopped


def test_sampling_matches_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(40_000, 4)
    cases = [
        (dict(top_k=0, top_p=1.0), [0.5, 0.3, 0.15, 0.05]),
        (dict(top_k=3, top_p=1.0), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (dict(top_k=0, top_p=0.8), [0.625, 0.375, 0.0, 0.0]),  # 0.5 + 0.3 reaches 0.8: the rest is cut
        (dict(top_k=0, top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
    ]
    g = torch.Generator().manual_seed(0)
    for kwargs, expected in cases:
        tokens, logp = sample_next(logits, 1.0, generator=g, **kwargs)
        freq = torch.bincount(tokens, minlength=4).double() / tokens.numel()
        torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0.01)
        torch.testing.assert_close(logp.exp(), torch.tensor(expected)[tokens], rtol=1e-5, atol=1e-6)


def test_a_vanishing_temperature_or_top_p_samples_the_greedy_token():
    # the largest logit divided by 1e-40 overflows float32; a top_p of 1e-300 rounds to 0 in float32
    logits = torch.tensor([[1.0, 3.0, 2.0, -5.0], [0.5, -1.0, 0.25, 4.0]])
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1e-40, 1.0), (1e-38, 1.0), (1.0, 1e-300), (1e-40, 1e-300)):
        for _ in range(20):
            tokens, logp = sample_next(logits, temperature, top_k=0, top_p=top_p, generator=g)
            assert torch.equal(tokens, greedy), (temperature, top_p)
            assert torch.isfinite(logp).all() and (logp <= 0).all()
    tokens, logp = sample_next(logits, 1e-40, top_k=0, top_p=1.0, generator=g)
    assert torch.equal(logp, torch.zeros(2))  # all the mass on the largest logit


def test_top_k_one_is_greedy_with_log_probability_zero(model):
    sampled = generate(model, PROMPTS, 8, top_k=1, generator=torch.Generator().manual_seed(3))
    greedy = generate(model, PROMPTS, 8, temperature=0)
    assert torch.equal(sampled.tokens, greedy.tokens)
    assert (sampled.logprobs == 0).all()


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens=42 is invalid.*7 tokens.*seq_len=48"):
        generate(model, PROMPTS, 42)
    with pytest.raises(ValueError, match="stop strings need a decode function"):
        generate(model, PROMPTS, 4, stop=["</answer>"])
    with pytest.raises(ValueError, match="top_p=0 is invalid"):
        generate(model, PROMPTS, 4, top_p=0)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [[1], []], 4)
