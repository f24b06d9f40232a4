"""Rollouts: G sampled completions per problem with their rewards, and the policy's per-token log-probabilities.

A ``Rollout`` keeps token lists, not padded tensors, so groups from several generation rounds (dynamic sampling
refills) can be selected and joined before one training batch is padded from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.data.tasks import Problem
from nanoseek.data.templates import render_prompt
from nanoseek.model.generate import generate
from nanoseek.rl.rewards import RewardFn, score


@dataclass
class Rollout:
    """N = groups × group_size completions; completion i belongs to group i // group_size."""

    group_size: int
    prompts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    finished: list[bool]
    """The completion ended at a stop string or end-of-text (False: cut at max_new_tokens)."""
    fields: dict[str, list[Any]]
    rewards: torch.Tensor
    """(N,) float64 weighted total reward."""
    parts: dict[str, torch.Tensor]
    """Each reward's (N,) values before weighting."""

    @property
    def n_groups(self) -> int:
        return len(self.prompts) // self.group_size

    def group_rewards(self) -> torch.Tensor:
        return self.rewards.view(self.n_groups, self.group_size)

    def select(self, groups: list[int]) -> Rollout:
        """The rollout restricted to the given group indices."""
        rows = [g * self.group_size + j for g in groups for j in range(self.group_size)]
        index = torch.tensor(rows, dtype=torch.long)
        return Rollout(
            self.group_size,
            [self.prompts[r] for r in rows],
            [self.prompt_ids[r] for r in rows],
            [self.completion_ids[r] for r in rows],
            [self.completions[r] for r in rows],
            [self.finished[r] for r in rows],
            {k: [v[r] for r in rows] for k, v in self.fields.items()},
            self.rewards[index],
            {k: v[index] for k, v in self.parts.items()},
        )

    @staticmethod
    def join(rollouts: list[Rollout]) -> Rollout:
        first = rollouts[0]
        return Rollout(
            first.group_size,
            [p for r in rollouts for p in r.prompts],
            [p for r in rollouts for p in r.prompt_ids],
            [c for r in rollouts for c in r.completion_ids],
            [c for r in rollouts for c in r.completions],
            [f for r in rollouts for f in r.finished],
            {k: [x for r in rollouts for x in r.fields[k]] for k in first.fields},
            torch.cat([r.rewards for r in rollouts]),
            {k: torch.cat([r.parts[k] for r in rollouts]) for k in first.parts},
        )

    def batch(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row is its prompt then its completion, right-padded: ids (N, L), the prompt lengths (N,) and the
        completion mask (N, T), T the longest completion.

        Generation left-pads prompts; training need not, since rotary embeddings are relative: shifting a row left
        changes none of its logits, and with padding only at the end plain causal attention needs no mask."""
        lengths = [len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids, strict=True)]
        n, t = len(lengths), max(1, max(len(c) for c in self.completion_ids))
        ids = torch.full((n, max(lengths)), pad_id, dtype=torch.long)
        completion_mask = torch.zeros(n, t, dtype=torch.bool)
        for i, (prompt, completion) in enumerate(zip(self.prompt_ids, self.completion_ids, strict=True)):
            ids[i, : lengths[i]] = torch.tensor(prompt + completion, dtype=torch.long)
            completion_mask[i, : len(completion)] = True
        return ids, torch.tensor([len(p) for p in self.prompt_ids]), completion_mask


def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    *,
    stop: tuple[str, ...] = ("</answer>",),
    **sampling: Any,
) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """Encode ``prompts``, generate one completion each in a batch (``sampling``: temperature, top_k, top_p,
    generator), and return (prompt ids, completion ids, finished). A tokenizer ``eos_id`` attribute ends rows too."""
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    eos_id = getattr(tokenizer, "eos_id", None)
    gen = generate(model, prompt_ids, max_new_tokens, eos_id=eos_id, stop=stop, decode=tokenizer.decode, **sampling)
    return prompt_ids, gen.completions(), gen.finished.tolist()


def sample_rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: list[Problem],
    rewards: Mapping[str, tuple[RewardFn, float]],
    *,
    group_size: int,
    max_new_tokens: int,
    template: str = "compact",
    stop: tuple[str, ...] = ("</answer>",),
    **sampling: Any,
) -> Rollout:
    """Sample ``group_size`` completions of every problem's prompt in one batch and score them."""
    prompts = [render_prompt(template, p.question) for p in problems for _ in range(group_size)]
    prompt_ids, completion_ids, finished = complete(model, tokenizer, prompts, max_new_tokens, stop=stop, **sampling)
    completions = [tokenizer.decode(c) for c in completion_ids]
    fields = {k: [p.fields[k] for p in problems for _ in range(group_size)] for k in problems[0].fields}
    lengths = [len(c) for c in completion_ids]
    total, parts = score(rewards, prompts, completions, **fields, completion_tokens=lengths)
    return Rollout(
        group_size,
        prompts,
        prompt_ids,
        completion_ids,
        completions,
        finished,
        fields,
        torch.tensor(total, dtype=torch.float64),
        {k: torch.tensor(v, dtype=torch.float64) for k, v in parts.items()},
    )


def token_logprobs(
    model: torch.nn.Module,
    ids: torch.Tensor,
    starts: torch.Tensor,
    n_tokens: int,
    temperature: float = 1.0,
    chunk_size: int = 64,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (N, n_tokens) of the tokens ids[i, starts[i] + t] under softmax(logits / temperature), and
    the policy's entropy there (no gradient), for the right-padded layout of ``Rollout.batch`` (starts = prompt
    lengths; ``lengths`` = real tokens per row, for MoE load counting). Entries past a row's end are meaningless:
    mask them. ``model`` is a Transformer or anything that forwards to one (the engine's compiled / DDP module).

    Logits exist only ``chunk_size`` positions at a time (``Transformer.forward`` with ``positions``); with
    gradients on, each chunk is recomputed in backward, so neither pass holds (N, T, vocab) float32 logits."""
    last = ids.shape[1] - 1
    where = (starts[:, None] + torch.arange(n_tokens, device=ids.device)).clamp(max=last)  # (N, T) scored tokens
    pad_mask = None
    if lengths is not None:
        pad_mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    targets, positions = ids.gather(1, where), where - 1  # position j predicts token j + 1
    # the rows trained on and their lengths change from batch to batch: a compiled forward (train.compile) is
    # compiled for any size at once instead of once for the first batch's sizes and once more for the rest
    for x in (ids, targets, positions, pad_mask):
        if x is not None:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(x, 1)
    return model(ids, targets, pad_mask=pad_mask, positions=positions, temperature=temperature, chunk=chunk_size)
