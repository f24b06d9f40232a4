"""How much memory a new allocation can get: what the size bounds (nanoseek.train.bounds, the corpus reader)
compare their estimates with."""

from __future__ import annotations

import os


def available_memory() -> int:
    """Bytes the kernel says a new allocation can get (MemAvailable), else the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"
