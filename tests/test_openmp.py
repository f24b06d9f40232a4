"""The OpenMP wait nanoseek chooses (nanoseek/openmp.py): a short spin on an idle machine, sleeping at once beside
busy processes, and nothing when the user chose."""

import os
import subprocess
import sys
import time

import pytest

from nanoseek import openmp
from nanoseek.openmp import busy_elsewhere, choose_openmp, running_tasks, waits_passively

WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NANOSEEK_OPENMP")


@pytest.fixture
def clean(monkeypatch):
    """No wait setting in the environment, and nanoseek's record of its choice restored afterwards."""
    for name in WAIT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(openmp, "chosen", openmp.chosen)
    monkeypatch.setattr(openmp, "_set_too_late", openmp._set_too_late)
    return monkeypatch


@pytest.mark.parametrize(
    ("given", "busy", "expected"),
    [
        ({}, 0, (None, "10000")),  # an idle machine: a short spin
        ({}, 2, ("PASSIVE", None)),  # busy processes: sleep at once
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, ("ACTIVE", None)),  # the user's wait policy wins
        ({"OMP_WAIT_POLICY": "PASSIVE"}, 0, ("PASSIVE", None)),  # a spin count would override PASSIVE: none is set
        ({"GOMP_SPINCOUNT": "500"}, 2, (None, "500")),  # the user's spin count wins
        ({"NANOSEEK_OPENMP": "keep"}, 2, (None, None)),  # the environment left exactly as it is
    ],
)
def test_wait_policy(clean, given, busy, expected):
    for name, value in given.items():
        clean.setenv(name, value)
    choose_openmp(busy=busy)
    assert (os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")) == expected
    assert openmp.chosen == (None if given else ("OMP_WAIT_POLICY=PASSIVE" if busy else "GOMP_SPINCOUNT=10000"))


@pytest.mark.parametrize(
    ("policy", "spin", "expected"),
    [("PASSIVE", None, True), ("passive ", None, True), ("PASSIVE", "0", True), ("PASSIVE", "10000", False),
     ("ACTIVE", None, False), (None, None, False), (None, "0", False)],
)  # fmt: skip
def test_waits_passively_reads_what_openmp_reads(clean, policy, spin, expected):
    clean.setattr(openmp, "_set_too_late", False)  # as in a process that imported nanoseek before torch
    for name, value in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin)):
        if value is not None:
            clean.setenv(name, value)
    assert waits_passively() is expected


def test_a_choice_made_after_torch_loaded_does_not_count(clean):
    """In this process torch is already imported: the PASSIVE nanoseek sets now reaches child processes only."""
    assert "torch" in sys.modules
    choose_openmp(busy=3)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and not waits_passively()
    clean.setattr(openmp, "_set_too_late", False)  # the same choice made before torch loaded
    assert waits_passively()


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


def test_sees_a_busy_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_elsewhere() >= 1  # a spinning process is runnable at every sample, scheduled or not
    finally:
        spinner.kill()
        spinner.wait()


SPY = (
    "import os, sys\n"
    "class Spy:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' and not hasattr(sys, 'seen'):\n"
    "            sys.seen = (os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\n"
    "sys.meta_path.insert(0, Spy())\n"
    "import nanoseek, nanoseek.openmp, nanoseek.train.threads\n"
    "print(*sys.seen, nanoseek.openmp.chosen, nanoseek.openmp.waits_passively())\n"
)


def test_set_before_torch_loads():
    """Importing nanoseek chooses the wait before torch (and with it OpenMP) is imported: a finder records the
    environment at the moment torch's import starts. Whether this machine is busy now decides which setting."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT}
    out = subprocess.run([sys.executable, "-c", SPY], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() in (
        ["None", "10000", "GOMP_SPINCOUNT=10000", "False"],
        ["PASSIVE", "None", "OMP_WAIT_POLICY=PASSIVE", "True"],
    )


def test_passive_beside_a_busy_process():
    """With a process spinning beside it, nanoseek's import sets OMP_WAIT_POLICY=PASSIVE before torch loads."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        out = subprocess.run([sys.executable, "-c", SPY], env=env, capture_output=True, text=True, check=True)
    finally:
        spinner.kill()
        spinner.wait()
    assert out.stdout.split() == ["PASSIVE", "None", "OMP_WAIT_POLICY=PASSIVE", "True"]
