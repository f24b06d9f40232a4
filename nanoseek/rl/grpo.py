"""GRPO and its variants (DESIGN.md §5): group-normalised advantages, clipped ratios, k3 KL, dynamic sampling.

For each prompt, G completions are sampled from the old policy and scored by rules; every token of completion i
gets the advantage Â_i = (r_i − mean(r)) / (std(r) + ε) of its group. The objective (maximised; the loss is −J) is

    J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it Â_i, clip(ρ_it, 1−ε_low, 1+ε_high) Â_i) − β KL_it ]
    ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t),   KL_it = π_ref/π_θ − log(π_ref/π_θ) − 1   (k3)

``loss_type`` picks how tokens are averaged:

* ``grpo`` (DeepSeekMath, arXiv 2402.03300): mean over each completion's tokens, then over completions.
* ``dr_grpo`` (Liu et al. 2025, arXiv 2503.20783): no 1/|o_i| and no std division; token sums are divided by the
  constant max_new_tokens (and the number of completions), which scales the loss without biasing it by length.
* ``dapo`` (Yu et al. 2025, arXiv 2503.14476): sum over all tokens of the batch / number of tokens in the batch.
  The rest of DAPO is options: epsilon_high=0.28, dynamic_sampling=True, overlong_buffer > 0.
* ``gspo`` (Zheng et al. 2025, arXiv 2507.18071): one ratio per completion, s_i = exp(1/|o_i| Σ_t log ρ_it),
  clipped as above (the paper's ε are ~3e-4 / 4e-4, far smaller than GRPO's), minus β times the mean token KL.

In a step, μ optimizer updates are made on the same batch against the old policy: the first update's forward pass
is the old policy (the weights have not moved yet), so its log-probabilities, detached, are π_old — no extra pass.
With ``overlap``, the next batch is sampled in a background thread, by a copy of the weights taken before this
step's update, while this step updates: each update trains on completions sampled one update earlier, and π_old is
then the sampling copy's own policy (scored by the same thread), so ρ is the importance ratio between the policy
being trained and the one that sampled — the correction PPO makes for data one update old.

GRPO is a stage of the training engine (``GRPO``): the engine does the updates (optimizer, lr schedule, clipping,
accumulation over micro-batches, bf16, NaN guard, MoE balancing); [grpo] holds only what is GRPO's own. Per step
and process, train.batch_size × train.grad_accum prompts are sampled, group_size completions each; a micro-batch is
train.batch_size groups.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.data.tasks import Task
from nanoseek.model.generate import autocast_copy
from nanoseek.rl.process import process_advantages, rollout_steps
from nanoseek.rl.rewards import RewardFn, default_rewards, overlong_reward
from nanoseek.rl.rollout import Rollout, sample_rollout, token_logprobs
from nanoseek.schema import check_choice, require, require_int
from nanoseek.train.engine import Engine

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "gspo")
ADVANTAGES = ("outcome", "process")


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """rewards: (n_groups, G) -> (n_groups,) bool, True where every completion of the group got the same reward
    (such a group has zero advantage everywhere and teaches nothing)."""
    return rewards.amax(-1) == rewards.amin(-1)


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards: (n_groups, G) -> advantages (n_groups, G): r − mean(r) over the group, divided by std(r) + eps when
    ``scale`` (std over the group with divisor G). Groups with equal rewards get exactly 0 (no rounding residue)."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale:
        centred = centred / (rewards.std(-1, correction=0, keepdim=True) + eps)
    return torch.where(zero_variance_groups(rewards)[:, None], torch.zeros_like(centred), centred)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref) (Schulman 2020): exp(d) − d − 1 with d = log π_ref − log π_θ;
    ≥ 0, and 0 where the policies agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    n_sequences: int | None = None,
    n_tokens: int | None = None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss −J of the module docstring for one (micro-)batch, and statistics (clip fraction, mean KL).

    logp, old_logp, ref_logp, mask: (N, T); advantages: (N,) one per completion, or (N, T) one per token (process
    rewards, on-policy distillation; not with gspo, whose ratio is per sequence). The normalisers default to this
    batch's own
    (N sequences, its real-token count, T); a caller splitting a batch into micro-batches passes the whole batch's
    so that the micro-batch losses add up to the batch loss. Every loss type is 0, with zero gradients, on a batch
    without completion tokens."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta!r} is invalid without ref_logp: the KL term needs the reference policy")
    m = mask.to(logp.dtype)
    # a batch with no completion token (or no sequence) has a zero loss and zero gradients, never 0 / 0
    n_sequences = max(n_sequences or logp.shape[0], 1)
    n_tokens = max(n_tokens if n_tokens is not None else int(mask.sum()), 1)
    max_tokens = max(max_tokens or logp.shape[1], 1)
    lengths = m.sum(-1).clamp(min=1)  # (N,)
    kl = k3_kl(logp, ref_logp) if beta > 0 else torch.zeros_like(logp)  # (N, T)
    lo, hi = 1 - epsilon_low, 1 + epsilon_high

    if loss_type == "gspo":
        if advantages.dim() != 1:
            raise ValueError("loss_type='gspo' is invalid with per-token advantages: its ratio is per sequence")
        ratio = torch.exp(((logp - old_logp) * m).sum(-1) / lengths)  # (N,) sequence-level ratio s_i
        unclipped, clipped = ratio * advantages, ratio.clamp(lo, hi) * advantages
        per_sequence = torch.minimum(unclipped, clipped) - beta * (kl * m).sum(-1) / lengths
        objective = per_sequence.sum() / n_sequences
        clipped_tokens = (clipped < unclipped).to(logp.dtype)[:, None] * m  # a clipped sequence cuts all its tokens
    else:
        ratio = torch.exp(logp - old_logp)  # (N, T)
        a = advantages if advantages.dim() == 2 else advantages[:, None]
        unclipped, clipped = ratio * a, ratio.clamp(lo, hi) * a
        per_token = (torch.minimum(unclipped, clipped) - beta * kl) * m  # (N, T)
        if loss_type == "grpo":
            objective = (per_token.sum(-1) / lengths).sum() / n_sequences
        elif loss_type == "dr_grpo":
            objective = per_token.sum() / (n_sequences * max_tokens)
        else:  # dapo
            objective = per_token.sum() / n_tokens
        clipped_tokens = (clipped < unclipped).to(logp.dtype) * m
    # clip fraction: share of completion tokens whose gradient the clip removes
    tokens = m.sum().clamp(min=1)
    stats = {"clip_fraction": (clipped_tokens.sum() / tokens).detach(), "kl": ((kl * m).sum() / tokens).detach()}
    return -objective, stats


@dataclass
class GRPOConfig:
    """The [grpo] section: what is GRPO's own (DESIGN.md §5). The optimizer, learning rate and its schedule,
    clipping, batch (train.batch_size prompts per micro-batch), precision and seed are the engine's, in [train];
    the prompt template, token budget and stop strings are the task's, in [task]."""

    group_size: int = 8
    """G, completions sampled per prompt (DeepSeekMath used 64, R1-Zero 16)."""
    temperature: float = 1.0
    """Sampling temperature; the policy's log-probabilities use the same one (π = softmax(logits / temperature))."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    loss_type: str = "grpo"
    """grpo, dr_grpo, dapo or gspo (module docstring)."""
    epsilon_low: float = 0.2
    """The ratio is clipped below at 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """The ratio is clipped above at 1 + epsilon_high (DAPO's "clip-higher": 0.28)."""
    beta: float = 0.0
    """Weight of the k3 KL to the frozen reference policy; 0 keeps no reference model at all."""
    ref_reset_every: int = 0
    """Copy the policy into the reference every N steps (R1-Zero: 400); 0 never."""
    mu: int = 1
    """Optimizer updates per sampled batch, each against the same old policy (μ in DeepSeekMath)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample new prompts to refill the batch."""
    max_refill_rounds: int = 3
    """With dynamic sampling, at most this many extra generation rounds per step; the batch may stay short."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment over the last N tokens before task.max_new_tokens (0: off)."""
    overlong_weight: float = 1.0
    """Weight of the overlong punishment in the total reward."""
    format_weight: float = 0.1
    """Weight of the format reward next to accuracy (weight 1) in the default rewards; 0 = accuracy only."""
    skip_zero_advantage: bool = True
    """With β = 0, leave completions whose advantage is 0 everywhere (e.g. every group whose rewards are all
    equal) out of the forward and backward: they add exactly 0 to the loss and its gradient, and the normalisers
    stay the whole batch's, so the update is the same for less work (tested). The entropy and clip fraction are
    then over the trained tokens; an MoE model's balance loss covers the trained sequences only."""
    share_prompt: bool = True
    """Prefill each group's prompt once and copy its KV cache to the group's G completions (same tokens as G
    prefills, tested)."""
    advantage: str = "outcome"
    """outcome: one advantage per completion from its total reward, normalised in its group (GRPO's); process: a
    reward for every verified step of the think block and for the answer, normalised over the group's steps, and
    each token's advantage the sum of those of the steps ending at or after it (DeepSeekMath §4.1.3; rl/process.py).
    Dynamic sampling still looks at the outcome rewards."""
    adv_eps: float = 1e-4
    """ε added to the group's reward std in the advantage."""
    logprob_chunk: int = 64
    """Positions whose logits are computed at once when scoring completions."""
    overlap: bool = False
    """Sample the next step's batch in a background thread, with a copy of the weights taken before this step's
    update, while this step updates (one step off-policy; the first step is on-policy). The ratio's π_old is the
    sampling copy's policy, scored by that thread, so the clipped ratio corrects for the lag. It saves wall time when
    generation and the update each leave the other a core (train.threads = 1 on a 2-core machine; more threads
    would make the two compete). A checkpoint keeps the sampling weights, and a resume samples the pending batch
    again: the same run as without the interruption."""

    def __post_init__(self) -> None:
        require_int("group_size", self.group_size, 2, 65536)  # advantages compare within a group
        require_int("mu", self.mu, 1, 1000)
        require_int("logprob_chunk", self.logprob_chunk, 1)
        for name in ("top_k", "ref_reset_every", "max_refill_rounds", "overlong_buffer"):
            require_int(name, getattr(self, name), 0)
        require(self.temperature > 0, "temperature", self.temperature, "expected > 0 (GRPO samples)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "expected a number in (0, 1]")
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("advantage", self.advantage, ADVANTAGES)
        if self.advantage == "process" and self.loss_type == "gspo":
            raise ValueError("advantage='process' is invalid with loss_type='gspo': its ratio is per sequence")
        require(0 <= self.epsilon_low < 1, "epsilon_low", self.epsilon_low, "expected a number in [0, 1)")
        require(self.epsilon_high >= 0, "epsilon_high", self.epsilon_high, "expected a number >= 0")
        for name in ("beta", "overlong_weight", "format_weight"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "expected a number >= 0")
        require(self.adv_eps > 0, "adv_eps", self.adv_eps, "expected a positive number")


class GRPO:
    """GRPO as a stage of the engine: ``step()`` samples, scores and makes μ updates; ``rewards`` maps a name to
    (function, weight) (default: accuracy 1 + format cfg.format_weight). ``evaluator(model) -> metrics`` (e.g.
    held-out accuracy) runs at evaluation steps. ``state_dict()`` holds what an exact resume needs besides the
    model and optimizers, as tensors."""

    name = "grpo"
    postfix = ("reward_mean", "reward_accuracy", "completion_len", "zero_variance_frac", "kl", "entropy")

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        task: Task,
        cfg: GRPOConfig,
        rewards: Mapping[str, tuple[RewardFn, float]] | None = None,
        evaluator: Callable[[torch.nn.Module], dict] | None = None,
    ):
        self.engine, self.tokenizer, self.task, self.cfg, self.evaluator = engine, tokenizer, task, cfg, evaluator
        if engine.dist.world > 1 and engine.cfg.parallel == "fsdp":
            raise ValueError(
                "train.parallel='fsdp' is invalid for GRPO: generation stops at a different step on every process, "
                "which sharded weights cannot follow; use parallel='ddp'"
            )
        require(
            cfg.overlong_buffer <= task.max_new_tokens,
            "grpo.overlong_buffer",
            cfg.overlong_buffer,
            f"expected at most task.max_new_tokens={task.max_new_tokens}",
        )
        self.rewards = dict(rewards if rewards is not None else default_rewards(task))
        if rewards is None:
            self.rewards["format"] = (self.rewards["format"][0], cfg.format_weight)
        if cfg.overlong_buffer:
            self.rewards["overlong"] = (overlong_reward(task.max_new_tokens, cfg.overlong_buffer), cfg.overlong_weight)
        model = engine.model
        self.reference = copy.deepcopy(model).requires_grad_(False).eval() if cfg.beta > 0 else None
        t, d = engine.cfg, engine.dist
        self.prompts_per_step = t.batch_size * t.grad_accum  # per process
        self.generator = torch.Generator().manual_seed(t.seed + 1_000_003 * d.rank)
        self.steps_done = 0
        self.problem_index = 0
        # with overlap: the weights that sample the next batch, the thread sampling it, and where it started
        self.sampler = copy.deepcopy(model).requires_grad_(False).eval() if cfg.overlap else None
        # under bf16 autocast, on-policy sampling reads a copy whose matmul weights are stored in bf16, refreshed
        # from the policy before every sampling: the same numbers, without the compiled decode step casting every
        # weight for every token (with overlap, the sampling weights are a copy already and stay float32)
        low = engine.cfg.dtype == "bfloat16" and not cfg.overlap
        self._low_precision = autocast_copy(model, torch.bfloat16) if low else None
        cores = os.cpu_count() or 1
        if cfg.overlap and engine.device.type == "cpu" and 2 * torch.get_num_threads() > cores:
            threads, half = torch.get_num_threads(), max(cores // 2, 1)
            engine.log(f"grpo.overlap: sampling and the update each run {threads} threads on {cores} cores and "
                       f"will compete; train.threads = {half} gives each its own")  # fmt: skip
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: Future | None = None  # the next batch being sampled
        self._ahead_start: tuple[int, torch.Tensor] | None = None  # (problem index, RNG state) of the next batch

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    def _policy_for_sampling(self) -> torch.nn.Module:
        """The policy, or under bf16 its copy with bf16 matmul weights, refreshed to the policy's weights now."""
        if self._low_precision is None:
            return self.model
        self._low_precision.load_state_dict(self.model.state_dict())
        return self._low_precision

    def _sample(self, model: torch.nn.Module) -> Rollout:
        n, d = self.prompts_per_step, self.engine.dist
        first = self.problem_index + d.rank * n  # this process's slice of every step's problems
        problems = [self.task.problem("train", self.engine.cfg.seed, first + i) for i in range(n)]
        self.problem_index += n * d.world
        c = self.cfg
        was_training = model.training
        model.eval()  # generation leaves MoE loads alone
        with self.engine.autocast():
            rollout = sample_rollout(
                model, self.tokenizer, problems, self.rewards, group_size=c.group_size,
                max_new_tokens=self.task.max_new_tokens, template=self.task.template, temperature=c.temperature,
                top_k=c.top_k, top_p=c.top_p, stop=self.task.stop, generator=self.generator,
                share_prompts=c.share_prompt, compile=self.engine.cfg.compile,
                compile_prefill=False,  # a few short prompts per step: not worth a graph that compiles for ~30 s
            )  # fmt: skip
        model.train(was_training)
        return rollout

    def collect(self, model: torch.nn.Module | None = None) -> tuple[list[Rollout], list[Rollout]]:
        """(rollouts sampled, their groups kept for training), sampled by ``model`` (default: the policy). Without
        dynamic sampling every group is kept."""
        sampled, kept, n_kept = [], [], 0
        model = self._policy_for_sampling() if model is None else model  # once: refill rounds sample the same weights
        for _ in range(1 + (self.cfg.max_refill_rounds if self.cfg.dynamic_sampling else 0)):
            rollout = self._sample(model)
            sampled.append(rollout)
            if not self.cfg.dynamic_sampling:
                return sampled, sampled
            informative = (~zero_variance_groups(rollout.group_rewards())).nonzero().flatten().tolist()
            take = informative[: self.prompts_per_step - n_kept]
            if take:
                kept.append(rollout.select(take))
                n_kept += len(take)
            if n_kept == self.prompts_per_step:
                break
        return sampled, kept

    def _collect_scored(self) -> tuple[list[Rollout], list[Rollout], torch.Tensor | None, float]:
        """Overlap's background work: collect with the sampling weights, score the kept completions under them
        (π_old of the update that will train on them); the seconds it took."""
        t0 = time.perf_counter()
        sampled, kept = self.collect(self.sampler)
        old = None
        if kept:
            ids, starts, mask = (x.to(self.engine.device) for x in Rollout.join(kept).batch())
            with torch.no_grad(), self.engine.autocast():
                old = self._logprobs(self.sampler, ids, starts, starts + mask.sum(-1), mask.shape[1])[0]
        return sampled, kept, old, time.perf_counter() - t0

    def _prepare_ahead(self) -> None:
        """The sampling weights become the policy's as they are now, and the next batch starts here."""
        self.sampler.load_state_dict(self.model.state_dict())
        self._ahead_start = (self.problem_index, self.generator.get_state())

    def _launch_ahead(self) -> None:
        """Sample the prepared batch in a background thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="nanoseek-grpo-sample")
        self._ahead = self._pool.submit(self._collect_scored)

    def close(self) -> None:
        """Wait for a batch still being sampled and end its thread (the loop calls this when the stage ends, before
        its checkpoint): no thread outlives the stage. The batch stays pending, so a resume samples it again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _take_ahead(self) -> tuple[list[Rollout], list[Rollout], torch.Tensor | None, float]:
        future, self._ahead, self._ahead_start = self._ahead, None, None
        return future.result()  # an error in the thread is raised here

    def step(self, step: int = 0) -> dict[str, float]:
        """Sample (and refill), score, make μ updates; return the step's metrics:

        * over every completion sampled in the step: reward_mean, reward_std, reward_<name> for each reward (e.g.
          reward_accuracy, and reward_format = the format rate), completion_len (tokens), truncated_frac (cut at
          max_new_tokens), zero_variance_frac, groups_sampled, groups_kept, gen_tokens_per_s (completion tokens per
          second of sampling and scoring);
        * when a batch was trained on (dynamic sampling may keep none): train_loss (at the first update),
          clip_fraction (mean over the μ updates), kl (to the reference; only with β > 0), entropy (nats per
          token), grad_norm (of the last update, before clipping), train_tokens_per_s (prompt + completion tokens
          through the policy, counted once per update), trained_frac (completions trained on: with
          skip_zero_advantage, those with a non-zero advantage);
        * tokens and flops: every token through the model, sampled or trained on, and the analytic FLOPs."""
        t0 = time.perf_counter()
        if self.cfg.overlap:
            if self._ahead_start is None:  # the first step: sampled by the weights as they are
                self._prepare_ahead()
            if self._ahead is None:  # the first step, or a resumed one (its sampling weights came with the state)
                self._launch_ahead()
            sampled, kept, old, gen_time = self._take_ahead()
            self._prepare_ahead()  # the next batch, by the weights before this update ...
            if step + 1 < self.engine.cfg.steps:
                self._launch_ahead()  # ... sampled while the update runs (after the last step: by a resume)
        else:
            sampled, kept = self.collect()
            old, gen_time = None, time.perf_counter() - t0
        everything = Rollout.join(sampled)
        lengths = torch.tensor([len(x) for x in everything.completion_ids], dtype=torch.float64)
        prompt_tokens = sum(len(p) for p in everything.prompt_ids)
        gen_tokens = prompt_tokens + int(lengths.sum())
        longest = max(len(p) + len(c) for p, c in zip(everything.prompt_ids, everything.completion_ids, strict=True))
        metrics = {
            "reward_mean": everything.rewards.mean().item(),
            "reward_std": everything.rewards.std(correction=0).item(),
            **{f"reward_{k}": v.mean().item() for k, v in everything.parts.items()},
            "completion_len": lengths.mean().item(),
            "truncated_frac": 1 - sum(everything.finished) / len(everything.finished),
            "zero_variance_frac": zero_variance_groups(everything.group_rewards()).double().mean().item(),
            "groups_sampled": float(everything.n_groups),
            "groups_kept": float(sum(r.n_groups for r in kept)),
            "gen_tokens_per_s": lengths.sum().item() / gen_time,
            # sampling is a forward pass (a third of a training step's FLOPs per token)
            "tokens": gen_tokens,
            "flops": gen_tokens * self.model.flops_per_token(longest) / 3,
        }
        if kept:
            trained = self.update(Rollout.join(kept), old)
            metrics["tokens"] += trained.pop("tokens")
            metrics["flops"] += trained.pop("flops")
            metrics.update(trained)
        self.steps_done += 1
        if self.reference is not None and self.cfg.ref_reset_every and self.steps_done % self.cfg.ref_reset_every == 0:
            self.reference.load_state_dict(self.model.state_dict())
        return metrics

    def update(self, rollout: Rollout, old_logp: torch.Tensor | None = None) -> dict[str, float]:
        """μ optimizer updates on one batch against its old policy, through the engine; a micro-batch is
        train.batch_size groups, and every micro-batch's loss uses the whole batch's normalisers, so they add up
        to the batch loss. ``old_logp`` (N, T): π_old of the tokens when it is not the policy being trained (the
        sampling weights under overlap); None: the first update's own forward pass."""
        c, engine, device = self.cfg, self.engine, self.engine.device
        t0 = time.perf_counter()
        ids, starts, completion_mask = (x.to(device) for x in rollout.batch())
        n, t = completion_mask.shape
        advantages = self.advantages(rollout, t).to(device)
        n_tokens = int(completion_mask.sum())
        # the normalisers are the whole batch's, whatever is skipped below
        scale = {"n_sequences": n, "n_tokens": n_tokens, "max_tokens": self.task.max_new_tokens}
        if c.skip_zero_advantage and c.beta == 0:
            # with β = 0 a completion whose advantage is 0 everywhere adds exactly 0 to the loss and its gradient:
            # leave it out of the forward and backward (TRL computes it anyway)
            rows = (advantages.reshape(n, -1) != 0).any(-1).nonzero().flatten()
            ids, starts, completion_mask, advantages = ids[rows], starts[rows], completion_mask[rows], advantages[rows]
            old_logp = old_logp[rows] if old_logp is not None else None
        kept = ids.shape[0]
        lengths = starts + completion_mask.sum(-1)  # real tokens per row; right padding after them
        size = engine.cfg.batch_size * c.group_size
        parts = [slice(s, s + size) for s in range(0, kept, size)]
        ref: list[torch.Tensor | None] = [None] * len(parts)
        if self.reference is not None:
            with torch.no_grad(), engine.autocast():
                ref = [self._logprobs(self.reference, ids[p], starts[p], lengths[p], t)[0] for p in parts]
        old: list[torch.Tensor | None] = [None] * len(parts) if old_logp is None else [old_logp[p] for p in parts]
        totals = {"train_loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0}

        def micro(k: int, p: slice, first: bool):
            def loss() -> torch.Tensor:
                logp, entropy = self._logprobs(engine.forward, ids[p], starts[p], lengths[p], t)
                if first and old_logp is None:
                    old[k] = logp.detach()  # the weights have not moved yet: this is π_old
                value, stats = grpo_loss(
                    logp, old[k], advantages[p], completion_mask[p], loss_type=c.loss_type,
                    epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high, beta=c.beta, ref_logp=ref[k], **scale,
                )  # fmt: skip
                trained = max(int(completion_mask.sum()), 1)
                share = completion_mask[p].sum().item() / trained
                totals["clip_fraction"] += stats["clip_fraction"].item() * share / c.mu
                if first:
                    totals["kl"] += stats["kl"].item() * share
                    totals["entropy"] += (entropy * completion_mask[p]).sum().item() / trained
                balance = self.model.balance_loss()  # MoE's sequence-wise balance loss, over this micro-batch
                return value + balance * (min(p.stop, kept) - p.start) / max(kept, 1)

            return loss

        grad_norm = 0.0
        for iteration in range(c.mu if kept else 0):  # nothing to learn from: no update at all
            result = engine.update([micro(k, p, iteration == 0) for k, p in enumerate(parts)])
            grad_norm = result.grad_norm
            if iteration == 0:
                totals["train_loss"] = result.loss
        train_time = time.perf_counter() - t0
        if self.reference is None:
            del totals["kl"]
        real_tokens = int(starts.sum().item()) + int(completion_mask.sum())  # prompt + completion tokens trained on
        fpt = self.model.flops_per_token(max(ids.shape[1], 1))
        flops = real_tokens * fpt * c.mu + (real_tokens * fpt / 3 if self.reference is not None else 0.0)
        return {
            **totals,
            "trained_frac": kept / n,
            "grad_norm": grad_norm,
            "train_tokens_per_s": real_tokens * c.mu / train_time,
            "tokens": real_tokens * c.mu,
            "flops": flops,
        }

    def advantages(self, rollout: Rollout, n_tokens: int) -> torch.Tensor:
        """(N,) outcome advantages, or (N, n_tokens) process advantages."""
        c = self.cfg
        if c.advantage == "process":
            steps = rollout_steps(
                self.task, self.tokenizer, rollout.completions, rollout.completion_ids, rollout.fields
            )
            return process_advantages(steps, c.group_size, n_tokens, c.adv_eps)
        advantages = group_advantages(rollout.group_rewards(), scale=c.loss_type != "dr_grpo", eps=c.adv_eps)
        return advantages.flatten().float()

    def _logprobs(self, forward, ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, n_tokens: int):
        return token_logprobs(forward, ids, starts, n_tokens, self.cfg.temperature, self.cfg.logprob_chunk, lengths)

    def evaluate(self) -> dict[str, Any]:
        return self.evaluator(self.model) if self.evaluator is not None else {}

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Step count, position in the problem stream, sampling RNG, (with β > 0) the reference weights and (with
        overlap) the sampling weights with whether a batch is pending: a flat dict of tensors. A pending batch is
        recorded by where it started, so a resume samples it again."""
        problem_index, generator = self.problem_index, self.generator.get_state()
        if self._ahead_start is not None:  # the next batch (maybe being sampled): a resume samples it from its start
            problem_index, generator = self._ahead_start
        state = {
            "steps_done": torch.tensor(self.steps_done),
            "problem_index": torch.tensor(problem_index),
            "generator": generator,
        }
        if self.reference is not None:
            state.update({f"reference.{k}": v.cpu() for k, v in self.reference.state_dict().items()})
        if self.sampler is not None:
            state["sampling_ahead"] = torch.tensor(int(self._ahead_start is not None))
            state.update({f"sampler.{k}": v.cpu() for k, v in self.sampler.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.steps_done = int(state["steps_done"])
        self.problem_index = int(state["problem_index"])
        self.generator.set_state(state["generator"])
        if self.reference is not None:
            prefix = "reference."
            self.reference.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        if self.sampler is not None and "sampling_ahead" in state:  # else: sample with the policy's weights
            prefix = "sampler."
            self.sampler.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            if bool(state["sampling_ahead"]):
                self._ahead_start = (self.problem_index, self.generator.get_state())
