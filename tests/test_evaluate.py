"""Evaluation: Wilson intervals by hand, majority voting, pass@1 and maj@k counting, and a real run end to end."""

import math

import pytest
import torch

import nanoseek.rl.evaluate as ev
from nanoseek import ModelConfig, Transformer
from nanoseek.data.tasks import make_task
from nanoseek.data.tokenizer import ByteTokenizer


@pytest.mark.parametrize(
    "p, n, low, high",
    [
        (0.5, 100, 0.403832, 0.596168),
        (0.0, 10, 0.0, 0.277533),  # never outside [0, 1], unlike p ± 1.96·sqrt(p(1-p)/n)
        (1.0, 10, 0.722467, 1.0),
        (0.1, 50, 0.043476, 0.213602),
    ],
)
def test_wilson_interval_known_values(p, n, low, high):
    assert ev.wilson_interval(p, n) == pytest.approx((low, high), abs=1e-6)


def test_majority_answer_compares_canonical_forms_and_breaks_ties_by_first_seen():
    gsm = make_task("gsm")
    votes = ["<answer>12</answer>", "<answer>$1,200</answer>", "<answer>1200</answer>", "<answer>12.0</answer>"]
    assert ev.majority_answer(gsm, votes) == "12"  # 12 and 1200 both twice: 12 was seen first
    assert ev.majority_answer(gsm, votes[1:]) == "$1,200"
    assert ev.majority_answer(gsm, ["no answer", "<answer>twelve</answer>"]) is None


def test_pass_at_1_and_maj_at_k_count_as_defined(monkeypatch):
    task = make_task("arithmetic", digits=2)
    problems = task.problems("test", 4)
    answers = {p.question: p.answer for p in problems}
    # greedy: right on problems 0 and 1; samples (k=4): problem 0 all right, 1 right once (wrong majority),
    # 2 right twice against two different wrong answers (right majority), 3 never
    plan = {0: [1, 1, 1, 1], 1: [1, 0, 0, 0], 2: [1, 1, 0, 0], 3: [0, 0, 0, 0]}
    calls = []

    def fake_complete(model, tokenizer, prompts, max_new_tokens, **sampling):
        calls.append(sampling.get("temperature"))
        out = []
        for prompt in prompts:
            q = prompt.split("\n")[0]
            j = [p.question for p in problems].index(q)
            if sampling["temperature"] == 0:
                right = j < 2
            else:
                seen = sum(1 for x in out if x[0] == j)
                right = plan[j][seen]
            wrong = "-1" if j != 2 else str(-1 - sum(1 for x in out if x[0] == j))
            out.append((j, f"x</think><answer>{answers[q] if right else wrong}</answer>"))
        return None, [list(text.encode()) for _, text in out], None

    monkeypatch.setattr(ev, "complete", fake_complete)
    r = ev.evaluate(None, ByteTokenizer(), task, n=4, samples=4, batch_size=64)
    assert calls == [0.0, 1.0]
    assert r.greedy.value == 0.5 and r.greedy_format == 1.0
    assert r.sampled.value == pytest.approx((1 + 0.25 + 0.5 + 0) / 4)
    assert r.majority.value == 0.5  # problems 0 and 2
    assert r.greedy.low < 0.5 < r.greedy.high
    assert "maj@4" in r.report() and r.metrics()["maj"] == 0.5


def test_evaluate_runs_a_real_model_end_to_end():
    """An untrained model with an 8-token budget cannot even write "</think><answer>" (16 bytes): every metric is
    exactly 0 with the Wilson interval of 0 out of 6, and every greedy completion runs to the budget."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64))
    task = make_task("arithmetic")
    task.max_new_tokens = 8
    r = ev.evaluate(model, ByteTokenizer(), task, n=6, samples=2, n_examples=2)
    for est in (r.greedy, r.sampled, r.majority):
        assert (est.value, est.low) == (0.0, 0.0) and est.high == pytest.approx(ev.wilson_interval(0.0, 6)[1])
    assert r.greedy_format == 0.0 and r.greedy_length == 8.0
    assert len(r.examples) == 2 and r.examples[0]["question"] == task.problems("test", 1)[0].question


def test_pass_at_k_equals_the_brute_force_share_of_k_subsets():
    from itertools import combinations

    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(outcomes, k))
                exact = sum(any(s) for s in subsets) / len(subsets)
                assert ev.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert ev.pass_at_k(64, 1, 1) == pytest.approx(1 / 64) and ev.pass_at_k(64, 1, 64) == 1.0
    assert ev.pass_at_k(200, 3, 50) == pytest.approx(1 - math.comb(197, 50) / math.comb(200, 50), rel=1e-12)
    with pytest.raises(ValueError, match="pass@k"):
        ev.pass_at_k(4, 5, 2)


def test_evaluate_reports_pass_at_k_from_one_set_of_samples(monkeypatch):
    task = make_task("arithmetic", digits=2)
    problems = task.problems("test", 2)
    answers = {p.question: p.answer for p in problems}
    right_per_problem = {0: 1, 1: 0}  # problem 0: 1 of 4 samples right; problem 1: none

    def fake_complete(model, tokenizer, prompts, max_new_tokens, **sampling):
        out, seen = [], {}
        for prompt in prompts:
            j = [p.question for p in problems].index(prompt.split("\n")[0])
            seen[j] = seen.get(j, 0) + 1
            right = sampling["temperature"] > 0 and seen[j] <= right_per_problem[j]
            out.append(f"x</think><answer>{answers[problems[j].question] if right else '-1'}</answer>")
        return None, [list(t.encode()) for t in out], None

    monkeypatch.setattr(ev, "complete", fake_complete)
    r = ev.evaluate(None, ByteTokenizer(), task, n=2, samples=4, pass_at=(1, 2, 4))
    assert r.pass_at[1].value == pytest.approx((1 / 4 + 0) / 2)
    assert r.pass_at[2].value == pytest.approx((ev.pass_at_k(4, 1, 2) + 0) / 2) == pytest.approx(0.25)
    assert r.pass_at[4].value == pytest.approx(0.5)
    assert (r.pass_at[4].low, r.pass_at[4].high) == ev.wilson_interval(0.5, 2)
    assert r.metrics()["pass4"] == 0.5 and "pass@4" in r.report()
    with pytest.raises(ValueError, match=r"pass@k=\[8\] is invalid: expected integers k in 1..samples=4"):
        ev.evaluate(None, ByteTokenizer(), task, n=2, samples=4, pass_at=(8,))
