"""Rule-based rewards for the R1-Zero format (DESIGN.md §5; DeepSeek-R1, Nature 2025; the templates are in
nanoseek.data.templates).

The model reasons inside ``<think> … </think>`` and answers inside ``<answer> … </answer>``; no neural reward
model. A reward is any plain callable

    f(prompts: list[str], completions: list[str], **fields) -> list[float]

where ``fields`` holds one list per task field (``target``, ``numbers``, …, one entry per completion) plus
``completion_tokens`` (the completion lengths in tokens). Rewards are combined with weights by ``score``. Every
reward here returns a number for any string — malformed tags, several answers, huge numbers, division by zero,
non-ASCII text, code — and never raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from nanoseek.data.tasks import Task
from nanoseek.data.templates import ANSWER_CLOSE, ANSWER_OPEN, TAGS, THINK_CLOSE, THINK_OPEN, opens_think
from nanoseek.schema import require

RewardFn = Callable[..., list[float]]


def format_ok(prompt: str, completion: str) -> bool:
    """True iff the response is exactly ``<think>…</think> <answer>…</answer>`` with only whitespace around the
    blocks, each tag exactly once (so no nesting, no second answer). A prompt ending in <think> opened the block."""
    text = (THINK_OPEN if opens_think(prompt) else "") + completion
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    starts = [text.index(tag) for tag in TAGS]
    if starts != sorted(starts):
        return False
    between = (
        text[: starts[0]],
        text[starts[1] + len(THINK_CLOSE) : starts[2]],
        text[starts[3] + len(ANSWER_CLOSE) :],
    )
    return all(part.strip() == "" for part in between)


def extract_answer(completion: str) -> str | None:
    """The text of the one answer block; None when there is none, more than one, or the tags are out of order."""
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
        return None
    start, end = completion.index(ANSWER_OPEN) + len(ANSWER_OPEN), completion.index(ANSWER_CLOSE)
    return completion[start:end] if start <= end else None


def format_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1 for a well-formed think + answer response, else 0."""
    return [float(format_ok(p, c)) for p, c in zip(prompts, completions, strict=True)]


def accuracy_reward(task: Task) -> RewardFn:
    """1 when the single answer block passes ``task.verify``, else 0 (no answer or several answers: 0)."""

    def accuracy(prompts: list[str], completions: list[str], **fields: list[Any]) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            answer = extract_answer(completion)
            row = {k: v[i] for k, v in fields.items()}
            out.append(float(answer is not None and task.verify(answer, **row)))
        return out

    return accuracy


def overlong_reward(max_tokens: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13): 0 up to ``max_tokens - buffer`` tokens, then
    falling linearly to -1 at ``max_tokens`` (completions never exceed max_tokens here: generation stops there)."""
    ok = isinstance(buffer, int) and 1 <= buffer <= max_tokens
    require(ok, "overlong_buffer", buffer, f"expected an integer in 1..{max_tokens}")

    def overlong(prompts: list[str], completions: list[str], completion_tokens: list[int], **_: Any) -> list[float]:
        return [min(0.0, (max_tokens - buffer - n) / buffer) for n in completion_tokens]

    return overlong


def default_rewards(task: Task) -> dict[str, tuple[RewardFn, float]]:
    """Accuracy (weight 1) plus a small format reward (weight 0.1), so a right answer always outweighs the form."""
    return {"accuracy": (accuracy_reward(task), 1.0), "format": (format_reward, 0.1)}


def score(
    rewards: Mapping[str, tuple[RewardFn, float]], prompts: list[str], completions: list[str], **fields: list[Any]
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the rewards for each completion, and each reward's own values (for logging)."""
    parts: dict[str, list[float]] = {}
    for name, (fn, _) in rewards.items():
        values = [float(v) for v in fn(prompts, completions, **fields)]
        if len(values) != len(completions) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"reward {name!r} must return one finite number per completion, got {values[:8]!r}")
        parts[name] = values
    total = [sum(w * parts[name][i] for name, (_, w) in rewards.items()) for i in range(len(completions))]
    return total, parts
