"""Verifiable tasks: determinism by seed, disjoint splits, exact verifiers, the expression parser, the registry."""

import random
from fractions import Fraction

import pytest

from nanoseek.data.expression import ExpressionError, parse_expression
from nanoseek.data.tasks import TASKS, Problem, Task, make_task, parse_integer, parse_number, register_task

ALL = [
    ("arithmetic", {}),
    ("arithmetic", dict(digits=3, operators="+-*/", n_operands=3)),
    ("countdown", {}),
    ("countdown", dict(n_numbers=4, max_number=50, max_target=500)),
    ("gsm", {}),
]
IDS = [f"{name}-{len(opts)}" for name, opts in ALL]


@pytest.mark.parametrize("name, opts", ALL, ids=IDS)
def test_problems_are_deterministic_by_seed_and_index(name, opts):
    task = make_task(name, **opts)
    assert task.problem("train", 3, 17) == make_task(name, **opts).problem("train", 3, 17)
    assert [task.problem("train", 3, i) for i in range(20)] != [task.problem("train", 4, i) for i in range(20)]


@pytest.mark.parametrize("name, opts", ALL, ids=IDS)
def test_train_and_test_splits_are_disjoint_for_every_seed(name, opts):
    task = make_task(name, **opts)
    test_keys = {task.key(p) for p in task.problems("test", 100, seed=0)}
    train_keys = {task.key(task.problem("train", seed, i)) for seed in range(3) for i in range(300)}
    assert len(test_keys) == 100 and len(train_keys) > 250
    assert not test_keys & train_keys
    # membership is a property of the problem, not of how it was drawn
    assert all(task.split_of(task.problem("test", 5, i)) == "test" for i in range(50))


@pytest.mark.parametrize("name, opts", ALL, ids=IDS)
def test_reference_answers_verify_and_wrong_ones_do_not(name, opts):
    task = make_task(name, **opts)
    for i in range(200):
        p = task.problem("train", 0, i)
        assert task.verify(p.answer, **p.fields), p
        assert not task.verify(p.answer + "1", **p.fields), p
        assert not task.verify("", **p.fields)


def test_arithmetic_answers_agree_with_the_expression_parser():
    task = make_task("arithmetic", digits=2, operators="+-*/", n_operands=4)
    for i in range(200):
        p = task.problem("train", 0, i)
        assert parse_expression(p.question).value == p.fields["target"] == int(p.answer)


def test_countdown_generates_with_every_number_and_verifier_accepts_other_solutions():
    task = make_task("countdown")
    for i in range(100):
        p = task.problem("train", 1, i)
        assert sorted(parse_expression(p.answer).numbers) == sorted(p.fields["numbers"])
        assert 1 <= p.fields["target"] <= 100 and p.fields["target"] not in p.fields["numbers"]
        assert task.verify(p.answer, **p.fields)
    numbers, target = [3, 5, 7, 7], 22
    assert task.verify(" 7 + (7 + 3) + 5", numbers, target)  # every number exactly once
    assert task.verify(" 7/7 + 7 + 3 * 5 - 1*1 ", [7, 7, 7, 3, 5, 1, 1], 22)
    assert task.verify("(7/7+3)*5+2*0", [7, 7, 3, 5, 2, 0], 20)  # exact rationals: 7/7 = 1
    assert task.verify("7*(3+5/7)+(7-7)", [7, 3, 5, 7, 7, 7], 26)  # 5/7 is exact, no float rounding


def test_countdown_uses_every_number_exactly_once_unless_told_otherwise():
    exact, lenient = make_task("countdown"), make_task("countdown", rule="at_most_once")
    numbers, target = [3, 5, 7, 7], 22
    assert not exact.verify("3*5+7", numbers, target)  # a 7 unused: wrong under TinyZero's rule
    assert lenient.verify("3*5+7", numbers, target)
    for task in (exact, lenient):
        assert not task.verify("3*5+7+7-7", numbers, target)  # a 7 three times, given twice: wrong under both
        assert task.verify("7+7+3+5", numbers, target)
    with pytest.raises(ValueError, match="rule='sometimes' is invalid: expected one of exact, at_most_once"):
        make_task("countdown", rule="sometimes")


