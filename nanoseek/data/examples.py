"""Supervised examples: (prompt, completion) pairs for SFT, from a reasoning task or from a JSONL file of traces.

A source has ``train(start, n)`` (examples start .. start+n-1 of an endless, deterministic training stream) and
``held_out(n)`` (a fixed list for validation, never trained on).

* ``TaskExamples`` renders a task's training problems with its template: the prompt the model will see at
  generation time, and the ideal completion — ``targets="worked"``: the generator's worked solution in the think
  block, then the answer; ``"answers"``: an empty think block and the answer alone (what a pool of problems with
  checkable answers but no solutions can teach). ``budget=N`` keeps only the first N training problems (a fixed set
  of worked examples, cycled), as when solutions are scarce; 0 is the generator's endless supply.
* ``JsonlExamples`` reads a file with one JSON object per line holding at least ``prompt`` and ``completion``
  (e.g. rejection-sampled teacher traces written by ``nanoseek distill``; ``datasets.load_dataset("json", ...)``
  reads the same file). Every 20th line is held out for validation.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.data.tasks import Problem, Task
from nanoseek.data.templates import render_target
from nanoseek.schema import check_choice, require_int

TARGETS = ("worked", "answers")
HOLD_OUT_EVERY = 20


class TaskExamples:
    def __init__(self, task: Task, seed: int = 0, targets: str = "worked", budget: int = 0):
        check_choice("targets", targets, TARGETS)
        require_int("budget", budget, 0)
        self.task, self.seed, self.targets, self.budget = task, seed, targets, budget

    def pair(self, p: Problem) -> tuple[str, str]:
        prompt = self.task.prompt(p)
        return prompt, render_target(prompt, p.reasoning if self.targets == "worked" else "", p.answer)

    def train(self, start: int, n: int) -> list[tuple[str, str]]:
        indices = range(start, start + n)
        if self.budget:
            indices = [i % self.budget for i in indices]
        return [self.pair(self.task.problem("train", self.seed, i)) for i in indices]

    def held_out(self, n: int) -> list[tuple[str, str]]:
        """The first ``n`` distinct test problems (all of them if the task has fewer)."""
        return [self.pair(p) for p in self.task.problems("test", n, seed=0, allow_fewer=True)]


class JsonlExamples:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"sft.data={str(path)!r}: no such file (expected a JSONL file of prompt / completion rows)"
            )
        rows = []
        with open(path, encoding="utf-8", errors="strict") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                ok = isinstance(row, dict) and all(
                    isinstance(row.get(k), str) and row[k] for k in ("prompt", "completion")
                )
                if not ok:
                    raise ValueError(f"{path}: line {number} is not an object with non-empty 'prompt' and 'completion'")
                rows.append((row["prompt"], row["completion"]))
        if not rows:
            raise ValueError(f"{path} holds no examples")
        held = len(rows) >= HOLD_OUT_EVERY
        self.examples = [r for i, r in enumerate(rows) if not (held and i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1)]
        self.validation = [r for i, r in enumerate(rows) if held and i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
        self.path = path

    def train(self, start: int, n: int) -> list[tuple[str, str]]:
        return [self.examples[i % len(self.examples)] for i in range(start, start + n)]

    def held_out(self, n: int) -> list[tuple[str, str]]:
        return self.validation[:n]
