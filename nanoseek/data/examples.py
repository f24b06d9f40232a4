"""Supervised examples: (prompt, completion) pairs for SFT, drawn from a reasoning task's worked solutions.

A source is any object with ``train(start, n)`` (examples start .. start+n-1 of an endless, deterministic training
stream) and ``held_out(n)`` (a fixed list for validation). ``TaskExamples`` renders a task's problems with its
template: the prompt the model will see at generation time, and the ideal completion (think block, then answer).
"""

from __future__ import annotations

from nanoseek.data.tasks import Task
from nanoseek.data.templates import render_target


class TaskExamples:
    """Worked solutions of ``task``: training problems of ``seed`` (disjoint from the test split), held-out ones
    from the test split."""

    def __init__(self, task: Task, seed: int = 0):
        self.task, self.seed = task, seed

    def _pair(self, split: str, index: int) -> tuple[str, str]:
        p = self.task.problem(split, self.seed, index)
        prompt = self.task.prompt(p)
        return prompt, render_target(prompt, p.reasoning, p.answer)

    def train(self, start: int, n: int) -> list[tuple[str, str]]:
        return [self._pair("train", i) for i in range(start, start + n)]

    def held_out(self, n: int) -> list[tuple[str, str]]:
        """The first ``n`` distinct test problems (all of them if the task has fewer)."""
        out = []
        for p in self.task.problems("test", n, seed=0, allow_fewer=True):
            prompt = self.task.prompt(p)
            out.append((prompt, render_target(prompt, p.reasoning, p.answer)))
        return out
