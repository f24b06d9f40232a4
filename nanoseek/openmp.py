"""OpenMP's environment, chosen before torch is imported (OpenMP reads it once, when its library loads).

libgomp's worker threads wait for the next parallel region by spinning (300,000 rounds by default) before they
sleep. On a machine shared with other work, spinning threads hold cores that other processes need, and a thread
descheduled mid-operation makes the others spin for it: with two busy processes beside it, the demo model's
training step took 9–20× its idle time with torch's defaults (``benchmarks/shared_machine.py``, 2 threads on a
2-core machine; docs/LOG.md). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) fixes that, but costs an idle machine
a wake-up for every parallel region: at B=8, T=256, C=256 an eager step took 1.24× the default's time (nine paired
runs, every one slower), where a short spin of 10,000 rounds took 1.07×. So nanoseek looks at the machine as it is
imported:

* other processes running (``busy_elsewhere``: tasks of other processes runnable in each of three looks 10 ms
  apart): ``OMP_WAIT_POLICY=PASSIVE``. Beside two busy processes on two cores, two passive threads took 0.42–0.53 s
  a demo step against one spinning thread's 0.58–0.60 s (three rounds of 60 steps, no step above 0.61 s; docs/LOG.md,
  "Sleeping threads beside busy processes"), and the engine then keeps its threads (nanoseek/train/threads.py);
* an idle machine: ``GOMP_SPINCOUNT=10000``. Threads spin through the short gaps between one operation's parallel
  region and the next, and sleep when the gap is longer, as it is when other processes start later. Those find two
  threads that spin a little (loaded, 2.3–5× the idle step against the default's 9–20×); the engine drops to the
  cores they leave if they are already running when it starts.

Any wait setting of the user's (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) wins, and ``NANOSEEK_OPENMP=keep`` leaves
the environment exactly as it is. Importing torch before nanoseek loads OpenMP first: then the setting still goes to
child processes but has no effect on the current one, and ``waits_passively`` does not count it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = "10000"
STAT = Path("/proc/stat")
OWN = Path("/proc/self/task")

chosen: str | None = None  # what nanoseek set, e.g. "GOMP_SPINCOUNT=10000"; None when it set nothing
_set_too_late = False  # nanoseek chose a wait setting after torch had loaded OpenMP: it does not apply here


def running_tasks(stat: Path = STAT, own: Path = OWN) -> tuple[int, int] | None:
    """(tasks runnable on the machine now, those of them that are this process's threads), or None where /proc
    cannot be read. The first is ``procs_running`` of /proc/stat, which counts the reader itself."""
    try:
        total = next(
            int(line.split()[1]) for line in stat.read_text().splitlines() if line.startswith("procs_running ")
        )
        mine = 0
        for task in own.iterdir():
            try:
                mine += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue  # a thread that ended while we looked
    except (OSError, StopIteration, ValueError):
        return None
    return total, max(mine, 1)


def busy_elsewhere(samples: int = 5, interval: float = 0.02, stat: Path = STAT, own: Path = OWN) -> int:
    """How many tasks of other processes are running now: the fewest over a few samples (a process that runs only
    now and then is not counted as busy); 0 where /proc cannot be read. This process's own threads (OpenMP workers
    still spinning after an operation) are not counted."""
    counts = []
    for i in range(samples):
        seen = running_tasks(stat, own)
        if seen is None:
            return 0
        counts.append(seen[0] - seen[1])
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, min(counts))


def choose_openmp(busy: int | None = None) -> None:
    """Set OpenMP's wait for this process and its children: ``OMP_WAIT_POLICY=PASSIVE`` when other processes are
    running (``busy``, counted by ``busy_elsewhere`` when not given), else ``GOMP_SPINCOUNT=10000``; nothing when
    the user chose a wait setting or NANOSEEK_OPENMP=keep."""
    global chosen, _set_too_late
    chosen, _set_too_late = None, False
    if os.environ.get("NANOSEEK_OPENMP") == "keep":
        return
    if any(name in os.environ for name in USER_SETTINGS):
        return
    if busy is None:
        busy = busy_elsewhere(samples=3, interval=0.01)
    name, value = ("OMP_WAIT_POLICY", "PASSIVE") if busy else ("GOMP_SPINCOUNT", SPIN_COUNT)
    os.environ[name] = value
    chosen = f"{name}={value}"
    _set_too_late = "torch" in sys.modules


def waits_passively() -> bool:
    """Whether this process's OpenMP threads sleep as soon as they wait: ``OMP_WAIT_POLICY=PASSIVE`` without a spin
    count (which would override it), as the user set it or nanoseek did before torch loaded OpenMP."""
    if _set_too_late:
        return False
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    return passive and os.environ.get("GOMP_SPINCOUNT", "0").strip() in ("", "0")
