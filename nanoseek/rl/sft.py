"""Supervised fine-tuning on prompt + target text, with the loss on the target tokens only.

Used for the "cold start" (show a small model the task format before RL, as DeepSeek-R1 does) and later for
distillation (targets written by a teacher). Prompt and target are tokenised separately, exactly as the prompt is
tokenised at generation time, so the model learns to continue the prompt it will actually see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nanoseek.data.tasks import Task
from nanoseek.rl.rewards import render_prompt, render_target


def task_examples(
    task: Task, n: int, *, template: str = "compact", seed: int = 0, start: int = 0, split: str = "train"
) -> list[tuple[str, str]]:
    """(prompt, ideal completion) pairs for problems start .. start+n-1 of a task's split: the cold-start data."""
    out = []
    for i in range(start, start + n):
        p = task.problem(split, seed, i)
        prompt = render_prompt(template, p.question)
        out.append((prompt, render_target(prompt, p.reasoning, p.answer)))
    return out


def sft_batch(
    tokenizer: Any, examples: Sequence[tuple[str, str]], seq_len: int, *, pack: bool = False, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and targets (B, L) for next-token prediction; targets are -1 (ignored) on prompt tokens and padding.

    An example of p prompt and t target tokens (plus the tokenizer's ``eos_id``, if it has one) takes p + t - 1
    positions. Without ``pack`` each example is one row; with it, whole examples are placed one after another in a
    row while they fit (attention then crosses example boundaries, as in plain LM packing; the targets still score
    each target token once). Rows are right-padded to the longest row, L ≤ seq_len; an example longer than
    seq_len is an error, not silently cut."""
    eos = getattr(tokenizer, "eos_id", None)
    rows: list[tuple[list[int], list[int]]] = []
    for i, (prompt, target) in enumerate(examples):
        p, t = tokenizer.encode(prompt), tokenizer.encode(target) + ([eos] if eos is not None else [])
        if not p or not t:
            raise ValueError(f"example {i} is invalid: prompt and target must both be non-empty")
        ids, labels = p + t[:-1], [-1] * (len(p) - 1) + t  # position j predicts token j + 1
        if len(ids) > seq_len:
            raise ValueError(f"example {i} is invalid: {len(ids)} positions are longer than seq_len={seq_len}")
        if pack and rows and len(rows[-1][0]) + len(ids) <= seq_len:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(labels)
        else:
            rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        idx[r, : len(ids)] = torch.tensor(ids)
        targets[r, : len(labels)] = torch.tensor(labels)
    return idx, targets


def sft_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    idx: torch.Tensor,
    targets: torch.Tensor,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One optimizer step on the mean cross-entropy of the target tokens; returns loss, target_tokens, grad_norm."""
    _, loss = model(idx, targets)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "target_tokens": float((targets >= 0).sum()), "grad_norm": norm.item()}
