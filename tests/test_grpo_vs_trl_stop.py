"""The GRPO benchmark's stopping rule (benchmarks/grpo_vs_trl.py): a run may end early only once its windowed
reward has reached the target and it has taken --min-steps steps, and the time to the reward is the same whether
the run went on or not; and how the first steps' extra time is split between sampling and the update."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from grpo_vs_trl import compile_seconds, compile_split, run_is_done, steps_to_reward, time_to_reward  # noqa: E402


def args(min_steps: int, target: float = 0.5, window: int = 3) -> argparse.Namespace:
    return argparse.Namespace(min_steps=min_steps, target=target, window=window)


def test_the_reward_is_reached_at_the_end_of_the_first_window_whose_mean_reaches_the_target():
    rewards = [0.0, 0.4, 0.6, 0.5, 0.9, 0.1]
    assert steps_to_reward(rewards, 0.5, 3) == 4  # (0.4 + 0.6 + 0.5) / 3 = 0.5; (0 + 0.4 + 0.6) / 3 < 0.5
    assert steps_to_reward(rewards, 0.7, 3) is None  # the best window is (0.6 + 0.5 + 0.9) / 3 = 0.667
    assert steps_to_reward(rewards[:2], 0.0, 3) is None  # fewer steps than one window
    assert time_to_reward([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], rewards, 0.5, 3) == 10.0


def test_a_run_stops_only_after_reaching_the_target_and_min_steps():
    reached_at_4 = [0.0, 0.4, 0.6, 0.5]
    assert not run_is_done(reached_at_4, args(min_steps=6))  # reached, but too few steps for the step time
    assert run_is_done(reached_at_4 + [0.0, 0.0], args(min_steps=6))  # reached at 4: still reached at 6
    assert run_is_done(reached_at_4, args(min_steps=4))
    assert not run_is_done([0.0] * 50, args(min_steps=4))  # never reached: the run goes on to --steps
    assert not run_is_done(reached_at_4 * 10, args(min_steps=0))  # 0: every run takes --steps


def test_stopping_early_keeps_the_time_to_the_reward():
    rewards = [0.1, 0.2, 0.6, 0.7, 0.8, 0.3, 0.9, 0.9]
    times = [float(i + 1) for i in range(len(rewards))]
    a = args(min_steps=5)
    stop = next(n for n in range(1, len(rewards) + 1) if run_is_done(rewards[:n], a))
    assert stop == 5
    assert time_to_reward(times[:stop], rewards[:stop], a.target, a.window) == time_to_reward(
        times, rewards, a.target, a.window
    )


def test_the_first_steps_extra_time_is_split_between_sampling_and_the_update():
    times = [5.0, 1.5, 1.0, 1.0, 1.2, 1.0]  # after 2 warm-up steps the median step is 1.0 s
    sampling = [0.5, 0.5, 0.4, 0.4, 0.6, 0.4]  # median 0.4 s: the first two steps' sampling paid 0.2 s extra
    assert compile_seconds(times, 2) == 4.5  # 6.5 s against 2 x 1.0 s
    assert compile_split(times, sampling, 2) == pytest.approx((0.2, 4.3), abs=1e-12)  # the update: 4.3 s
    assert compile_split([1.0] * 4, [0.3] * 4, 1) == (0.0, 0.0)  # no step slower than the median: nothing extra
