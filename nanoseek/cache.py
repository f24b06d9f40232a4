"""nanoseek's cache folder on this machine: extracted corpora, token arrays, built kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where nanoseek caches what it can rebuild ($NANOSEEK_CACHE, else ~/.cache/nanoseek), created if missing."""
    root = os.environ.get("NANOSEEK_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "nanoseek"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
