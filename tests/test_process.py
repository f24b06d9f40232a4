"""Process rewards against DeepSeekMath §4.1.3, by hand: steps found and checked exactly, group normalisation over
all steps, each token's advantage the sum of the normalised rewards of the steps ending at or after it."""

import math

import pytest
import torch

from nanoseek.data.tasks import make_task
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.rl.grpo import GRPOConfig, grpo_loss
from nanoseek.rl.process import process_advantages, rollout_steps, scored_steps, step_tokens


def test_steps_are_the_equations_of_the_think_block_then_the_answer():
    text = "3+4=7 7-2=6 10/4=5/2 2*3=6</think>\n<answer>5</answer> 1+1=2"
    steps = scored_steps(text, answer_right=True)
    # 3+4=7 true, 7-2=6 false, "10/4=5" false (the /2 after it is not part of a step), 2*3=6 true; then the answer
    assert [r for _, r in steps] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert [text[:e] .endswith(x) for (e, _), x in zip(steps, ["3+4=7", "7-2=6", "10/4=5", "2*3=6", "</answer>"],
                                                         strict=True)] == [True] * 5  # fmt: skip
    assert scored_steps("12/0=0 </think><answer>1</answer>", answer_right=False) == [(6, 0.0), (33, 0.0)]
    assert scored_steps("no steps and no answer", answer_right=False) == []
    assert scored_steps("99999999999999+1=100000000000000", False) == []  # 14-digit operands are not steps


def test_step_ends_map_to_the_token_that_completes_them():
    tok = ByteTokenizer()
    text = "é1+1=2"  # é is two bytes: characters and tokens differ
    ids = tok.encode(text)
    assert step_tokens(tok, ids, scored_steps(text, False)) == [(6, 1.0)]  # the last byte, '2', is token 6


def test_process_advantages_by_hand():
    # one group of two completions, 5 tokens each. Completion 0: steps ending at tokens 1 (reward 1) and 3 (reward 0);
    # completion 1: one step ending at token 2 (reward 1). R = [1, 0, 1]: mean 2/3, std sqrt(2)/3.
    steps = [[(1, 1.0), (3, 0.0)], [(2, 1.0)]]
    adv = process_advantages(steps, group_size=2, n_tokens=5, eps=0.0)
    up, down = (1 - 2 / 3) / (math.sqrt(2) / 3), (0 - 2 / 3) / (math.sqrt(2) / 3)  # +0.7071, -1.4142
    expected = torch.tensor([[up + down, up + down, down, down, 0.0], [up, up, up, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    # a group whose steps are all equally rewarded teaches nothing; a second group is normalised on its own
    same = process_advantages([[(0, 1.0)], [(1, 1.0)], [(0, 1.0)], [(1, 0.0)]], group_size=2, n_tokens=2, eps=0.0)
    assert same[:2].abs().sum() == 0 and same[2:].abs().sum() > 0


def test_rollout_steps_check_each_completion_against_its_own_problem():
    task = make_task("arithmetic", digits=1, n_operands=3)
    p = task.problem("train", 0, 0)
    right = f"{p.reasoning}</think>\n<answer>{p.answer}</answer>"
    wrong = f"{p.reasoning}</think>\n<answer>{int(p.answer) + 1}</answer>"
    tok = ByteTokenizer()
    steps = rollout_steps(task, tok, [right, wrong], [tok.encode(right), tok.encode(wrong)],
                          {"target": [p.fields["target"]] * 2})  # fmt: skip
    assert [r for _, r in steps[0]] == [1.0, 1.0, 1.0] and [r for _, r in steps[1]] == [1.0, 1.0, 0.0]


def test_token_advantages_enter_the_loss_token_by_token():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type="dapo")
    loss.backward()
    # ratio 1 everywhere: d(-J)/d log π = -A / (number of tokens), masked tokens excluded
    torch.testing.assert_close(logp.grad, -adv * mask / 4)
    with pytest.raises(ValueError, match="gspo' is invalid with per-token advantages"):
        grpo_loss(logp, logp.detach(), adv, mask, loss_type="gspo")
    with pytest.raises(ValueError, match="advantage='process' is invalid with loss_type='gspo'"):
        GRPOConfig(advantage="process", loss_type="gspo")


def test_a_grpo_step_with_process_advantages_updates_the_policy():
    from nanoseek import ModelConfig, Transformer
    from nanoseek.rl.grpo import GRPO
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.engine import Engine

    torch.manual_seed(0)
    engine = Engine(Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64)),
                    TrainConfig(lr=1e-3, warmup_steps=0, batch_size=2), log=lambda m: None)  # fmt: skip
    task = make_task("arithmetic", digits=1)
    task.max_new_tokens = 12
    stage = GRPO(engine, ByteTokenizer(), task, GRPOConfig(group_size=4, advantage="process"))
    sampled, kept = stage.collect()
    # plant one verified step in a completion, so the group has steps with different rewards
    rollout = kept[0]
    rollout.completions[0] = "1+1=2 1+1=3"
    rollout.completion_ids[0] = ByteTokenizer().encode(rollout.completions[0])
    adv = stage.advantages(rollout, max(len(c) for c in rollout.completion_ids))
    assert adv.shape[0] == 8 and adv[0, 5] < 0 < adv[0, 4] - adv[0, 5]  # after the true step only the false one
    before = [p.detach().clone() for p in engine.model.parameters()]
    stage.update(rollout)
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters(), strict=True))
