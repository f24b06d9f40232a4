"""Verifiable reasoning tasks: generated problems with exact, rule-based verifiers (DESIGN.md §5, §7).

A task draws a ``Problem`` from a ``random.Random`` and checks an answer string with ``verify``. Three things hold
for every task, by construction:

* **Deterministic by seed.** Problem ``index`` of a split under ``seed`` is drawn from an RNG seeded with the
  string ``"name|seed|index|attempt"`` (seeded through SHA-512, so independent of PYTHONHASHSEED): a stream of
  training problems is resumed exactly from one integer.
* **Disjoint splits.** A problem belongs to the test split iff the SHA-256 of its ``key`` (the question, or a
  canonical form of it) falls in the first ``test_fraction`` of the hash range; generation redraws until the problem
  lands in the requested split. The same problem is therefore in the same split for every seed and configuration.
* **Verifiers never raise** on any answer string and never ``eval`` it.

Add a task in a few lines::

    @register_task("parity")
    class Parity(Task):
        def generate(self, rng):
            bits = "".join(rng.choice("01") for _ in range(8))
            n = bits.count("1") % 2
            return Problem(f"Parity of {bits}?", str(n), f"{bits.count('1')} ones", {"target": n})

        def verify(self, answer, target):
            return answer.strip() == str(target)
"""

from __future__ import annotations

import hashlib
import inspect
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from nanoseek.data.expression import ExpressionError, parse_expression
from nanoseek.data.templates import check_template, render_prompt
from nanoseek.schema import require, require_int

SPLITS = ("train", "test")
MAX_ANSWER_CHARS = 64  # longer answers are wrong without being parsed (no 10**10**10-sized integers)
_INTEGER = re.compile(r"-?[0-9]{1,40}")
_NUMBER = re.compile(r"\$?(-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]{1,30})(?:\.[0-9]{1,10})?)\.?")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    """A correct answer, as a perfect model would write it inside <answer>…</answer>."""
    reasoning: str
    """A worked solution for supervised "cold start" fine-tuning (what goes inside <think>…</think>)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """What the verifier needs besides the answer; passed to ``verify`` and to reward functions as keywords."""


class Task:
    """Base class: subclasses implement ``generate`` and ``verify``; ``key`` and ``canonical`` are optional.

    How a problem is put to a model is the task's too (``TaskConfig`` sets it): the prompt ``template``, the token
    budget of a completion ``max_new_tokens`` and the ``stop`` strings that end one."""

    name = "task"
    test_fraction = 0.1
    template = "compact"
    max_new_tokens = 64
    stop: tuple[str, ...] = ("</answer>",)
    worked_examples = 0

    def prompt(self, problem: Problem) -> str:
        """The prompt a model sees for ``problem``."""
        return render_prompt(self.template, problem.question)

    def generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def verify(self, answer: str, **fields: Any) -> bool:
        raise NotImplementedError

    def key(self, problem: Problem) -> str:
        """Identity of a problem for the train/test split (problems with equal keys are the same problem)."""
        return problem.question

    def canonical(self, answer: str) -> str | None:
        """Normal form of an answer for majority voting (maj@k); None for an answer that cannot be right."""
        text = " ".join(answer.split())
        return text if 0 < len(text) <= MAX_ANSWER_CHARS else None

    def split_of(self, problem: Problem) -> str:
        digest = hashlib.sha256(f"{self.name}|{self.key(problem)}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") < self.test_fraction * 2**64 else "train"

    def problem(self, split: str, seed: int, index: int) -> Problem:
        """Problem ``index`` of ``split`` under ``seed`` (repeats across indices are possible)."""
        require(split in SPLITS, "split", split, f"expected one of {', '.join(SPLITS)}")
        for attempt in range(10_000):
            candidate = self.generate(random.Random(f"{self.name}|{seed}|{index}|{attempt}"))
            if self.split_of(candidate) == split:
                return candidate
        raise ValueError(f"task {self.name!r} drew no {split} problem in 10000 attempts (test_fraction too extreme?)")

    def problems(self, split: str, n: int, seed: int = 0, allow_fewer: bool = False) -> list[Problem]:
        """``n`` distinct problems of ``split`` (the evaluation set); when the task has fewer, a clear error — or,
        with ``allow_fewer``, all it has."""
        require(isinstance(n, int) and 1 <= n <= MAX_PROBLEMS, "n", n, f"expected an integer in 1..{MAX_PROBLEMS}")
        seen: dict[str, Problem] = {}
        for index in range(20 * n + 1000):
            p = self.problem(split, seed, index)
            seen.setdefault(self.key(p), p)
            if len(seen) == n:
                return list(seen.values())
        if allow_fewer and seen:
            return list(seen.values())
        raise ValueError(f"n={n} is invalid: task {self.name!r} has only about {len(seen)} distinct {split} problems")


MAX_PROBLEMS = 1_000_000
"""Most problems drawn at once (an evaluation, a training pool): far beyond any evaluation that finishes in a day
here, and small enough to hold in memory."""

TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a Task subclass available to ``make_task(name, **options)``."""

    def add(cls: type[Task]) -> type[Task]:
        require(name not in TASKS, "task name", name, "already registered")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


