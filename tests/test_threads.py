"""Automatic thread count (nanoseek/train/threads.py): torch's default, lowered to the cores other processes leave."""

import subprocess
import sys
import time

import pytest
import torch

from nanoseek.train import threads
from nanoseek.train.threads import busy_elsewhere, configure_threads, running_tasks


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def fake_proc(tmp_path, running: int, states: str):
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  1 2 3 4\nprocs_running {running}\nprocs_blocked 0\n")
    own = tmp_path / "task"
    for i, state in enumerate(states):
        (own / str(i)).mkdir(parents=True)
        (own / str(i) / "stat").write_text(f"{i} (py thon) {state} 1 2 3\n")  # a name with a space, as comm may have
    return stat, own


def test_counts_other_processes_only(tmp_path):
    stat, own = fake_proc(tmp_path, running=5, states="RSRS")  # two of ours running: 3 others
    assert running_tasks(stat, own) == (5, 2)
    assert busy_elsewhere(samples=2, interval=0, stat=stat, own=own) == 3
    assert busy_elsewhere(samples=1, stat=tmp_path / "absent", own=own) == 0  # no /proc: assume an idle machine


@pytest.mark.parametrize(("busy", "expected"), [(0, 2), (1, 1), (5, 1)])
def test_automatic_leaves_the_busy_cores(monkeypatch, two_threads, busy, expected):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    said = []
    assert configure_threads(0, log=said.append) == expected == torch.get_num_threads()
    assert bool(said) == (expected < 2)


def test_fixed_and_distributed_counts_are_kept(monkeypatch, two_threads):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 9)
    assert configure_threads(0, world=2) == 2 == torch.get_num_threads()  # torchrun: every rank keeps the default
    assert configure_threads(3) == 3 == torch.get_num_threads()  # an explicit train.threads, even with load


def test_sees_a_busy_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_elsewhere() >= 1  # a spinning process is runnable at every sample, scheduled or not
    finally:
        spinner.kill()
        spinner.wait()
