"""Process rewards: a reward for every verified intermediate step, with DeepSeekMath's process advantages.

DeepSeekMath (arXiv 2402.03300, §4.1.3) scores each reasoning step of each of the G outputs of a group, normalises
the step rewards over the whole group, r̃ = (r − mean(R)) / std(R) with R every step reward of the group, and gives
token t of output i the advantage Â_{i,t} = Σ_{j: index(j) ≥ t} r̃_i^{index(j)}: the sum of the normalised rewards
of the steps that end at or after it.

Here a step is an equation ``a op b = c`` (integers, op in + - * /) written in the think block; its reward is 1 when
it is exactly true (rational arithmetic) and 0 otherwise — a rule, no reward model. The answer counts as the last
step, rewarded by the task's verifier, so the outcome stays in the signal. A step ends at the token that completes
its last character.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import torch

from nanoseek.data.tasks import Task
from nanoseek.data.templates import ANSWER_CLOSE, THINK_CLOSE
from nanoseek.rl.rewards import extract_answer

STEP = re.compile(r"(?<![0-9])([0-9]{1,12})\s*([-+*/])\s*([0-9]{1,12})\s*=\s*(-?[0-9]{1,24})(?![0-9])")


def step_true(a: str, op: str, b: str, c: str) -> bool:
    x, y = Fraction(int(a)), Fraction(int(b))
    if op == "/" and y == 0:
        return False
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else x}[op] == Fraction(int(c))


def scored_steps(completion: str, answer_right: bool) -> list[tuple[int, float]]:
    """(end character, reward) of every step of a completion: each equation of its think block (the text before
    ``</think>``, or all of it when the block is never closed), then its answer (rewarded 1 when right)."""
    think_end = completion.find(THINK_CLOSE)
    thinking = completion if think_end < 0 else completion[:think_end]
    steps = [(m.end(), float(step_true(*m.groups()))) for m in STEP.finditer(thinking)]
    if extract_answer(completion) is not None:
        steps.append((completion.index(ANSWER_CLOSE) + len(ANSWER_CLOSE), float(answer_right)))
    return steps


def token_ends(tokenizer: Any, ids: list[int]) -> list[int]:
    """Characters decoded after each token: token t completes the text up to ends[t]."""
    return [len(tokenizer.decode(ids[: t + 1])) for t in range(len(ids))]


def step_tokens(tokenizer: Any, ids: list[int], steps: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Map each step's end character to the index of the token that completes it."""
    ends = token_ends(tokenizer, ids)
    out = []
    for char_end, reward in steps:
        index = next((t for t, e in enumerate(ends) if e >= char_end), len(ids) - 1)
        out.append((index, reward))
    return out


def process_advantages(
    steps: list[list[tuple[int, float]]], group_size: int, n_tokens: int, eps: float = 1e-4
) -> torch.Tensor:
    """steps[i]: (token index, reward) of the steps of completion i, completions in groups of ``group_size`` ->
    advantages (N, n_tokens) float32: step rewards normalised over all the steps of their group, then each token
    gets the sum of the normalised rewards of the steps ending at or after it. A group whose steps all have the same
    reward (or a completion without steps) gets 0."""
    advantages = torch.zeros(len(steps), n_tokens, dtype=torch.float64)
    for g in range(0, len(steps), group_size):
        rewards = torch.tensor([r for i in range(g, g + group_size) for _, r in steps[i]], dtype=torch.float64)
        if rewards.numel() == 0 or rewards.max() == rewards.min():
            continue
        mean, std = rewards.mean(), rewards.std(correction=0)
        for i in range(g, g + group_size):
            for index, reward in steps[i]:
                advantages[i, : index + 1] += (reward - mean) / (std + eps)
    return advantages.float()


def rollout_steps(task: Task, tokenizer: Any, completions: list[str], ids: list[list[int]], fields: dict) -> list:
    """The (token index, reward) steps of every completion of a rollout."""
    out = []
    for i, (text, tokens) in enumerate(zip(completions, ids, strict=True)):
        answer = extract_answer(text)
        right = answer is not None and task.verify(answer, **{k: v[i] for k, v in fields.items()})
        out.append(step_tokens(tokenizer, tokens, scored_steps(text, right)))
    return out
