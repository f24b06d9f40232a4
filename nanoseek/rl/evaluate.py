"""Evaluation on a task's test split: pass@1 (greedy and sampled) and maj@k, with 95 % confidence intervals.

* pass@1 greedy: share of problems whose greedy answer verifies.
* pass@1 sampled: mean over problems of the share of k samples that verify (the unbiased pass@1 estimate).
* maj@k: share of problems whose most frequent answer among k samples (compared by ``task.canonical``; ties go
  to the answer seen first) verifies.
* pass@k: the chance that at least one of k samples verifies, by the unbiased estimator of Chen et al. 2021
  (arXiv 2107.03374): with n samples of which c verify, 1 − C(n − c, k) / C(n, k), averaged over problems — every k
  from one set of n ≥ max(k) samples, so the curve over k is one measurement, not several.

Intervals are Wilson score intervals over the n problems (Wilson 1927): unlike the normal approximation they stay
inside [0, 1] and keep their coverage near 0 % and 100 %, where small models live. For pass@1 sampled and pass@k,
means of per-problem values in [0, 1] — whose variance is at most p(1 − p) for any such variable with mean p — the
same interval is conservative. The intervals
cover the sampling of problems (and of completions), not the variation between training seeds.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from nanoseek.data.tasks import Task
from nanoseek.rl.rewards import extract_answer, format_ok
from nanoseek.rl.rollout import complete
from nanoseek.schema import require

Z_95 = 1.959963984540054


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion p observed over n trials."""
    require(n >= 1, "n", n, "expected at least one trial")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 (or 1) the bound is exactly 0 (or 1); rounding would leave a residue of ~1e-17
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


@dataclass
class Estimate:
    value: float
    low: float
    high: float

    @classmethod
    def of(cls, p: float, n: int) -> Estimate:
        return cls(p, *wilson_interval(p, n))


@dataclass
class EvalResult:
    task: str
    n: int
    samples: int
    greedy: Estimate
    greedy_format: float
    """Share of greedy completions in the exact think + answer format."""
    greedy_length: float
    """Mean length of the greedy completions, in tokens."""
    sampled: Estimate | None = None
    majority: Estimate | None = None
    pass_at: dict[int, Estimate] = field(default_factory=dict)
    """pass@k for each k asked, from the same samples."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """A few greedy completions: question, completion, correct."""

    def metrics(self) -> dict[str, float]:
        """Flat numbers for metrics.jsonl."""
        out = {"format_greedy": self.greedy_format, "completion_len_greedy": self.greedy_length}
        named = [("pass1_greedy", self.greedy), ("pass1_sampled", self.sampled), ("maj", self.majority)]
        named += [(f"pass{k}", est) for k, est in self.pass_at.items()]
        for name, est in named:
            if est is not None:
                out.update({name: est.value, f"{name}_low": est.low, f"{name}_high": est.high})
        return out

    def report(self) -> str:
        rows = [("pass@1 greedy", self.greedy)]
        if self.sampled is not None:
            rows += [("pass@1 sampled", self.sampled), (f"maj@{self.samples}", self.majority)]
        rows += [(f"pass@{k}", est) for k, est in self.pass_at.items()]
        lines = [f"{self.task}: {self.n} test problems, 95% Wilson intervals", f"{'metric':<16}{'value':>8}  95% CI"]
        lines += [f"{name:<16}{e.value:>8.1%}  [{e.low:.1%}, {e.high:.1%}]" for name, e in rows]
        lines.append(f"{'format (greedy)':<16}{self.greedy_format:>8.1%}")
        for ex in self.examples:
            mark = "right" if ex["correct"] else "wrong"
            lines.append(f"--- {mark}: {ex['question']}\n{ex['completion']}")
        return "\n".join(lines)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al. 2021): 1 − C(n−c, k) / C(n, k), as the
    product 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never forms the huge binomials."""
    require(0 <= c <= n and 1 <= k <= n, "pass@k", (n, c, k), "expected 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_answer(task: Task, completions: list[str]) -> str | None:
    """The most frequent answer by ``task.canonical`` form (ties: the one seen first), as first written; None if no
    completion has a usable answer."""
    first: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for completion in completions:
        answer = extract_answer(completion)
        key = None if answer is None else task.canonical(answer)
        if key is not None:
            first.setdefault(key, answer)
            counts[key] += 1
    return first[max(first, key=counts.__getitem__)] if first else None  # max keeps the first of equal counts


def _correct(task: Task, completion: str, fields: dict[str, Any]) -> bool:
    answer = extract_answer(completion)
    return answer is not None and task.verify(answer, **fields)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    n: int = 200,
    samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    n_examples: int = 3,
    allow_fewer: bool = False,
    pass_at: tuple[int, ...] = (),
) -> EvalResult:
    """Evaluate on the first ``n`` distinct test problems (the same set for every model and seed), prompted with
    the task's template, budget and stop strings; ``samples`` = k completions per problem for pass@1 sampled and
    maj@k (0: greedy only); ``seed`` seeds the sampling. ``allow_fewer``: a task with fewer test problems is
    evaluated on all it has (else that is an error). ``pass_at``: the k of pass@k, each at most ``samples``."""
    require(isinstance(samples, int) and samples >= 0, "samples", samples, "expected an integer >= 0")
    bad = [k for k in pass_at if not (isinstance(k, int) and 1 <= k <= samples)]
    require(not bad, "pass@k", bad, f"expected integers k in 1..samples={samples}")
    require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "expected an integer >= 1")
    problems = task.problems("test", n, seed=0, allow_fewer=allow_fewer)
    n = len(problems)
    prompts = [task.prompt(p) for p in problems]

    lengths: list[int] = []

    def run(repeat: int, **sampling: Any) -> list[str]:
        flat = [p for p in prompts for _ in range(repeat)]
        texts = []
        for s in range(0, len(flat), batch_size):
            chunk = flat[s : s + batch_size]
            _, ids, _ = complete(model, tokenizer, chunk, task.max_new_tokens, stop=task.stop, **sampling)
            texts += [tokenizer.decode(c) for c in ids]
            lengths.extend(len(c) for c in ids)
        return texts

    greedy = run(1, temperature=0.0)
    right = [_correct(task, c, p.fields) for c, p in zip(greedy, problems, strict=True)]
    result = EvalResult(
        task.name,
        n,
        samples,
        Estimate.of(sum(right) / n, n),
        sum(format_ok(q, c) for q, c in zip(prompts, greedy, strict=True)) / n,
        sum(lengths) / n,
        examples=[
            {"question": p.question, "completion": c, "correct": ok}
            for p, c, ok in list(zip(problems, greedy, right, strict=True))[:n_examples]
        ],
    )
    if samples:
        generator = torch.Generator().manual_seed(seed)
        sampled = run(samples, temperature=temperature, top_p=top_p, generator=generator)
        rate, majority, at_k = 0.0, 0, dict.fromkeys(pass_at, 0.0)
        for j, p in enumerate(problems):
            group = sampled[j * samples : (j + 1) * samples]
            right = sum(_correct(task, c, p.fields) for c in group)
            rate += right / samples
            for k in at_k:
                at_k[k] += pass_at_k(samples, right, k)
            voted = majority_answer(task, group)
            majority += voted is not None and task.verify(voted, **p.fields)
        result.sampled, result.majority = Estimate.of(rate / n, n), Estimate.of(majority / n, n)
        result.pass_at = {k: Estimate.of(v / n, n) for k, v in sorted(at_k.items())}
    return result
