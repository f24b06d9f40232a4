"""OpenMP's environment, chosen before torch is imported (OpenMP reads it once, when its library loads).

nanoseek asks OpenMP's worker threads to sleep when they run out of work (``OMP_WAIT_POLICY=PASSIVE``) instead of
spinning for it, libgomp's default. On a machine shared with other work, spinning threads hold cores that other
processes need, and a thread descheduled mid-operation makes the others spin for it. Measured with
``benchmarks/shared_machine.py`` (the demo model's training step, 2 threads, 2-core machine; docs/LOG.md): with two
busy processes beside it a step took 19.6× its idle time with torch's defaults and 3.6× with passive waiting, and
on the idle machine passive waiting was not slower (0.93× the default's step time).

Any wait setting of the user's (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) wins, and ``NANOSEEK_OPENMP=keep`` leaves
the environment exactly as it is. Importing torch before nanoseek loads OpenMP first: then this has no effect on
the current process (child processes still inherit the setting).
"""

from __future__ import annotations

import os

USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def choose_openmp() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a wait setting or NANOSEEK_OPENMP=keep."""
    if os.environ.get("NANOSEEK_OPENMP") == "keep":
        return
    if any(name in os.environ for name in USER_SETTINGS):
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
