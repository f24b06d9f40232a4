"""CPU threads for training: how many, chosen once per process."""

from __future__ import annotations

import torch


def configure_threads(threads: int) -> None:
    """``threads`` > 0: use that many intra-op threads; 0: keep torch's default (one per core)."""
    if threads:
        torch.set_num_threads(threads)
