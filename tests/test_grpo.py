"""GRPO against DESIGN.md §5: advantages, each loss_type by hand, k3 KL, clipping, dynamic sampling, resume."""

import copy
import math
import threading

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.tasks import make_task
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.rl.grpo import GRPO, GRPOConfig, group_advantages, grpo_loss, k3_kl, zero_variance_groups
from nanoseek.rl.rollout import Rollout, token_logprobs
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine

TINY = ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64)
LN2 = math.log(2)


def ascii_share(prompts, completions, **_):
    """A trivially learnable reward: the share of ASCII characters (about 1/2 for a random byte model)."""
    return [sum(ch < "\x80" for ch in c) / max(len(c), 1) for c in completions]


def first_char_parity_unless_even_target(prompts, completions, target, **_):
    """Constant reward for problems with an even target (zero-variance groups), varying otherwise."""
    return [1.0 if t % 2 == 0 else float(ord(c[0]) % 2 if c else 0) for c, t in zip(completions, target, strict=True)]


def trainer(seed=0, rewards=None, lr=1e-2, batch_size=4, grad_accum=1, optimizer="adamw", task=None, dtype=None,
            train_dtype="float32", **cfg):  # fmt: skip
    """A GRPO stage on the engine: batch_size × grad_accum prompts per step, 8-token completions."""
    torch.manual_seed(seed)
    train = TrainConfig(lr=lr, weight_decay=0.0, seed=seed, batch_size=batch_size, grad_accum=grad_accum,
                        optimizer=optimizer, warmup_steps=0, schedule="constant", dtype=train_dtype)  # fmt: skip
    model = Transformer(TINY) if dtype is None else Transformer(TINY).to(dtype)
    engine = Engine(model, train, log=lambda message: None)
    if task is None:
        task = make_task("arithmetic", digits=1)
        task.max_new_tokens = 8
    return GRPO(engine, ByteTokenizer(), task, GRPOConfig(**cfg), rewards or {"ascii": (ascii_share, 1.0)})


# ---------------------------------------------------------------------------------------------------------------------
# Advantages and KL


def test_group_advantages_on_known_groups():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [1.0, 2.0, 6.0], [0.7, 0.7, 0.7]], dtype=torch.float64)
    adv = group_advantages(rewards, eps=1e-4)
    # group 1: mean 1/3, std sqrt(2)/3 (divisor G); group 2: mean 3, std sqrt(14/3); group 3: all equal
    std1, std2 = 2**0.5 / 3, (14 / 3) ** 0.5
    torch.testing.assert_close(adv[0], torch.tensor([-1 / 3, 2 / 3, -1 / 3], dtype=torch.float64) / (std1 + 1e-4))
    torch.testing.assert_close(adv[1], torch.tensor([-2.0, -1.0, 3.0], dtype=torch.float64) / (std2 + 1e-4))
    assert adv[2].tolist() == [0.0] * 3  # exactly, although the float mean of three 0.7 is 0.7 + 1.1e-16
    dr = group_advantages(rewards, scale=False)
    torch.testing.assert_close(dr[1], torch.tensor([-2.0, -1.0, 3.0], dtype=torch.float64))
    assert dr[2].tolist() == [0.0] * 3
    assert torch.isfinite(group_advantages(torch.zeros(2, 8))).all()
    assert zero_variance_groups(rewards).tolist() == [False, False, True]


def test_k3_kl_is_nonnegative_zero_for_equal_policies_and_unbiased():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(5, 50, dtype=torch.float64), torch.randn(5, 50, dtype=torch.float64)
    logp, ref = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all() and k3_kl(logp, logp).abs().max() == 0
    # E_{x ~ π_θ}[k3(x)] = KL(π_θ || π_ref) exactly, so the per-token estimate is unbiased
    exact = (logp.exp() * (logp - ref)).sum(-1)
    torch.testing.assert_close((logp.exp() * kl).sum(-1), exact)


# ---------------------------------------------------------------------------------------------------------------------
# The loss on a hand-built batch: two completions of 3 and 2 tokens (the third token of the second is padding).
# Ratios ρ = [[1, 1.5, 0.5], [1.1, 0.7, ·]]; advantages [+1, -2]; log(π_ref/π_θ) = [[0, ln2, -ln2], [-ln2, 0, ·]],
# so k3 KL = [[0, 1 - ln2, ln2 - 0.5], [ln2 - 0.5, 0, ·]] (sums: 0.5 and ln2 - 0.5).
# With ε = 0.2: completion 1 surrogates min(ρA, clip(ρ)A) = [1, 1.2 (clipped), 0.5] (sum 2.7);
#               completion 2 = [-2.2, -1.6 (clipped: 0.8 · -2 < 0.7 · -2)] (sum -3.8).

RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
REF_SHIFT = torch.tensor([[0.0, LN2, -LN2], [-LN2, 0.0, 0.0]], dtype=torch.float64)
KL2 = LN2 - 0.5  # KL sum of completion 2; completion 1 sums to 0.5
CASES = [
    # loss_type, eps_low, eps_high, beta, expected loss (-J), hand-derived
    ("grpo", 0.2, 0.2, 0.0, -(2.7 / 3 + -3.8 / 2) / 2),
    ("grpo", 0.2, 0.2, 0.1, -((2.7 - 0.1 * 0.5) / 3 + (-3.8 - 0.1 * KL2) / 2) / 2),
    ("dr_grpo", 0.2, 0.2, 0.1, -((2.7 - 0.1 * 0.5) + (-3.8 - 0.1 * KL2)) / (2 * 3)),  # / (N · max_tokens)
    ("dapo", 0.2, 0.28, 0.1, -((1 + 1.28 + 0.5 - 0.1 * 0.5) + (-3.8 - 0.1 * KL2)) / 5),  # clip-higher: 1.28
    # sequence ratios s = (1 · 1.5 · 0.5)^(1/3) ≈ 0.909 (inside [0.9, 1.1]) and (1.1 · 0.7)^(1/2) ≈ 0.877 (clipped)
    ("gspo", 0.1, 0.1, 0.1, -((0.75 ** (1 / 3) - 0.1 * 0.5 / 3) + (0.9 * -2 - 0.1 * KL2 / 2)) / 2),
]


