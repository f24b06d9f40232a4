"""The one engine under every stage: what [train] asks for is what pretraining, SFT and GRPO get."""

import copy
import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.examples import TaskExamples
from nanoseek.data.tasks import make_task
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.rl.grpo import GRPO, GRPOConfig
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine, TrainingError, _scales_in_its_kernel, balance_experts
from nanoseek.train.optim import build_optimizers
from nanoseek.train.sft import SFT

MOE = dict(d_model=32, n_layers=2, n_heads=2, seq_len=64, ffn="moe", n_routed_experts=4, top_k=2,
           bias_update_rate=0.01, seq_aux_loss=0.001)  # fmt: skip
DENSE = dict(d_model=32, n_layers=1, n_heads=2, seq_len=64)
TOK = ByteTokenizer()


def engine(model_options=DENSE, **train):
    torch.manual_seed(0)
    cfg = TrainConfig(**{"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "batch_size": 4, **train})
    return Engine(Transformer(ModelConfig(**model_options)), cfg, log=lambda message: None)


def task(max_new_tokens=8):
    t = make_task("arithmetic", digits=1)
    t.max_new_tokens = max_new_tokens
    return t


def sft(e):
    return SFT(e, TOK, TaskExamples(task()), seq_len=64)


def grpo(e, **cfg):
    return GRPO(
        e, TOK, task(), GRPOConfig(group_size=4, **cfg), rewards={"len": (lambda p, c, **_: [len(x) for x in c], 1.0)}
    )


@pytest.mark.parametrize("stage", [sft, grpo])
def test_moe_experts_are_balanced_after_every_update_of_every_stage(stage):
    e = engine(MOE)
    s = stage(e)
    biases = [m.expert_bias.clone() for m in e.model.moe_layers()]
    s.step(0)
    for m, before in zip(e.model.moe_layers(), biases, strict=True):
        assert not torch.equal(m.expert_bias, before)  # the balancing hook ran after the update
        load = m.last_load.double()
        torch.testing.assert_close(m.expert_bias - before, 0.01 * torch.sign(load.mean() - load).float())
        assert int(m.load.sum()) == 0  # and reset the counts


def test_grpo_generation_leaves_the_expert_loads_alone_and_training_counts_only_real_tokens():
    e = engine(MOE)
    s = grpo(e, skip_zero_advantage=False)  # every completion trained on, so every real token is counted
    sampled, kept = s.collect()
    assert all(int(m.load.sum()) == 0 for m in e.model.moe_layers())  # sampling ran in eval mode
    s.update(kept[0])
    rollout = kept[0]
    real = sum(len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    for m in e.model.moe_layers():  # one update: every real token of the batch routed to top_k experts, no padding
        assert int(m.last_load.sum()) == real * 2


def test_sft_counts_only_real_tokens_in_the_expert_loads():
    e = engine(MOE)
    s = sft(e)
    idx, targets, real = s._batch(TaskExamples(task()).train(0, 4))
    assert not real.all()  # the batch has padding
    s.step(0)
    for m in e.model.moe_layers():
        assert int(m.last_load.sum()) == int(real.sum()) * 2


def test_muon_is_used_in_grpo():
    e = engine(optimizer="muon")
    assert [type(o).__name__ for o in e.optimizers] == ["AdamW", "Muon"]
    grpo(e).step(0)
    muon = e.optimizers[1]
    assert len(muon.state) == len(muon.param_groups[0]["params"]) > 0  # every block matrix got a Muon update


@pytest.mark.parametrize("stage", [sft, grpo])
def test_bf16_autocast_is_active_in_sft_and_grpo(stage):
    e = engine(dtype="bfloat16")
    seen = []
    e.model.blocks[0].attn.fn.q.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    stage(e).step(0)
    assert torch.bfloat16 in seen and all(p.dtype == torch.float32 for p in e.model.parameters())


def test_grad_accumulation_splits_an_sft_step_into_micro_batches():
    one, two = engine(batch_size=4), engine(batch_size=2, grad_accum=2)
    grads = []
    for e in (one, two):
        keep = []
        e.optimizers[0].register_step_pre_hook(lambda opt, a, k, e=e, keep=keep: keep.append(
            [p.grad.clone() for p in e.model.parameters()]))  # fmt: skip
        sft(e).step(0)
        grads.append(keep[0])
    # mean over micro-batches of per-micro means vs one mean over all target tokens: equal when the micro-batches
    # hold as many target tokens; here they differ a little, so compare the direction, which must agree closely
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    assert torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0) > 0.99


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
@pytest.mark.parametrize("stage", [sft, grpo])
def test_non_finite_updated_weights_are_caught_in_every_stage(stage, on_nan):
    """An update that leaves a weight infinite (finite loss and gradient: what a too-large lr does): the guard on
    the updated weights stops the run, or with on_nan='skip' undoes the update — weights and optimizer state."""
    e = engine(on_nan=on_nan)
    s = stage(e)
    s.step(0)
    before = [p.detach().clone() for p in e.model.parameters()]
    adam_before = {k: v.clone() for k, v in e.optimizers[0].state[e.model.embed.weight].items()}
    poison = e.optimizers[0].register_step_post_hook(lambda opt, a, k: e.model.embed.weight.data.fill_(math.inf))
    if on_nan == "stop":
        with pytest.raises(TrainingError, match="non-finite weights after the update .* at step 2"):
            e.set_lr(1)
            s.step(1)
        return
    e.set_lr(1)
    s.step(1)
    assert e.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, e.model.parameters(), strict=True))
    state = e.optimizers[0].state[e.model.embed.weight]
    assert all(torch.equal(state[k], v) for k, v in adam_before.items())  # the optimizer step is undone too
    poison.remove()
    s.step(2)
    assert e.skipped == 1 and not all(torch.equal(a, b) for a, b in zip(before, e.model.parameters(), strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_check_catches_each_non_finite_value_in_any_tensor(bad):
    from nanoseek.train.engine import _finite

    params = [torch.zeros(3, 4), torch.ones(5), torch.full((2,), -7.0, dtype=torch.bfloat16)]
    assert _finite(params)
    for i in range(len(params)):
        broken = [p.clone() for p in params]
        broken[i].view(-1)[-1] = bad
        assert not _finite(broken)


def test_finite_check_keeps_huge_finite_weights_whose_sum_overflows():
    from nanoseek.train.engine import _finite

    huge = [torch.full((4,), 3e38), torch.full((3,), -3e38, dtype=torch.bfloat16)]
    assert all(not torch.isfinite(t.sum()) for t in huge)  # the quick sum overflows, the exact test decides
    assert _finite(huge)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_norm_is_torchs_total_norm_including_overflow_infinity_and_nan(dtype):
    from nanoseek.train.engine import gradient_norm

    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(3, 5), (7,), (2, 3, 4)]]
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, dtype=dtype, generator=torch.Generator().manual_seed(i))
    expected = float(torch.cat([p.grad.double().flatten() for p in params]).norm())
    assert gradient_norm(params) == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-14)
    assert gradient_norm([]) == 0.0 and gradient_norm([torch.nn.Parameter(torch.zeros(2))]) == 0.0  # no gradients
    params[1].grad[0] = 1e30  # its square overflows float32, the norm itself does not
    assert gradient_norm(params) == pytest.approx(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
    for bad, expected_bad in [(math.inf, math.isinf), (math.nan, math.isnan)]:
        params[1].grad[0] = bad
        assert expected_bad(gradient_norm(params))


def _reference_update(model, optimizers, clip, dist):
    """What the engine's update did before its clipping moved into the fused kernel: torch's clip_grad_norm_,
    every optimizer's step, the gradients dropped, the MoE balancing."""
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip or math.inf)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    balance_experts(model, dist)