@pytest.mark.parametrize(
    "answer",
    [
        "3*5+7+7-7",  # uses 7 three times, given twice
        "15+7",  # 15 is not a given number
        "3*5+7+0",  # neither is 0
        "-3+25",  # unary minus is not an operation of the game
        "3**5",
        "10**10**10",
        "7/(7-7)+22",  # division by zero
        "(3*5+7",
        "3*5+7)",
        "3 5 7",
        "__import__('os').system('true')",
        "3×5+7",  # non-ASCII operator
        "３*5+7",  # fullwidth digit
        "٣*5+7",  # Arabic-Indic digit: Python's int() would accept it
        "(" * 40 + "22" + ")" * 40,  # too deep
        "1" * 300,
        "",
    ],
)
def test_countdown_verifier_rejects_everything_else(answer):
    task = make_task("countdown")
    assert task.verify(answer, [3, 5, 7, 7, 22], 22) is False


def test_expression_parser_errors_are_value_errors_with_a_reason():
    with pytest.raises(ExpressionError, match="division by zero"):
        parse_expression("1/(2-2)")
    with pytest.raises(ValueError, match="'\\^' at 1 is not a digit"):
        parse_expression("2^3")
    with pytest.raises(ValueError, match="expected a number or '\\(' but found '\\*'"):
        parse_expression("2**3")
    assert parse_expression("(1+2)*3-4/8").value == Fraction(17, 2)
    assert parse_expression("8-2-1").value == 5  # left associative
    assert parse_expression("8/2/2").value == 2


@pytest.mark.parametrize(
    "text, integer, number",
    [
        ("42", 42, 42),
        (" -7\n", -7, -7),
        ("1,200", None, 1200),
        ("$1,200.", None, 1200),
        ("1200.0", None, 1200),
        ("12.5", None, Fraction(25, 2)),
        ("1,20", None, None),
        ("٤٢", None, None),
        ("4_2", None, None),
        ("9" * 5000, None, None),  # int() would raise (4300-digit limit) or be slow
        ("42 apples", None, None),
        ("nan", None, None),
    ],
)
def test_number_parsing_is_strict_ascii_and_bounded(text, integer, number):
    assert parse_integer(text) == integer
    assert parse_number(text) == number


def test_gsm_accepts_numbers_as_gsm8k_writes_them():
    task = make_task("gsm")
    assert task.verify("$1,200", target=1200) and task.verify("1200.", target=1200)
    assert not task.verify("1200 or 1300", target=1200)
    assert task.canonical(" $1,200 ") == task.canonical("1200.0") == "1200"


def test_problems_errors_when_the_task_is_too_small():
    task = make_task("arithmetic", digits=1, operators="+")
    with pytest.raises(ValueError, match="n=50 is invalid: task 'arithmetic' has only about 1[0-9] distinct test"):
        task.problems("test", 50)


def test_registry_adds_a_task_in_a_few_lines_and_rejects_bad_names_and_options():
    @register_task("parity-test")
    class Parity(Task):
        def generate(self, rng: random.Random) -> Problem:
            bits = "".join(rng.choice("01") for _ in range(10))
            n = bits.count("1") % 2
            return Problem(f"Parity of {bits}?", str(n), f"{bits.count('1')} ones", {"target": n})

        def verify(self, answer, target):
            return answer.strip() == str(target)

    try:
        task = make_task("parity-test")
        p = task.problem("train", 0, 0)
        assert task.verify(p.answer, **p.fields) and task.name == "parity-test"
        with pytest.raises(ValueError, match="already registered"):
            register_task("parity-test")(Parity)
    finally:
        del TASKS["parity-test"]
    with pytest.raises(ValueError, match="task='sudoku' is invalid"):
        make_task("sudoku")
    with pytest.raises(ValueError, match="invalid for task 'gsm'"):
        make_task("gsm", digits=3)
    with pytest.raises(ValueError, match="operators"):
        make_task("arithmetic", operators="+^")
