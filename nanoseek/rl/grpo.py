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
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.config import check_choice, require
from nanoseek.data.tasks import Task
from nanoseek.rl.rewards import TEMPLATES, RewardFn, default_rewards, overlong_reward
from nanoseek.rl.rollout import Rollout, sample_rollout, token_logprobs

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "gspo")


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

    logp, old_logp, ref_logp, mask: (N, T); advantages: (N,). The normalisers default to this batch's own
    (N sequences, its real-token count, T); a caller splitting a batch into micro-batches passes the whole batch's
    so that the micro-batch losses add up to the batch loss."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta!r} is invalid without ref_logp: the KL term needs the reference policy")
    m = mask.to(logp.dtype)
    n_sequences = n_sequences or logp.shape[0]
    n_tokens = n_tokens or int(mask.sum())
    max_tokens = max_tokens or logp.shape[1]
    lengths = m.sum(-1).clamp(min=1)  # (N,)
    kl = k3_kl(logp, ref_logp) if beta > 0 else torch.zeros_like(logp)  # (N, T)
    lo, hi = 1 - epsilon_low, 1 + epsilon_high

    if loss_type == "gspo":
        ratio = torch.exp(((logp - old_logp) * m).sum(-1) / lengths)  # (N,) sequence-level ratio s_i
        unclipped, clipped = ratio * advantages, ratio.clamp(lo, hi) * advantages
        per_sequence = torch.minimum(unclipped, clipped) - beta * (kl * m).sum(-1) / lengths
        objective = per_sequence.sum() / n_sequences
        clipped_tokens = (clipped < unclipped).to(logp.dtype)[:, None] * m  # a clipped sequence cuts all its tokens
    else:
        ratio = torch.exp(logp - old_logp)  # (N, T)
        a = advantages[:, None]
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
    """Hyper-parameters of a GRPO run (DESIGN.md §5). The learning rate belongs to the optimizer."""

    group_size: int = 8
    """G, completions sampled per prompt (DeepSeekMath used 64, R1-Zero 16)."""
    prompts_per_step: int = 4
    """Groups (prompts) in each training batch."""
    max_new_tokens: int = 64
    """Longest completion; generation stops earlier at a stop string or end-of-text."""
    temperature: float = 1.0
    """Sampling temperature; the policy's log-probabilities use the same one (π = softmax(logits / temperature))."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    template: str = "compact"
    """Prompt template: a name in nanoseek.rl.rewards.TEMPLATES or a string containing {question}."""
    stop: tuple[str, ...] = ("</answer>",)
    """Stop strings that end a completion (kept in it)."""
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
    micro_batch_size: int = 0
    """Completions per forward/backward pass, gradients accumulated over the batch (0: the whole batch at once)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample new prompts to refill the batch."""
    max_refill_rounds: int = 3
    """With dynamic sampling, at most this many extra generation rounds per step; the batch may stay short."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment over the last N tokens before max_new_tokens (0: off)."""
    overlong_weight: float = 1.0
    """Weight of the overlong punishment in the total reward."""
    format_weight: float = 0.1
    """Weight of the format reward next to accuracy (weight 1) in the default rewards; 0 = accuracy only."""
    adv_eps: float = 1e-4
    """ε added to the group's reward std in the advantage."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this (0: no clipping)."""
    logprob_chunk: int = 64
    """Positions whose logits are computed at once when scoring completions."""
    seed: int = 0
    """Seed of the training-problem stream and of sampling."""

    def __post_init__(self) -> None:
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "mu", "logprob_chunk"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "expected an integer >= 1")
        for name in ("top_k", "ref_reset_every", "micro_batch_size", "max_refill_rounds", "overlong_buffer"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, name, value, "expected an integer >= 0")
        require(self.group_size >= 2, "group_size", self.group_size, "expected >= 2: advantages compare within a group")
        require(self.temperature > 0, "temperature", self.temperature, "expected > 0 (GRPO samples)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "expected a number in (0, 1]")
        require(
            self.template in TEMPLATES or "{question}" in self.template,
            "template",
            self.template,
            f"expected one of {', '.join(TEMPLATES)} or a string containing {{question}}",
        )
        stops_ok = isinstance(self.stop, (list, tuple)) and all(isinstance(x, str) and x for x in self.stop)
        require(stops_ok, "stop", self.stop, "expected a list of non-empty strings")
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        require(0 <= self.epsilon_low < 1, "epsilon_low", self.epsilon_low, "expected a number in [0, 1)")
        require(self.epsilon_high >= 0, "epsilon_high", self.epsilon_high, "expected a number >= 0")
        for name in ("beta", "overlong_weight", "max_grad_norm", "format_weight"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "expected a number >= 0")
        require(self.adv_eps > 0, "adv_eps", self.adv_eps, "expected a positive number")
        require(
            self.overlong_buffer <= self.max_new_tokens,
            "overlong_buffer",
            self.overlong_buffer,
            f"expected at most max_new_tokens={self.max_new_tokens}",
        )


class GRPOTrainer:
    """Runs GRPO one step at a time on ``model`` with ``optimizer``; ``rewards`` maps a name to (function, weight)
    (default: accuracy 1 + format cfg.format_weight). ``step()`` returns the step's metrics; ``state_dict()`` holds
    everything besides the model and optimizer that an exact resume needs, as tensors."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        tokenizer: Any,
        task: Task,
        cfg: GRPOConfig,
        rewards: Mapping[str, tuple[RewardFn, float]] | None = None,
    ):
        self.model, self.optimizer, self.tokenizer, self.task, self.cfg = model, optimizer, tokenizer, task, cfg
        self.rewards = dict(rewards if rewards is not None else default_rewards(task))
        if rewards is None:
            self.rewards["format"] = (self.rewards["format"][0], cfg.format_weight)
        if cfg.overlong_buffer:
            self.rewards["overlong"] = (overlong_reward(cfg.max_new_tokens, cfg.overlong_buffer), cfg.overlong_weight)
        self.reference = copy.deepcopy(model).requires_grad_(False) if cfg.beta > 0 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.steps_done = 0
        self.problem_index = 0

    def _sample(self) -> Rollout:
        n = self.cfg.prompts_per_step
        problems = [self.task.problem("train", self.cfg.seed, self.problem_index + i) for i in range(n)]
        self.problem_index += n
        c = self.cfg
        return sample_rollout(
            self.model,
            self.tokenizer,
            problems,
            self.rewards,
            group_size=c.group_size,
            max_new_tokens=c.max_new_tokens,
            template=c.template,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            stop=tuple(c.stop),
            generator=self.generator,
        )

    def collect(self) -> tuple[list[Rollout], list[Rollout]]:
        """(rollouts sampled, their groups kept for training). Without dynamic sampling every group is kept."""
        sampled, kept, n_kept = [], [], 0
        for _ in range(1 + (self.cfg.max_refill_rounds if self.cfg.dynamic_sampling else 0)):
            rollout = self._sample()
            sampled.append(rollout)
            if not self.cfg.dynamic_sampling:
                return sampled, sampled
            informative = (~zero_variance_groups(rollout.group_rewards())).nonzero().flatten().tolist()
            take = informative[: self.cfg.prompts_per_step - n_kept]
            if take:
                kept.append(rollout.select(take))
                n_kept += len(take)
            if n_kept == self.cfg.prompts_per_step:
                break
        return sampled, kept

    def step(self) -> dict[str, float]:
        """Sample (and refill), score, make μ updates; return the step's metrics:

        * over every completion sampled in the step: reward_mean, reward_std, reward_<name> for each reward (e.g.
          reward_accuracy, and reward_format = the format rate), completion_len (tokens), truncated_frac (cut at
          max_new_tokens), zero_variance_frac, groups_sampled, groups_kept, gen_tokens_per_s (completion tokens per
          second of sampling and scoring);
        * when a batch was trained on (dynamic sampling may keep none): loss (at the first update), clip_fraction
          (mean over the μ updates), kl (to the reference; only with β > 0), entropy (nats per token), grad_norm
          (of the last update, before clipping), train_tokens_per_s (prompt + completion tokens through the policy,
          counted once per update)."""
        c = self.cfg
        t0 = time.perf_counter()
        sampled, kept = self.collect()
        gen_time = time.perf_counter() - t0
        everything = Rollout.join(sampled)
        lengths = torch.tensor([len(x) for x in everything.completion_ids], dtype=torch.float64)
        metrics = {
            "step": float(self.steps_done + 1),
            "reward_mean": everything.rewards.mean().item(),
            "reward_std": everything.rewards.std(correction=0).item(),
            **{f"reward_{k}": v.mean().item() for k, v in everything.parts.items()},
            "completion_len": lengths.mean().item(),
            "truncated_frac": 1 - sum(everything.finished) / len(everything.finished),
            "zero_variance_frac": zero_variance_groups(everything.group_rewards()).double().mean().item(),
            "groups_sampled": float(everything.n_groups),
            "groups_kept": float(sum(r.n_groups for r in kept)),
            "gen_tokens_per_s": lengths.sum().item() / gen_time,
        }
        if kept:
            metrics.update(self.update(Rollout.join(kept)))
        self.steps_done += 1
        if self.reference is not None and c.ref_reset_every and self.steps_done % c.ref_reset_every == 0:
            self.reference.load_state_dict(self.model.state_dict())
        return metrics

    def update(self, rollout: Rollout) -> dict[str, float]:
        """μ optimizer steps on one batch against its old policy; gradients are accumulated over micro-batches."""
        c = self.cfg
        t0 = time.perf_counter()
        advantages = group_advantages(rollout.group_rewards(), scale=c.loss_type != "dr_grpo", eps=c.adv_eps)
        advantages = advantages.flatten().float()
        ids, starts, completion_mask = rollout.batch()
        n, t = completion_mask.shape
        size = c.micro_batch_size or n
        parts = [slice(s, s + size) for s in range(0, n, size)]
        n_tokens = int(completion_mask.sum())
        scale = {"n_sequences": n, "n_tokens": n_tokens, "max_tokens": c.max_new_tokens}
        ref = [None] * len(parts)
        if self.reference is not None:
            with torch.no_grad():
                ref = [self._logprobs(self.reference, ids[p], starts[p], t)[0] for p in parts]
        old: list[torch.Tensor] = []
        totals = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0}
        for iteration in range(c.mu):
            for k, p in enumerate(parts):
                logp, entropy = self._logprobs(self.model, ids[p], starts[p], t)
                if iteration == 0:
                    old.append(logp.detach())  # the weights have not moved yet: this is π_old
                loss, stats = grpo_loss(
                    logp,
                    old[k],
                    advantages[p],
                    completion_mask[p],
                    loss_type=c.loss_type,
                    epsilon_low=c.epsilon_low,
                    epsilon_high=c.epsilon_high,
                    beta=c.beta,
                    ref_logp=ref[k],
                    **scale,
                )
                loss.backward()
                share = completion_mask[p].sum().item() / max(n_tokens, 1)
                totals["clip_fraction"] += stats["clip_fraction"].item() * share / c.mu
                if iteration == 0:
                    totals["loss"] += loss.item()
                    totals["kl"] += stats["kl"].item() * share
                    totals["entropy"] += (entropy * completion_mask[p]).sum().item() / max(n_tokens, 1)
            params = [q for q in self.model.parameters() if q.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm or float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        train_time = time.perf_counter() - t0
        if self.reference is None:
            del totals["kl"]
        real_tokens = (starts.sum().item() + n_tokens) * c.mu
        return {**totals, "grad_norm": norm.item(), "train_tokens_per_s": real_tokens / train_time}

    def _logprobs(self, model: torch.nn.Module, ids: torch.Tensor, starts: torch.Tensor, n_tokens: int):
        return token_logprobs(model, ids, starts, n_tokens, self.cfg.temperature, self.cfg.logprob_chunk)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Step count, position in the problem stream, sampling RNG and (with β > 0) the reference weights: a flat
        dict of tensors, ready for safetensors."""
        state = {
            "steps_done": torch.tensor(self.steps_done),
            "problem_index": torch.tensor(self.problem_index),
            "generator": self.generator.get_state(),
        }
        if self.reference is not None:
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.steps_done = int(state["steps_done"])
        self.problem_index = int(state["problem_index"])
        self.generator.set_state(state["generator"])
        if self.reference is not None:
            prefix = "reference."
            self.reference.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
