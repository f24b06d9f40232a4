"""CPU threads for training: how many, chosen when the engine is built.

``train.threads = N`` uses N intra-op threads. ``0`` (automatic) keeps torch's default (one per core) unless other
processes are running right now and OpenMP's threads spin while they wait (nanoseek/openmp.py): then it uses the
cores those processes leave free, at least one. Two threads that must meet at every operation wait for the one the
scheduler took away; beside two busy processes on two cores they fell into seconds-long stretches of 4-second demo
steps (docs/LOG.md, "Threads on a shared machine"; which wait those runs used is not on record). Threads that sleep
at once (``OMP_WAIT_POLICY=PASSIVE``, which nanoseek sets when it is imported beside busy processes) showed no such
stretch in 180 steps, and two of them took 0.42–0.53 s a step against one spinning thread's 0.58–0.60 s (docs/LOG.md,
"Sleeping threads beside busy processes"): then all threads are kept. Runs of several processes (torchrun) keep
torch's default. The count can change the last bits of a result, so a bitwise-exact resume wants a fixed
``train.threads``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from nanoseek.openmp import busy_elsewhere, waits_passively


def configure_threads(threads: int, world: int = 1, log: Callable[[str], None] | None = None) -> int:
    """Set the intra-op thread count and return it: ``threads`` > 0 exactly, 0 automatically (see above)."""
    if threads:
        torch.set_num_threads(threads)
        return threads
    current = torch.get_num_threads()
    if world > 1 or current <= 1:
        return current
    others = busy_elsewhere()
    if others and waits_passively():
        if log is not None:
            log(
                f"{others} other task(s) running: training on all {current} threads, which sleep while they wait "
                "(OMP_WAIT_POLICY=PASSIVE; train.threads=N fixes the count)"
            )
        return current
    chosen = max(1, min(current, len(os.sched_getaffinity(0)) - others))
    if chosen < current:
        torch.set_num_threads(chosen)
        if log is not None:
            log(f"{others} other task(s) running: training on {chosen} of {current} threads (train.threads=N fixes it)")
    return chosen