@dataclass
class TaskConfig:
    """The [task] section of a run config: which task, its options, and how a problem is put to the model. Each
    task reads only the options its constructor takes (arithmetic: digits, operators, n_operands; countdown:
    n_numbers, max_number, max_target, rule); the others are ignored."""

    name: str = "arithmetic"
    """A registered task: arithmetic, countdown, gsm, or one added with @register_task."""
    digits: int = 1
    """arithmetic: operands are in [0, 10**digits)."""
    operators: str = "+-"
    """arithmetic: the operators drawn from (characters of + - * /)."""
    n_operands: int = 3
    """arithmetic: operands per expression."""
    n_numbers: int = 3
    """countdown: numbers given."""
    max_number: int = 20
    """countdown: largest number given."""
    max_target: int = 100
    """countdown: largest target."""
    rule: str = "exact"
    """countdown: exact (every given number used exactly once, TinyZero's rule) or at_most_once (numbers may stay
    unused)."""
    template: str = "compact"
    """Prompt template: a name in nanoseek.data.templates.TEMPLATES (compact, r1_zero) or a string containing
    {question}. SFT, GRPO, evaluation and serving all use it."""
    max_new_tokens: int = 64
    """Longest completion generated for a problem (GRPO rollouts, evaluation); generation stops earlier at a stop
    string or end-of-text."""
    stop: tuple[str, ...] = ("</answer>",)
    """Stop strings that end a completion (kept in it)."""
    worked_examples: int = 0
    """How many training problems come with a worked solution for SFT: 0 = every one (the generator's endless
    supply, an unrealistic upper bound); N = only problems 0..N-1 of the training stream (a fixed, scarce set, cycled
    through), while RL still draws from the whole pool of problems, which come with checkable answers only."""

    def __post_init__(self) -> None:
        check_template(self.template)
        require_int("worked_examples", self.worked_examples, 0)
        require_int("max_new_tokens", self.max_new_tokens, 1, 1_000_000)
        stops_ok = isinstance(self.stop, (list, tuple)) and all(isinstance(x, str) and x for x in self.stop)
        require(stops_ok, "stop", self.stop, "expected a list of non-empty strings")
        self.build()  # validates the name and the options the task uses

    def build(self) -> Task:
        require(self.name in TASKS, "name", self.name, f"expected one of {', '.join(sorted(TASKS))}")
        accepted = inspect.signature(TASKS[self.name]).parameters
        task = make_task(self.name, **{k: v for k, v in asdict(self).items() if k in accepted})
        task.template, task.max_new_tokens, task.stop = self.template, self.max_new_tokens, tuple(self.stop)
        task.worked_examples = self.worked_examples
        return task


