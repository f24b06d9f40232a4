"""OpenMP's environment, chosen before torch is imported (OpenMP reads it once, when its library loads).

libgomp's worker threads wait for the next parallel region by spinning (300,000 rounds by default) before they
sleep. On a machine shared with other work, spinning threads hold cores that other processes need, and a thread
descheduled mid-operation makes the others spin for it: with two busy processes beside it, the demo model's
training step took 9–20× its idle time with torch's defaults (``benchmarks/shared_machine.py``, 2 threads on a
2-core machine; docs/LOG.md). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) fixes that, but costs an idle machine
a wake-up for every parallel region: at B=8, T=256, C=256 an eager step took 1.24× the default's time (nine paired
runs, every one slower), where a short spin of 10,000 rounds took 1.07×. So nanoseek sets
``GOMP_SPINCOUNT=10000``: threads spin through the short gaps between one operation's parallel region and the
next, and sleep when the gap is longer, as it is when other processes hold the cores (loaded, two threads: 2.3–5×
the idle step against passive's 1.7–3.6× and the default's 9–20×; nanoseek's automatic thread count,
``train.threads = 0``, uses one thread when the engine starts beside busy processes, where no thread waits).

Any wait setting of the user's (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) wins, and ``NANOSEEK_OPENMP=keep`` leaves
the environment exactly as it is. Importing torch before nanoseek loads OpenMP first: then this has no effect on
the current process (child processes still inherit the setting).
"""

from __future__ import annotations

import os

USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = "10000"


def choose_openmp() -> None:
    """Set GOMP_SPINCOUNT=10000 unless the user chose a wait setting or NANOSEEK_OPENMP=keep."""
    if os.environ.get("NANOSEEK_OPENMP") == "keep":
        return
    if any(name in os.environ for name in USER_SETTINGS):
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
