"""Template and rule-based rewards: hand-checked cases, adversarial completions get a number, never an exception."""

import math

import pytest

from nanoseek.data.tasks import TaskConfig, make_task
from nanoseek.data.templates import TEMPLATES, render_prompt, render_target
from nanoseek.rl.rewards import (
    accuracy_reward,
    default_rewards,
    extract_answer,
    format_ok,
    format_reward,
    overlong_reward,
    score,
)

COMPACT = render_prompt("compact", "12+30")  # ends with <think>: the completion continues the think block
FULL = render_prompt("r1_zero", "12+30")  # ends with "Assistant:": the completion opens it


def test_templates_render_the_question():
    assert COMPACT == "12+30\n<think>"
    assert FULL.endswith("User: 12+30\nAssistant:") and "<answer> </answer>" in FULL
    assert render_prompt("Q: {question} A:", "1+1") == "Q: 1+1 A:"
    with pytest.raises(ValueError, match="template='Q:' is invalid"):
        render_prompt("Q:", "1+1")


@pytest.mark.parametrize(
    "prompt, completion, ok",
    [
        (COMPACT, "12+30=42</think>\n<answer>42</answer>", True),
        (COMPACT, " 12+30=42 </think><answer> 42 </answer>\n ", True),
        (COMPACT, "</think><answer></answer>", True),  # empty blocks are well formed (accuracy judges content)
        (FULL, " <think>12+30=42</think> <answer>42</answer>", True),
        (FULL, "12+30=42</think><answer>42</answer>", False),  # the think block was never opened
        (COMPACT, "<think>12+30=42</think><answer>42</answer>", False),  # opened twice
        (COMPACT, "12+30=42</think>", False),  # no answer block
        (COMPACT, "12+30=42</think><answer>42", False),  # answer not closed
        (COMPACT, "a<think>b</think>c</think><answer>42</answer>", False),  # nested think
        (COMPACT, "x</think><answer>4</answer><answer>42</answer>", False),  # several answers
        (COMPACT, "x</think><answer>4<answer>42</answer></answer>", False),  # nested answers
        (COMPACT, "x</think>so<answer>42</answer>", False),  # text between the blocks
        (COMPACT, "x</think><answer>42</answer> done", False),  # text after the answer
        (COMPACT, "x<answer>42</answer></think>", False),  # blocks in the wrong order
        (COMPACT, "", False),
        (COMPACT, "思考</think><answer>四十二</answer>", True),  # form only: non-ASCII content is well formed
    ],
)
def test_format_reward_cases(prompt, completion, ok):
    assert format_ok(prompt, completion) is ok
    assert format_reward([prompt], [completion]) == [float(ok)]


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("x</think><answer>42</answer>", "42"),
        ("<answer> 7 </answer>", " 7 "),
        ("no tags", None),
        ("<answer>1</answer><answer>2</answer>", None),
        ("</answer>42<answer>", None),
        ("<answer>42", None),
    ],
)
def test_extract_answer_needs_exactly_one_answer_block(completion, answer):
    assert extract_answer(completion) == answer


ADVERSARIAL = [
    "x</think><answer>10**10**10</answer>",
    "x</think><answer>" + "9" * 100_000 + "</answer>",
    "x</think><answer>1e999999</answer>",
    "x</think><answer>7/(7-7)</answer>",
    "x</think><answer>nan</answer>",
    "x</think><answer>inf</answer>",
    "x</think><answer>٤٢</answer>",
    "x</think><answer>４２</answer>",
    "x</think><answer>\x00\ufffd\U0001f600</answer>",
    "x</think><answer>__import__('os').system('echo hi')</answer>",
    "x</think><answer>(lambda: 42)()</answer>",
    "x</think><answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "x</think><answer>42</answer><answer>42</answer>",
    "<answer><answer>42</answer></answer>",
    "<think><think></think>",
    "",
    "\ufffd" * 1000,
]


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "gsm"])
def test_adversarial_completions_get_zero_accuracy_and_never_raise(name):
    task = make_task(name)
    p = task.problem("train", 0, 0)
    n = len(ADVERSARIAL)
    fields = {k: [v] * n for k, v in p.fields.items()}
    prompts = [render_prompt("compact", p.question)] * n
    total, parts = score(default_rewards(task), prompts, ADVERSARIAL, **fields)
    assert parts["accuracy"] == [0.0] * n
    assert all(math.isfinite(x) for x in total)


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "gsm"])
def test_reference_completion_earns_full_reward_under_both_templates(name):
    task = make_task(name)
    acc = accuracy_reward(task)
    for template in TEMPLATES:
        for i in range(20):
            p = task.problem("train", 0, i)
            prompt = render_prompt(template, p.question)
            target = render_target(prompt, p.reasoning, p.answer)
            assert format_ok(prompt, target)
            fields = {k: [v] for k, v in p.fields.items()}
            assert acc([prompt], [target], **fields) == [1.0]


def test_accuracy_is_per_completion_with_its_own_fields():
    task = make_task("countdown")
    acc = accuracy_reward(task)
    out = acc(
        ["a", "b", "c"],
        ["<answer>3*5+7</answer>", "<answer>3*5+7</answer>", "<answer>3*5+8</answer>"],
        numbers=[[3, 5, 7], [3, 5, 7], [3, 5, 7]],
        target=[22, 23, 22],
    )
    assert out == [1.0, 0.0, 0.0]


def test_score_combines_weighted_rewards_and_keeps_each_part():
    task = make_task("arithmetic")
    completions = ["1</think><answer>42</answer>", "1</think><answer>41</answer>", "<answer>42</answer>"]
    total, parts = score(default_rewards(task), [COMPACT] * 3, completions, target=[42, 42, 42])
    assert parts == {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}
    assert total == pytest.approx([1.1, 0.1, 1.0])


def test_score_rejects_a_reward_that_returns_the_wrong_count_or_non_finite_values():
    short = {"short": (lambda prompts, completions, **_: [1.0], 1.0)}
    with pytest.raises(ValueError, match="reward 'short' must return one finite number per completion"):
        score(short, ["a", "b"], ["x", "y"])
    nan = {"nan": (lambda prompts, completions, **_: [float("nan")] * len(completions), 1.0)}
    with pytest.raises(ValueError, match="reward 'nan'"):
        score(nan, ["a"], ["x"])


def test_overlong_penalty_ramps_from_zero_to_minus_one_over_the_buffer():
    f = overlong_reward(max_tokens=64, buffer=16)
    lengths = [10, 48, 52, 56, 64]
    assert f([""] * 5, [""] * 5, completion_tokens=lengths) == [0.0, 0.0, -0.25, -0.5, -1.0]
    with pytest.raises(ValueError, match="overlong_buffer=0"):
        overlong_reward(64, 0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"template": "no placeholder"}, "template='no placeholder' is invalid"),
        ({"stop": "</answer>"}, "stop='</answer>' is invalid"),
        ({"stop": ("",)}, r"stop=\('',\) is invalid"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid"),
    ],
)
def test_the_task_section_owns_template_budget_and_stop_strings(options, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**options)
    task = TaskConfig(template="r1_zero", max_new_tokens=99, stop=("</answer>", "\n\n")).build()
    assert (task.template, task.max_new_tokens, task.stop) == ("r1_zero", 99, ("</answer>", "\n\n"))
    p = task.problem("test", 0, 0)
    assert task.prompt(p) == render_prompt("r1_zero", p.question)