def make_task(name: str, **options: Any) -> Task:
    require(name in TASKS, "task", name, f"expected one of {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](**options)
    except TypeError as err:
        raise ValueError(f"options {options!r} are invalid for task {name!r}: {err}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Answer parsing shared by the numeric tasks: strict, bounded, ASCII digits only (int() would accept "٣" and "1_000").


def parse_integer(answer: str) -> int | None:
    text = answer.strip(" \t\n")
    return int(text) if len(text) <= MAX_ANSWER_CHARS and _INTEGER.fullmatch(text) else None


def parse_number(answer: str) -> Fraction | None:
    """A final answer as GSM8K writes numbers: optional $, thousands separators, decimals, a trailing period."""
    text = answer.strip(" \t\n")
    m = _NUMBER.fullmatch(text) if len(text) <= MAX_ANSWER_CHARS else None
    return Fraction(m.group(1).replace(",", "")) if m else None


def _evaluate_steps(operands: list[int], ops: list[str]) -> tuple[int, list[str]] | None:
    """Evaluate ``a0 op0 a1 op1 …`` with the usual precedence, writing each binary step ("3*4=12"); None if a step
    divides by zero or leaves the integers (the generators want clean problems; the verifiers accept any rational)."""
    values, pending, steps = [Fraction(x) for x in operands], list(ops), []
    for level in ("*/", "+-"):
        i = 0
        while i < len(pending):
            if pending[i] not in level:
                i += 1
                continue
            a, b, op = values[i], values[i + 1], pending[i]
            if op == "/" and b == 0:
                return None
            r = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
            if r.denominator != 1:
                return None
            steps.append(f"{a}{op}{b}={r}")
            values[i : i + 2], pending[i : i + 1] = [r], []
    return int(values[0]), steps


def _redraw_error(task: Task) -> ValueError:
    return ValueError(f"task {task.name!r} found no valid problem in 10000 draws: its options leave too few")


# ---------------------------------------------------------------------------------------------------------------------
# Built-in tasks


@register_task("arithmetic")
class Arithmetic(Task):
    """Integer arithmetic such as ``47+385`` or ``12*7-30`` (usual precedence); the answer is an integer.

    Operands are uniform in [0, 10**digits); draws whose evaluation divides by zero or leaves the integers are
    redrawn, so with "/" every problem has an exact integer answer."""

    def __init__(self, digits: int = 2, operators: str = "+-", n_operands: int = 2):
        require(isinstance(digits, int) and 1 <= digits <= 9, "digits", digits, "expected an integer in [1, 9]")
        require(
            isinstance(operators, str) and operators != "" and set(operators) <= set("+-*/"),
            "operators",
            operators,
            "expected a non-empty string of characters from + - * /",
        )
        require(isinstance(n_operands, int) and 2 <= n_operands <= 8, "n_operands", n_operands, "expected 2..8")
        self.digits, self.operators, self.n_operands = digits, operators, n_operands

    def generate(self, rng: random.Random) -> Problem:
        for _ in range(10_000):
            operands = [rng.randrange(10**self.digits) for _ in range(self.n_operands)]
            ops = [rng.choice(self.operators) for _ in range(self.n_operands - 1)]
            solved = _evaluate_steps(operands, ops)
            if solved is not None:
                value, steps = solved
                question = "".join(f"{a}{op}" for a, op in zip(operands, ops, strict=False)) + str(operands[-1])
                return Problem(question, str(value), " ".join(steps), {"target": value})
        raise _redraw_error(self)

    def verify(self, answer: str, target: int, **_: Any) -> bool:
        return parse_integer(answer) == target

    def canonical(self, answer: str) -> str | None:
        value = parse_integer(answer)
        return None if value is None else str(value)


COUNTDOWN_RULES = ("exact", "at_most_once")


@register_task("countdown")
class Countdown(Task):
    """Reach ``target`` with the given numbers and + - * / (parentheses allowed).

    ``rule="exact"`` (the default, TinyZero's rule): every given number is used exactly once; ``"at_most_once"``:
    a number may also stay unused. Generated by combining all the numbers in a random order with random operations
    whose intermediate results stay positive integers, so every problem is solvable under both rules; targets never
    equal a given number (that would be a one-number answer). The verifier accepts any expression of the grammar in
    nanoseek.data.expression that obeys the rule and equals the target exactly."""

    def __init__(self, n_numbers: int = 3, max_number: int = 20, max_target: int = 100, rule: str = "exact"):
        require(isinstance(n_numbers, int) and 2 <= n_numbers <= 6, "n_numbers", n_numbers, "expected 2..6")
        require(isinstance(max_number, int) and max_number >= 2, "max_number", max_number, "expected an integer >= 2")
        require(isinstance(max_target, int) and max_target >= 1, "max_target", max_target, "expected an integer >= 1")
        require(rule in COUNTDOWN_RULES, "rule", rule, f"expected one of {', '.join(COUNTDOWN_RULES)}")
        self.n_numbers, self.max_number, self.max_target, self.rule = n_numbers, max_number, max_target, rule

    def generate(self, rng: random.Random) -> Problem:
        for _ in range(10_000):
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            solved = self._combine(rng, numbers)
            if solved is not None and 1 <= solved[0] <= self.max_target and solved[0] not in numbers:
                target, text, steps = solved
                question = f"Use {', '.join(map(str, numbers))} to make {target}."
                return Problem(question, text, " ".join(steps), {"numbers": numbers, "target": target})
        raise _redraw_error(self)

    @staticmethod
    def _combine(rng: random.Random, numbers: list[int]) -> tuple[int, str, list[str]] | None:
        pool = [(n, str(n)) for n in numbers]  # (value, expression text)
        steps = []
        while len(pool) > 1:
            (a, ta), (b, tb) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            op = rng.choice("+-*/")
            if (op == "-" and a <= b) or (op == "/" and a % b):
                return None
            r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            steps.append(f"{a}{op}{b}={r}")
            wrap = [t if t.isdigit() else f"({t})" for t in (ta, tb)]
            pool.append((r, f"{wrap[0]}{op}{wrap[1]}"))
        return pool[0][0], pool[0][1], steps

    def verify(self, answer: str, numbers: list[int], target: int, **_: Any) -> bool:
        try:
            expr = parse_expression(answer)
        except ExpressionError:
            return False
        used, given = Counter(expr.numbers), Counter(numbers)
        fits = used == given if self.rule == "exact" else not used - given
        return fits and expr.value == target

    def key(self, problem: Problem) -> str:
        return f"{sorted(problem.fields['numbers'])}->{problem.fields['target']}"

    def canonical(self, answer: str) -> str | None:
        text = "".join(answer.split())
        return text if 0 < len(text) <= MAX_ANSWER_CHARS else None


_NAMES = ("Ann", "Ben", "Carla", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivo", "June")
_ITEMS = ("apples", "pens", "stickers", "marbles", "books", "cards", "shells", "stamps")


def _story(rng: random.Random) -> tuple[str, list[str], int]:
    """One small two-step word problem: (question, reasoning steps, answer)."""
    name, item, kind = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(5, 50), rng.randint(2, 30)
        c = rng.randint(1, a + b)
        return (
            f"{name} has {a} {item}, buys {b} more and gives away {c}. How many {item} does {name} have now?",
            [f"{a}+{b}={a + b}.", f"{a + b}-{c}={a + b - c}."],
            a + b - c,
        )
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        return (
            f"A box holds {a} {item}. {name} buys {b} boxes and loses {c} {item}. How many {item} are left?",
            [f"{a}*{b}={a * b}.", f"{a * b}-{c}={a * b - c}."],
            a * b - c,
        )
    if kind == 2:
        a, b = rng.randint(5, 25), rng.randint(2, 8)
        c = rng.randint(1, a * b)
        return (
            f"{name} earns ${a} an hour, works {b} hours and spends ${c}. How many dollars are left?",
            [f"{a}*{b}={a * b}.", f"{a * b}-{c}={a * b - c}."],
            a * b - c,
        )
    if kind == 3:
        a, b = rng.randint(2, 15), rng.randint(2, 9)
        return (
            f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?",
            [f"{a * b}/{b}={a}."],
            a,
        )
    a, b, c = rng.randint(3, 30), rng.randint(2, 9), rng.randint(1, 40)
    return (
        f"{name} reads {a} pages a day for {b} days, then {c} more pages. How many pages is that in total?",
        [f"{a}*{b}={a * b}.", f"{a * b}+{c}={a * b + c}."],
        a * b + c,
    )


@register_task("gsm")
class WordProblems(Task):
    """GSM8K-style word problems with a numeric final answer, generated from small two-step stories.

    The answer block must hold one number as GSM8K writes it (optional $, thousands separators, decimals, a trailing
    period); it is compared exactly, so "1,200", "$1200" and "1200.0" are all right when the answer is 1200."""

    def generate(self, rng: random.Random) -> Problem:
        question, steps, answer = _story(rng)
        return Problem(question, str(answer), " ".join(steps), {"target": answer})

    def verify(self, answer: str, target: int, **_: Any) -> bool:
        return parse_number(answer) == target

    def canonical(self, answer: str) -> str | None:
        value = parse_number(answer)
        return None if value is None else str(value)
