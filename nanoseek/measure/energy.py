"""Energy meters: the joules training used, measured where the hardware exposes a counter, estimated otherwise.

``select_meter`` tries, in order:

* **NVML** — the GPU's total-energy counter (NVIDIA Volta and newer), when training on CUDA and ``pynvml`` is
  installed. Measured, GPU only: the host CPU is not included.
* **RAPL** — the CPU package counters in ``/sys/class/powercap/intel-rapl:N`` (Intel, and AMD Zen with the same
  driver), when ``energy_uj`` is readable (many kernels make it root-only). Measured, the whole package: on a shared
  machine it includes every other process running on it.
* **Estimate** — process CPU seconds × watts per core (``DEFAULT_WATTS_PER_CORE`` unless set). Labelled estimated;
  it is proportional to CPU time, so it adds a unit, not information.

Every meter's ``read()`` returns joules since the meter was made; callers take differences (the trainer's Clock
reads the meter when it starts and stops, so energy covers exactly the timed training).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

DEFAULT_WATTS_PER_CORE = 5.0
"""Watts per busy core for the estimate: TDP ÷ cores of current server CPUs is 3.5–7 W (e.g. 280 W / 64 cores =
4.4 W, 350 W / 56 cores = 6.3 W), laptop CPUs are similar. A rough figure: set your own with watts_per_core."""

POWERCAP = Path("/sys/class/powercap")
_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")  # top-level zones; sub-zones (intel-rapl:0:0, cores, dram) are inside


class EnergyMeter:
    """Cumulative joules since creation. ``method`` is 'measured' or 'estimated'; ``source`` says from what."""

    method: str
    source: str

    def read(self) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.method, "source": self.source}


class CpuTimeMeter(EnergyMeter):
    """Estimate: process CPU seconds (all threads) × watts per core."""

    method = "estimated"

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE, note: str = ""):
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core={watts_per_core!r} is invalid: expected a positive number of watts")
        self.watts = watts_per_core
        self.source = f"process CPU seconds × {watts_per_core:g} W per core" + (f"; {note}" if note else "")
        self._t0 = time.process_time()

    def read(self) -> float:
        return (time.process_time() - self._t0) * self.watts


class RaplMeter(EnergyMeter):
    """Sum of the RAPL package counters (µJ), unwrapped: each counter restarts from 0 after max_energy_range_uj."""

    method = "measured"

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self.last = [self._raw(z) for z in zones]
        self.total_uj = 0
        names = ", ".join(f"{z.name} ({(z / 'name').read_text().strip()})" for z in zones)
        self.source = f"RAPL {names}: whole CPU package, including other processes"

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read(self) -> float:
        for i, zone in enumerate(self.zones):
            raw = self._raw(zone)
            delta = raw - self.last[i]
            if delta < 0:  # wrapped since the last read (at most once: reads are far apart from a full range)
                delta += self.ranges[i]
            self.total_uj += delta
            self.last[i] = raw
        return self.total_uj / 1e6


class NvmlMeter(EnergyMeter):
    """NVML's total-energy counter (mJ since the driver loaded) of the given GPU handles."""

    method = "measured"

    def __init__(self, nvml, handles: list, names: list[str]):
        self.nvml, self.handles = nvml, handles
        self.start = [nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles]
        self.source = f"NVML energy counter of {', '.join(names)} (GPU only, not the host CPU)"

    def read(self) -> float:
        now = [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        return sum(b - a for a, b in zip(self.start, now, strict=True)) / 1e3


def rapl_zones(root: Path = POWERCAP) -> list[Path]:
    """Readable top-level RAPL package zones (psys and MMIO duplicates are left out: they would double count)."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
        if not _PACKAGE_ZONE.fullmatch(zone.name):
            continue
        try:
            if not (zone / "name").read_text().strip().startswith("package"):
                continue
            int((zone / "energy_uj").read_text())
            int((zone / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue  # absent or root-only
        zones.append(zone)
    return zones


def nvml_meter(device_index: int) -> NvmlMeter | None:
    """A meter on the CUDA device torch calls ``device_index`` (matched to NVML by UUID), or None when pynvml,
    the GPU or its energy counter is unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    import torch

    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device_index)
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
        return NvmlMeter(pynvml, [handle], [props.name])
    except (pynvml.NVMLError, RuntimeError):  # no driver or GPU, or a GPU without the energy counter
        return None


def select_meter(
    device_type: str, watts_per_core: float = DEFAULT_WATTS_PER_CORE, powercap: Path = POWERCAP, device_index: int = 0
) -> EnergyMeter:
    """The best meter available for training on ``device_type`` ('cpu' or 'cuda')."""
    if device_type == "cuda":
        meter = nvml_meter(device_index)
        if meter is not None:
            return meter
        return CpuTimeMeter(watts_per_core, note="GPU energy NOT included (no NVML energy counter: install pynvml)")
    zones = rapl_zones(powercap)
    if zones:
        return RaplMeter(zones)
    return CpuTimeMeter(watts_per_core)
