"""Distillation: rejection sampling keeps only verified traces; on-policy reverse-KL advantages give the gradient of
the reverse KL, and vanish when teacher = student; the CLI end to end in both modes."""

import copy
import json

import pytest
import torch

import nanoseek.rl.distill as distill
from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.data.tasks import make_task
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.rl.distill import DistillConfig, OnPolicyDistill, rejection_sample, reverse_kl_advantages
from nanoseek.rl.grpo import grpo_loss
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine

TINY = ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64)


def test_the_reverse_kl_advantage_gives_the_gradient_of_the_reverse_kl():
    """One position, vocabulary of 5: weighting every token by its student probability (the expectation a sampler
    estimates), the policy-gradient loss with advantages -(log p_s - log p_t) has the gradient of KL(p_s || p_t)."""
    torch.manual_seed(0)
    student_logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    teacher_logp = torch.randn(5, dtype=torch.float64).log_softmax(-1)
    logp = student_logits.log_softmax(-1)
    exact = (logp.exp() * (logp - teacher_logp)).sum()  # KL(p_s || p_t)
    (expected,) = torch.autograd.grad(exact, student_logits)
    logp = student_logits.log_softmax(-1)
    weights = logp.exp().detach()  # every token, weighted by how often the student would sample it
    advantages = reverse_kl_advantages(logp.detach(), teacher_logp, torch.ones(5, dtype=torch.float64))
    surrogate = -(weights * advantages * logp).sum()  # the policy-gradient loss, in expectation
    (got,) = torch.autograd.grad(surrogate, student_logits)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # and through GRPO's loss with per-token advantages at ratio 1 (dapo: sum over tokens / number of tokens)
    logp = student_logits.log_softmax(-1)[None]
    loss, _ = grpo_loss(logp, logp.detach(), (weights * advantages)[None] * 5, torch.ones(1, 5, dtype=torch.bool),
                        loss_type="dapo")  # fmt: skip
    (via_loss,) = torch.autograd.grad(loss, student_logits)
    torch.testing.assert_close(via_loss, expected, rtol=1e-12, atol=1e-12)


def stage(teacher_is_student: bool):
    torch.manual_seed(0)
    student = Transformer(TINY)
    teacher = copy.deepcopy(student) if teacher_is_student else Transformer(TINY)
    train = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=2, weight_decay=0.0)  # decay would move weights anyway
    engine = Engine(student, train, log=lambda m: None)
    task = make_task("arithmetic", digits=1)
    task.max_new_tokens = 8
    return OnPolicyDistill(engine, ByteTokenizer(), task, teacher, DistillConfig(mode="on-policy", group_size=2))


def test_with_teacher_equal_to_student_the_advantage_is_zero_and_nothing_moves():
    s = stage(teacher_is_student=True)
    before = [p.detach().clone() for p in s.model.parameters()]
    metrics = s.step(0)
    assert metrics["reverse_kl"] == 0.0 and metrics["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, s.model.parameters(), strict=True))
    moved = stage(teacher_is_student=False)
    m = moved.step(0)
    assert m["reverse_kl"] != 0.0 and m["grad_norm"] > 0 and m["teacher_flops"] > 0


def test_rejection_sampling_keeps_only_verified_distinct_traces(tmp_path, monkeypatch):
    task = make_task("arithmetic", digits=1)
    task.max_new_tokens = 16
    problems = [task.problem("train", 0, i) for i in range(3)]
    answers = {task.prompt(p): p.answer for p in problems}
    calls = iter(range(10_000))

    def fake_complete(model, tokenizer, prompts, max_new_tokens, **sampling):
        # each problem's 4 samples: right, right again (a duplicate), wrong, right with other reasoning
        out = []
        for prompt in prompts:
            k = next(calls) % 4
            right, wrong = "{}</think>\n<answer>{}</answer>", "b</think>\n<answer>-9</answer>"
            text = [right.format("a", answers[prompt]), right.format("a", answers[prompt]), wrong,
                    right.format("c", answers[prompt])][k]  # fmt: skip
            out.append(list(text.encode()))
        return [list(p.encode()) for p in prompts], out, [True] * len(prompts)

    monkeypatch.setattr(distill, "complete", fake_complete)
    cfg = DistillConfig(problems=3, samples=4, keep=2)
    stats = rejection_sample(Transformer(TINY), ByteTokenizer(), task, cfg, tmp_path / "t.jsonl", teacher_name="T")
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert stats["kept"] == len(rows) == 6 and stats["problems_solved"] == 3 and stats["acceptance"] == 6 / 12
    assert all(r["completion"].startswith(("a", "c")) and r["teacher"] == "T" and r["samples"] == 4 for r in rows)
    assert len({(r["problem"], r["completion"]) for r in rows}) == 6  # distinct per problem
    for r in rows:  # every kept trace verifies against its own problem
        p = problems[r["problem"]]
        assert r["completion"].endswith(f"<answer>{p.answer}</answer>") and r["prompt"] == task.prompt(p)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    args = ["sft", "--preset", "demo", "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set",
            "train.steps=30", "--set", "train.warmup_steps=1", "--set", "train.batch_size=16",
            "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_distill_both_modes_end_to_end_and_sft_reads_the_traces(tmp_path, teacher_run, capsys):
    small = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "train.steps=3", "--set",
             "train.warmup_steps=1", "--set", "train.batch_size=4", "--no-progress"]  # fmt: skip
    common = ["distill", "--teacher", str(teacher_run), "--preset", "demo", *small]
    assert main([*common, "--mode", "traces", "--set", "distill.problems=16", "--out", str(tmp_path / "d1")]) == 2
    cost = json.loads((tmp_path / "d1" / "traces.json").read_text())
    assert cost["samples"] == 16 * 4 and cost["teacher_flops"] > 0 and cost["kept"] == 0  # 30 SFT steps: no skill
    assert "the teacher solved none of the 16 problems" in capsys.readouterr().err
    assert main([*common, "--mode", "on-policy", "--out", str(tmp_path / "d2")]) == 0
    last = [json.loads(x) for x in (tmp_path / "d2" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"reverse_kl", "teacher_flops", "pass1_greedy"} <= set(last)
    # SFT reads any traces file; an untrained teacher solves nothing, so write one by hand
    task = make_task("arithmetic", digits=1, n_operands=3)
    rows = [{"prompt": task.prompt(p), "completion": f"{p.reasoning}</think>\n<answer>{p.answer}</answer>"}
            for p in (task.problem("train", 0, i) for i in range(8))]  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = ["sft", "--init", str(teacher_run), "--data", str(tmp_path / "t.jsonl"), "--set", "train.steps=2"]
    assert main([*sft, "--no-progress", "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["distill", "--preset", "demo", "--out", str(tmp_path / "d3"), *small]) == 2
    assert "no teacher: pass --teacher CKPT" in capsys.readouterr().err
