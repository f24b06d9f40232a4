"""CPU threads for training: how many, chosen when the engine is built.

``train.threads = N`` uses N intra-op threads. ``0`` (automatic) keeps torch's default (one per core) unless other
processes are running right now: then it uses the cores they leave free, at least one. On a 2-core machine beside
two busy processes, the demo's training step took 3.6× its idle time on two threads and 2.4× on one
(benchmarks/shared_machine.py; docs/LOG.md, "Threads on a shared machine"): two threads that must meet at every
operation wait for the one the scheduler took away. Runs of several processes (torchrun) keep torch's default.
The count can change the last bits of a result, so a bitwise-exact resume wants a fixed ``train.threads``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

STAT = Path("/proc/stat")
OWN = Path("/proc/self/task")


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


def configure_threads(threads: int, world: int = 1, log: Callable[[str], None] | None = None) -> int:
    """Set the intra-op thread count and return it: ``threads`` > 0 exactly, 0 automatically (see above)."""
    if threads:
        torch.set_num_threads(threads)
        return threads
    current = torch.get_num_threads()
    if world > 1 or current <= 1:
        return current
    others = busy_elsewhere()
    chosen = max(1, min(current, len(os.sched_getaffinity(0)) - others))
    if chosen < current:
        torch.set_num_threads(chosen)
        if log is not None:
            log(f"{others} other task(s) running: training on {chosen} of {current} threads (train.threads=N fixes it)")
    return chosen
