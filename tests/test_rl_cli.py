"""`nanoseek sft`, `nanoseek grpo` and `nanoseek eval`: help, bad input, end to end, exact resume."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import load_run_config, preset_path
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.model import Transformer
from nanoseek.rl.evaluate import wilson_interval
from nanoseek.train.checkpoint import load_checkpoint, save_checkpoint
from nanoseek.train.loop import TIMING_KEYS

# a tiny byte-level model on the demo's task: seconds per run
TINY_MODEL = ["--set", "model.d_model=32", "--set", "model.n_layers=1"]
SFT = ["sft", "--preset", "demo", *TINY_MODEL, "--set", "train.steps=6", "--set", "train.warmup_steps=1",
       "--set", "train.batch_size=8", "--no-progress"]  # fmt: skip
GRPO_SETS = ["--set", "grpo.group_size=4", "--set", "train.batch_size=2", "--set", "task.max_new_tokens=16",
             "--set", "grpo.beta=0.05", "--set", "grpo.format_weight=0.1"]  # fmt: skip


def grpo(init, out, steps, *extra):
    args = ["grpo", "--preset", "demo", "--init", str(init), "--out", str(out), *GRPO_SETS]
    return main([*args, "--set", f"train.steps={steps}", "--no-progress", *extra])


def records(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timing = (*TIMING_KEYS, "gen_tokens_per_s", "train_tokens_per_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    assert main([*SFT, "--out", str(out)]) == 0
    return out


def test_help_explains_the_reasoning_subcommands(capsys):
    for command in ("sft", "grpo", "eval"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--init" in out and "--task" in out and "--samples" in out and "--json" in out
    assert "grpo.loss_type=dapo" in out and "zero-variance fraction" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "sudoku"], "[task] name='sudoku' is invalid: expected one of arithmetic, countdown, gsm"),
        (["--set", "task.digits=0"], "[task] digits=0 is invalid: expected an integer in [1, 9]"),
        (["--set", "grpo.loss_type=ppo"], "[grpo] loss_type='ppo' is invalid"),
        (["--set", "grpo.prompts_per_step=2"], "unknown key grpo.prompts_per_step"),
        (["--set", "model.seq_len=40"], "model.seq_len=40 is too short for task 'arithmetic'"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, capsys, args, message):
    assert main([*SFT, "--out", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_grpo_needs_a_start_and_a_context_that_fits(sft_run, tmp_path, capsys):
    assert main(["grpo", "--preset", "demo", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "--init is required" in capsys.readouterr().err
    # the SFT model has seq_len 64: a 16-token prompt leaves no room for 60 new tokens
    assert grpo(sft_run, tmp_path / "b", 2, "--set", "task.max_new_tokens=60") == 2
    assert "and task.max_new_tokens=60 more are generated" in capsys.readouterr().err
    assert main(["grpo", "--resume", "--out", str(sft_run)]) == 2
    assert "holds a 'sft' run, not 'grpo'" in capsys.readouterr().err


def test_a_pretrained_checkpoint_is_checked_against_the_task(tmp_path, capsys):
    cfg = load_run_config([preset_path("tiny")])  # seq_len 32, no [task] or [grpo], as `nanoseek train` writes
    save_checkpoint(tmp_path / "pre", 1, Transformer(cfg.model).state_dict(), cfg.to_dict(), ByteTokenizer(),
                    {"step": 1})  # fmt: skip
    # no [task] or [grpo] in a pretraining checkpoint: the task comes from --task (a budget of 64 new tokens)
    assert main(["grpo", "--init", str(tmp_path / "pre"), "--task", "arithmetic", "--out", str(tmp_path / "g")]) == 2
    assert "model.seq_len=32 is too short for task 'arithmetic'" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "pre")]) == 2
    assert "has no [task]: pass --task NAME" in capsys.readouterr().err


def test_sft_then_grpo_then_eval_end_to_end(sft_run, tmp_path, capsys):
    sft_metrics = records(sft_run)
    assert [r["step"] for r in sft_metrics] == [1, 2, 3, 4, 5, 6]
    assert sft_metrics[-1]["train_loss"] < sft_metrics[0]["train_loss"]
    assert {"val_loss", "pass1_greedy", "format_greedy"} <= set(sft_metrics[-1])  # the final evaluation
    assert grpo(sft_run, tmp_path / "grpo", 2) == 0
    last = records(tmp_path / "grpo")[-1]
    for key in ("reward_mean", "reward_std", "reward_accuracy", "reward_format", "completion_len", "kl",
                "clip_fraction", "zero_variance_frac", "entropy"):  # fmt: skip
        assert key in last
    assert last["groups_sampled"] == 2 and last["step"] == 2 and "pass1_greedy" in last
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "grpo"), "--n", "6", "--samples", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "arithmetic" and result["n"] == 6 and result["samples"] == 2
    low, high = wilson_interval(result["pass1_greedy"], 6)
    assert (result["pass1_greedy_low"], result["pass1_greedy_high"]) == (low, high)
    assert result["pass1_greedy"] * 6 == round(result["pass1_greedy"] * 6)  # a count out of 6 problems
    assert main(["eval", "--ckpt", str(tmp_path / "grpo"), "--n", "6", "--pass-at-k", "1,4", "--json"]) == 0
    at = json.loads(capsys.readouterr().out)
    assert at["samples"] == 4 and at["pass1"] == pytest.approx(at["pass1_sampled"])  # pass@1 is the sampled rate
    assert at["pass1"] <= at["pass4"] <= at["pass1"] * 4  # more tries never lose, and gain at most k-fold
    with pytest.raises(SystemExit) as refused:  # argparse's own error for a bad value: usage line, exit 2
        main(["eval", "--ckpt", str(tmp_path / "grpo"), "--pass-at-k", "0,2"])
    assert refused.value.code == 2 and "every k must be in 1..4096" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "grpo"), "--n", "4", "--samples", "0"]) == 0
    assert "pass@1 greedy" in capsys.readouterr().out


@pytest.mark.parametrize("overlap", [False, True], ids=["on-policy", "overlap"])
def test_grpo_resume_is_exact_and_round_trips_its_state(sft_run, tmp_path, overlap):
    """With grpo.overlap the first run ends with the next batch pending (its sampling weights saved): the resumed
    run samples it and trains exactly as the straight run did."""
    extra = ["--set", f"grpo.overlap={str(overlap).lower()}"]
    assert grpo(sft_run, tmp_path / "straight", 4, *extra) == 0
    assert grpo(sft_run, tmp_path / "split", 2, *extra) == 0
    state = load_checkpoint(tmp_path / "split").state
    assert state["stage"] == "grpo" and state["step"] == 2
    grpo_state = state["stage_state"]
    assert int(grpo_state["steps_done"]) == 2 and int(grpo_state["problem_index"]) == 4  # 2 steps × 2 prompts
    assert any(k.startswith("reference.") for k in grpo_state)  # β > 0 keeps the reference weights
    assert int(grpo_state.get("sampling_ahead", 0)) == int(overlap)
    assert main(["grpo", "--resume", "--out", str(tmp_path / "split"), "--set", "train.steps=4", "--no-progress"]) == 0
    evaluation = ("format_greedy", "completion_len_greedy", "pass1_greedy")  # the split run also evaluated at step 2
    split, straight = ([{k: v for k, v in r.items() if k not in evaluation} for r in records(tmp_path / run)]
                       for run in ("split", "straight"))  # fmt: skip
    assert split == straight
    a, b = load_checkpoint(tmp_path / "split").weights, load_checkpoint(tmp_path / "straight").weights
    assert all(torch.equal(a[k], b[k]) for k in a)
