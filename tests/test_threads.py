"""Automatic thread count (nanoseek/train/threads.py): torch's default, lowered to the cores other processes leave
when OpenMP's threads spin while they wait, kept when they sleep."""

import pytest
import torch

from nanoseek.train import threads
from nanoseek.train.threads import configure_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("busy", "expected"), [(0, 2), (1, 1), (5, 1)])
def test_automatic_leaves_the_busy_cores(monkeypatch, two_threads, busy, expected):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
    monkeypatch.setattr(threads, "waits_passively", lambda: False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    said = []
    assert configure_threads(0, log=said.append) == expected == torch.get_num_threads()
    assert bool(said) == (expected < 2)


@pytest.mark.parametrize("busy", [0, 1, 5])
def test_sleeping_threads_are_all_kept(monkeypatch, two_threads, busy):
    """Threads that sleep while they wait (OMP_WAIT_POLICY=PASSIVE) do not hold a busy machine's cores: all stay."""
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
    monkeypatch.setattr(threads, "waits_passively", lambda: True)
    said = []
    assert configure_threads(0, log=said.append) == 2 == torch.get_num_threads()
    assert [("all 2 threads" in line and "PASSIVE" in line) for line in said] == ([True] if busy else [])


def test_fixed_and_distributed_counts_are_kept(monkeypatch, two_threads):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 9)
    assert configure_threads(0, world=2) == 2 == torch.get_num_threads()  # torchrun: every rank keeps the default
    assert configure_threads(3) == 3 == torch.get_num_threads()  # an explicit train.threads, even with load