@pytest.mark.parametrize(
    ("optimizer", "dtype"), [("adamw", torch.float32), ("adamw", torch.float64), ("muon", torch.float64)]
)
@pytest.mark.parametrize("clip", [0.05, 1e9, 0.0])
def test_clipped_update_equals_clip_grad_norm_then_the_steps(optimizer, dtype, clip):
    """Clipping binding (0.05), not binding and off (0): the engine's updates, with the scale inside the fused
    AdamW kernel (float32) or multiplied into the gradients first (float64, Muon), land where torch's
    clip_grad_norm_ followed by the optimizers' steps lands, over five updates with fresh gradients. Muon is
    compared in float64 only: it orthogonalises in bfloat16, where a float32 rounding difference in the clip
    factor flips roundings of the whole matrix."""
    dispatch = "grouped" if dtype == torch.float32 else "loop"  # grouped_mm has no float64
    e = engine(MOE | {"moe_dispatch": dispatch}, optimizer=optimizer, grad_clip=clip, weight_decay=0.1)
    e.model.to(dtype)
    ref = copy.deepcopy(e.model)
    ref_opts = build_optimizers(ref, e.cfg)
    assert _scales_in_its_kernel(e.optimizers[0]) == (dtype == torch.float32)  # the path under test
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 256, (2, 16), generator=g)
        e.update([lambda x=x: e.forward(x, x)[1]])
        ref(x, x)[1].backward()
        _reference_update(ref, ref_opts, clip, e.dist)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for (name, a), b in zip(e.model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
