"""OpenMP's environment, chosen before torch is imported (OpenMP reads it once, when its library loads).

nanoseek's choice can be switched off with NANOSEEK_OPENMP=keep; any OMP_* / GOMP_* variable the user sets wins.
The choice and the measurements behind it: benchmarks/shared_machine.py and docs/LOG.md.
"""

from __future__ import annotations

import os


def choose_openmp() -> None:
    """Leave the environment as it is for now (the default is being measured)."""
    if os.environ.get("NANOSEEK_OPENMP") == "keep":
        return
