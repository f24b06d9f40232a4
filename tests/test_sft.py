"""SFT batches: loss only on target tokens, padding and packing to seq_len; a few steps teach the answer format."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.examples import TaskExamples
from nanoseek.data.tasks import make_task
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine
from nanoseek.train.sft import SFT, sft_batch

TOK = ByteTokenizer()


def codes(text):
    return list(text.encode())


def test_targets_cover_only_the_target_tokens_shifted_by_one():
    idx, targets, real = sft_batch(TOK, [("ab", "cd"), ("xyz", "w")], seq_len=16)
    # "ab"+"cd": inputs a b c, targets (ignored) c d ; "xyz"+"w": inputs x y z, targets (ignored ignored) w
    assert idx.tolist() == [codes("abc"), codes("xyz")]
    assert targets.tolist() == [[-1] + codes("cd"), [-1, -1] + codes("w")]
    assert real.all()


def test_rows_are_right_padded_and_padding_is_ignored():
    idx, targets, real = sft_batch(TOK, [("a", "bcdef"), ("x", "y")], seq_len=16, pad_id=0)
    assert idx.tolist() == [codes("abcde"), codes("x") + [0, 0, 0, 0]]
    assert targets.tolist() == [codes("bcdef"), codes("y") + [-1, -1, -1, -1]]
    assert real.tolist() == [[True] * 5, [True] + [False] * 4]


def test_packing_places_whole_examples_in_a_row_while_they_fit():
    examples = [("ab", "cd"), ("ef", "g"), ("hi", "jk")]  # 3, 2 and 3 positions
    idx, targets, _ = sft_batch(TOK, examples, seq_len=5, pack=True)
    assert idx.tolist() == [codes("abcef"), codes("hij") + [0, 0]]
    assert targets.tolist() == [[-1] + codes("cd") + [-1] + codes("g"), [-1] + codes("jk") + [-1, -1]]
    assert int((targets >= 0).sum()) == 2 + 1 + 2  # every target token scored exactly once


def test_an_example_longer_than_seq_len_is_a_clear_error():
    with pytest.raises(ValueError, match="example 1 is invalid: 9 positions are longer than seq_len=8"):
        sft_batch(TOK, [("a", "b"), ("abcde", "fghij")], seq_len=8)
    with pytest.raises(ValueError, match="example 0 is invalid: prompt and target must both be non-empty"):
        sft_batch(TOK, [("a", "")], seq_len=8)


def test_cold_start_examples_are_deterministic_and_in_the_template_format():
    task = make_task("countdown")
    a, b = TaskExamples(task, seed=3).train(0, 5), TaskExamples(task, seed=3).train(0, 5)
    assert a == b and a[0][0].endswith("\n<think>") and a[0][1].endswith("</answer>")
    assert TaskExamples(task, seed=3).train(2, 3) == a[2:]  # a stream: any window of it is the same examples
    held = TaskExamples(task).held_out(5)
    assert {task.split_of(task.problem("test", 0, 0))} == {"test"} and len(held) == 5


def test_a_few_sft_steps_on_the_engine_lower_the_target_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64)
    train = TrainConfig(lr=1e-2, batch_size=16, warmup_steps=0, schedule="constant", weight_decay=0.0)
    engine = Engine(Transformer(cfg), train, log=lambda message: None)
    stage = SFT(engine, TOK, TaskExamples(make_task("arithmetic", digits=1)), seq_len=64)
    losses = [stage.step(i)["train_loss"] for i in range(40)]
    assert losses[0] > 5.0 and losses[-1] < 1.5, losses
    assert 0 < stage.evaluate()["val_loss"] < 1.5