@pytest.mark.parametrize("loss_type, eps_low, eps_high, beta, expected", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_loss_of_each_type_on_a_hand_built_batch(loss_type, eps_low, eps_high, beta, expected):
    old = torch.full((2, 3), -1.3, dtype=torch.float64)
    logp = old + RATIOS.log()
    loss, stats = grpo_loss(
        logp,
        old,
        ADV,
        MASK,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        beta=beta,
        ref_logp=logp + REF_SHIFT,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # clipped: completion 1 token 2 and completion 2 token 2 (per token); all of completion 2 (gspo): 2 of 5 tokens
    assert stats["clip_fraction"].item() == pytest.approx(0.4)
    assert stats["kl"].item() == pytest.approx((0.5 + KL2) / 5 if beta else 0.0)


def test_gradient_flows_only_where_the_ratio_stays_in_the_band_or_the_clip_does_not_bind():
    logp = RATIOS.log().clone().requires_grad_(True)
    grpo_loss(logp, torch.zeros(2, 3, dtype=torch.float64), ADV, MASK, loss_type="grpo")[0].backward()
    # d(-J)/d log π = -ρ·A / (|o_i| · N) where the unclipped term is the minimum, 0 where the clip binds or padding
    expected = torch.tensor([[-1 / 6, 0.0, -0.5 / 6], [1.1 * 2 / 4, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_loss_rejects_bad_loss_type_and_kl_without_reference():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="loss_type='ppo' is invalid"):
        grpo_loss(z, z, torch.zeros(1), z.bool(), loss_type="ppo")
    with pytest.raises(ValueError, match="beta=0.1 is invalid without ref_logp"):
        grpo_loss(z, z, torch.zeros(1), z.bool(), beta=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities, sampling, updates


def test_chunked_log_probs_of_the_right_padded_batch_equal_each_row_alone_with_gradients():
    torch.manual_seed(0)
    model = Transformer(TINY).double()
    prompts, completions = [5, 8, 3], [6, 4, 7]  # lengths: rows of 11, 12 and 10 tokens, right-padded to 12
    ids = torch.randint(0, 256, (3, 12))
    starts = torch.tensor(prompts)
    expected, entropies = [], []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        logp = torch.log_softmax(model(ids[i : i + 1, : p + c])[0, p - 1 : -1] / 0.7, -1)  # (c, V)
        expected.append(logp.gather(-1, ids[i, p : p + c, None])[:, 0])
        entropies.append(-(logp.exp() * logp).sum(-1))
    grads = torch.autograd.grad(sum(e.sum() for e in expected), list(model.parameters()))
    for chunk in (1, 5, 64):
        logp, entropy = token_logprobs(model, ids, starts, 7, temperature=0.7, chunk_size=chunk)
        assert logp.shape == (3, 7)
        for i, c in enumerate(completions):
            torch.testing.assert_close(logp[i, :c], expected[i])
            torch.testing.assert_close(entropy[i, :c], entropies[i])
        mask = torch.arange(7) < torch.tensor(completions)[:, None]
        got = torch.autograd.grad((logp * mask).sum(), list(model.parameters()))
        for g, h in zip(got, grads, strict=True):
            torch.testing.assert_close(g, h)


@pytest.mark.slow
def test_compiled_log_probs_equal_eager_and_compile_once_for_every_batch_size():
    """train.compile: the policy's forward over right-padded rows (masked attention, no branch on the data) gives
    the eager log-probabilities and gradients, and batches of other sizes and lengths reuse the first compile."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Transformer(TINY).double()
    compiled = torch.compile(model)
    graphs = []
    for n, width in ((8, 20), (6, 17), (5, 22)):  # the rows trained on and their length change every step
        ids = torch.randint(1, 256, (n, width))
        starts, lengths = torch.randint(3, 8, (n,)), torch.randint(10, width + 1, (n,))
        mask = torch.arange(width - 3) < (lengths - starts)[:, None]
        results = []
        for m in (model, compiled):
            logp, entropy = token_logprobs(m, ids, starts, width - 3, lengths=lengths)
            grads = torch.autograd.grad((logp * mask).sum(), list(model.parameters()))
            results.append((logp[mask], entropy[mask], grads))
        (want, want_entropy, want_grads), (got, got_entropy, got_grads) = results
        # float64 model, but the rotary tables are float32 in both (compiled sin / cos differ in the last bit)
        tol = dict(rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(got_entropy, want_entropy, **tol)
        for g, h in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, h, **tol)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs


def test_dynamic_sampling_drops_exactly_the_zero_variance_groups():
    t = trainer(
        rewards={"r": (first_char_parity_unless_even_target, 1.0)},
        dynamic_sampling=True,
        max_refill_rounds=5,
    )
    sampled, kept = t.collect()
    informative = [
        (r.prompts[g * 8], r.group_rewards()[g].tolist())
        for r in sampled
        for g in range(r.n_groups)
        if len(set(r.group_rewards()[g].tolist())) > 1
    ]
    got = [(r.prompts[g * 8], r.group_rewards()[g].tolist()) for r in kept for g in range(r.n_groups)]
    assert got == informative[:4]
    assert all(target % 2 == 1 for r in kept for target in r.fields["target"])
    # refilling stops with the round that fills the batch
    per_round = [int((~zero_variance_groups(r.group_rewards())).sum()) for r in sampled]
    assert sum(per_round[:-1]) < 4 <= sum(per_round)
    metrics = t.step()
    assert metrics["groups_kept"] == 4 and 0 < metrics["zero_variance_frac"] < 1


def test_without_dynamic_sampling_zero_variance_groups_are_kept_with_zero_advantage():
    t = trainer(rewards={"r": (lambda prompts, completions, **_: [1.0] * len(completions), 1.0)})
    before = [p.detach().clone() for p in t.model.parameters()]
    metrics = t.step()
    assert metrics["zero_variance_frac"] == 1.0 and metrics["groups_kept"] == 4
    assert metrics["train_loss"] == 0.0 and metrics["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_micro_batches_give_the_same_gradient_as_the_whole_batch(loss_type):
    """4 prompts as one micro-batch, or as train.grad_accum=4 micro-batches of one group: the same rollout (same
    problems, same sampling stream) and, since every micro-batch loss uses the whole batch's normalisers, the same
    gradient (compared just before the optimizer step) and the same metrics."""
    runs = []
    for batch_size, grad_accum in ((4, 1), (1, 4)):
        t = trainer(batch_size=batch_size, grad_accum=grad_accum, loss_type=loss_type, beta=0.05)
        grads = []

        def keep(opt, args, kwargs, t=t, grads=grads):
            grads.append([p.grad.clone() for p in t.model.parameters()])

        t.engine.optimizers[0].register_step_pre_hook(keep)
        metrics = t.step()
        runs.append((grads[0], metrics))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    for key in ("train_loss", "kl", "entropy", "clip_fraction", "grad_norm", "reward_mean"):
        assert runs[0][1][key] == pytest.approx(runs[1][1][key], rel=1e-4, abs=1e-7)


def test_mu_updates_are_against_a_fixed_old_policy():
    one = trainer(mu=1, lr=5e-2).step()
    three = trainer(mu=3, lr=5e-2).step()
    assert one["clip_fraction"] == 0.0  # the only update is at ratio 1
    assert three["clip_fraction"] > 0.0  # later updates see ratios to the *old* policy move and get clipped


def test_reference_exists_only_with_beta_and_is_reset_every_n_steps():
    assert trainer(beta=0.0).reference is None and "kl" not in trainer(beta=0.0).step()
    t = trainer(beta=0.1, ref_reset_every=2)
    m1 = t.step()
    assert m1["kl"] == 0.0  # the first batch is scored before any update: policy = reference
    assert t.step()["kl"] > 0.0
    for a, b in zip(t.reference.parameters(), t.model.parameters(), strict=True):
        assert torch.equal(a, b) and not a.requires_grad  # reset after step 2
    assert t.step()["kl"] == 0.0


@pytest.mark.parametrize("overlap", [False, True], ids=["on-policy", "overlap"])
def test_exact_resume_from_state_dicts(overlap):
    """With overlap the state is saved while the next batch is being sampled: the resumed stage samples it again
    with the saved sampling weights."""
    cfg = dict(beta=0.1, dynamic_sampling=True, mu=2, loss_type="dapo", overlap=overlap)
    a = trainer(**cfg)
    for _ in range(2):
        a.step()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    weights, optimizers = a.engine.state()
    saved = (copy.deepcopy(weights), copy.deepcopy(optimizers), state)
    expected = a.step()
    b = trainer(**cfg)
    b.generator.manual_seed(123)  # a fresh stage whose weights, optimizer and RNG must all come from the state
    b.engine.load_state(saved[0], saved[1])
    b.load_state_dict(saved[2])
    got = b.step()
    timing = ("gen_tokens_per_s", "train_tokens_per_s")
    assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in expected.items() if k not in timing}
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_overlap_trains_each_batch_one_update_late_against_the_weights_that_sampled_it():
    """overlap: step 0 is on-policy (the same batch and update as without overlap); step 1 trains on the batch the
    weights before update 0 sampled — what a second collect() of the untouched model draws — and its ratio's π_old
    is those weights' policy, not the one being trained (float64, so the comparisons are to rounding)."""
    a, b, c = trainer(overlap=True, dtype=torch.float64), trainer(dtype=torch.float64), trainer(dtype=torch.float64)
    m_a, m_b = a.step(), b.step()
    assert m_a["reward_mean"] == m_b["reward_mean"]
    assert m_a["train_loss"] == pytest.approx(m_b["train_loss"], rel=1e-6)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

    c.collect()
    _, kept = c.collect()  # c's weights never move: the second batch the weights before update 0 draw
    batch = Rollout.join(kept)
    trained = copy.deepcopy(a.model)  # the weights update 1 starts from
    m_a = a.step(1)
    assert m_a["reward_mean"] == batch.rewards.mean().item()
    ids, starts, mask = batch.batch()
    n, t = mask.shape
    with torch.no_grad():
        new, old = (token_logprobs(m, ids, starts, t, lengths=starts + mask.sum(-1))[0] for m in (trained, c.model))
    advantages = a.advantages(batch, t)
    scale = dict(n_sequences=n, n_tokens=int(mask.sum()), max_tokens=a.task.max_new_tokens)
    off_policy = grpo_loss(new, old, advantages, mask, **scale)[0].item()
    on_policy = grpo_loss(new, new, advantages, mask, **scale)[0].item()
    assert m_a["train_loss"] == pytest.approx(off_policy, rel=1e-6)  # the engine reports the loss in float32
    assert abs(off_policy - on_policy) > 1e-2 * abs(off_policy)  # the ratio is not 1: the check can fail

    def samplers():
        return [t for t in threading.enumerate() if t.name.startswith("nanoseek-grpo-sample")]

    assert samplers()  # the batch of step 2 is being sampled
    a.close()  # afterwards no thread is left, and the batch is still pending
    assert not samplers()
    assert int(a.state_dict()["sampling_ahead"]) == 1


def test_under_bf16_sampling_reads_a_bf16_weight_copy_that_follows_the_policy():
    """train.dtype = bfloat16: each sampling refreshes a copy of the policy with bf16 matmul weights and samples
    with it — the same completions and rewards as sampling with the policy under autocast, also after updates."""
    t = trainer(seed=3, train_dtype="bfloat16")
    assert t._low_precision is not None
    for step in range(2):
        start = (t.problem_index, t.generator.get_state())
        mine = t.collect()[0][0]  # what a step samples
        t.problem_index, _ = start
        t.generator.set_state(start[1])
        policy = t._sample(t.model)
        assert mine.completion_ids == policy.completion_ids and torch.equal(mine.rewards, policy.rewards)
        q = t.model.blocks[0].attn.fn.q.weight
        assert t._low_precision.blocks[0].attn.fn.q.weight.dtype == torch.bfloat16
        assert torch.equal(t._low_precision.blocks[0].attn.fn.q.weight, q.detach().to(torch.bfloat16))
        before = q.detach().clone()
        t.step(step)  # the update changes the policy; the next sampling must see it
        assert not torch.equal(q.detach(), before)
    assert trainer()._low_precision is None  # float32: no copy


def test_overlap_warns_when_sampling_and_the_update_would_share_cores(monkeypatch):
    messages = []
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the engine's setting must not outlive the test
    for threads, warned in ((2, True), (1, False)):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        messages.clear()
        engine = Engine(Transformer(TINY), TrainConfig(threads=threads), log=messages.append)
        GRPO(engine, ByteTokenizer(), make_task("arithmetic", digits=1), GRPOConfig(overlap=True))
        assert any("train.threads = 1" in m for m in messages) == warned, messages


def test_smoke_grpo_run_learns_a_trivial_reward_within_seconds():
    t = trainer(lr=1e-2, loss_type="dapo", mu=2)
    rewards = [t.step()["reward_mean"] for _ in range(20)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.65 and last > first + 0.2, rewards


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(group_size=1), "group_size"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(beta=-0.1), "beta"),
        (dict(mu=0), "mu"),
        (dict(epsilon_low=1.0), "epsilon_low"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"{field}=.* is invalid"):
        GRPOConfig(**kwargs)


def test_an_overlong_buffer_longer_than_the_task_budget_is_refused():
    with pytest.raises(ValueError, match="grpo.overlong_buffer=100 is invalid: expected at most task.max_new_tokens=8"):
        trainer(overlong_buffer=100)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_a_batch_without_completion_tokens_has_zero_loss_and_zero_gradient(loss_type):
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.zeros(2, 3, dtype=torch.bool),
                            loss_type=loss_type, beta=0.1, ref_logp=torch.zeros(2, 3))  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert stats["clip_fraction"].item() == 0.0 and stats["kl"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_skipping_zero_advantage_groups_gives_the_same_gradient_for_less_work(loss_type):
    """With β = 0 the groups whose rewards are all equal add nothing to the gradient: leaving them out of the
    forward and backward (and keeping the whole batch's normalisers) must give the same gradient and loss."""
    runs = []
    for skip in (False, True):
        t = trainer(rewards={"r": (first_char_parity_unless_even_target, 1.0)}, loss_type=loss_type,
                    skip_zero_advantage=skip, dtype=torch.float64)  # fmt: skip
        grads = []

        def keep(opt, args, kwargs, t=t, grads=grads):
            grads.append([p.grad.clone() if p.grad is not None else None for p in t.model.parameters()])

        t.engine.optimizers[0].register_step_pre_hook(keep)
        runs.append((grads[0] if (metrics := t.step()) and grads else None, metrics))
    (full, m_full), (skipped, m_skip) = runs
    assert 0 < m_skip["zero_variance_frac"] < 1 and m_skip["trained_frac"] == 1 - m_skip["zero_variance_frac"]
    assert m_full["trained_frac"] == 1.0 and m_skip["train_loss"] == pytest.approx(m_full["train_loss"], abs=1e-7)
    for a, b in zip(full, skipped, strict=True):  # float64: equal up to summation order
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert m_skip["tokens"] < m_full["tokens"] and m_skip["flops"] < m_full["flops"]  # less work, counted as such
