"""What every benchmark shares: its result as JSON (``--json PATH``) and the machine-load check.

A result file holds the benchmark's name, the exact command, torch's thread count, the 1-minute load average before
and after, and its rows. A row is one figure with its unit and, when the benchmark has one, its goal and whether the
goal is met (``met`` is None for a figure without a goal). ``benchmarks/bench.py`` runs every benchmark with
``--json`` and ``benchmarks/table.py`` turns the files into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import sys
import time
from pathlib import Path

COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON to PATH")


def require_at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """One line and exit 2 (argparse's error) for the first of these integer flags that is below 1."""
    require_at_least(parser, args, 1, *names)


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimum: float, *names: str) -> None:
    """One line and exit 2 (argparse's error) for the first of these flags below ``minimum`` (a list flag: any of
    its values). Flag names are the attributes' (``new_tokens`` is ``--new-tokens``)."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v < minimum:
                flag = "--" + name.replace("_", "-")
                parser.error(f"{flag}={v} is invalid: expected at least {minimum}")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, flushed to disk, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def setting_line(threads: int, load: float) -> str:
    """The header a benchmark prints: torch's version, its threads, the load, whether bf16 is native here."""
    units = cpu_bf16_units()
    native = f"yes, {units}" if units else "no (bf16 is emulated: its figures describe the emulation)"
    import torch

    return f"torch {torch.__version__}, {threads} threads, load average {load:.2f}, bf16 instructions: {native}"


def row(
    metric: str,
    value: float | int | str | None,
    unit: str = "",
    goal: str | None = None,
    met: bool | None = None,
    spread: tuple[float, float] | None = None,
) -> dict:
    """One figure. ``goal`` is "<op> <number>" (e.g. "<= 1.10"), compared against ``value``; None means no goal. A
    value that is not a number (a goal that could not be measured) takes ``met`` as given: False when the run
    itself showed the goal was missed (say, a target never reached), None when nothing can be said. ``spread``:
    (lowest, highest) of the same figure over the run's repeats, when ``value`` is their median — the table shows
    it, and says when the goal was met in some repeats and missed in others."""
    if goal is not None and isinstance(value, (int, float)):
        met = meets(goal, value)
    out = {"metric": metric, "value": value, "unit": unit, "goal": goal, "met": met}
    if spread is not None:
        low, high = spread
        if not low <= high:
            raise ValueError(f"spread {spread!r}: expected (lowest, highest)")
        out["spread"] = [low, high]
    return out


def parse_goal(goal: str) -> tuple[str, float]:
    """A goal "<op> <number>" (e.g. "<= 1.10") as (op, bound)."""
    op, bound = goal.split()
    if op not in COMPARE:
        raise ValueError(f"goal {goal!r}: expected one of {', '.join(COMPARE)} then a number")
    return op, float(bound)


def meets(goal: str, value: float) -> bool:
    """Whether ``value`` meets ``goal`` ("<op> <number>")."""
    op, bound = parse_goal(goal)
    return bool(COMPARE[op](value, bound))


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the peer libraries a benchmark compared with (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 matmul instructions (AVX512-BF16 or AMX); without them torch emulates bf16 and a bf16
    figure says nothing about bf16 training. Read from /proc/cpuinfo; False where it does not exist."""
    return bool(cpu_bf16_units())


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX's bf16 tiles, where a bf16 matmul is several times float32's (see cpu_bf16_units)."""
    return cpu_bf16_units().startswith("AMX")


def cpu_bf16_units(cpuinfo: str | None = None) -> str:
    """Which bf16 matmul instructions the CPU has: "AMX and AVX512-BF16", "AMX", "AVX512-BF16 (no AMX)" or "" (none,
    or no /proc/cpuinfo); ``cpuinfo``: that file's text (default: read it). It matters for every bf16 figure: a 2048³
    bf16 matmul ran at 942 GFLOP/s with AMX on a 2-core Xeon VM on 2026-12-03, and at 139 GFLOP/s (float32: 239) on
    one with AVX512-BF16 alone the same evening."""
    if cpuinfo is None:
        info = Path("/proc/cpuinfo")
        cpuinfo = info.read_text() if info.exists() else ""
    flags = set(cpuinfo.split())
    if "amx_bf16" in flags:
        return "AMX and AVX512-BF16" if "avx512_bf16" in flags else "AMX"
    return "AVX512-BF16 (no AMX)" if "avx512_bf16" in flags else ""


def load_average() -> float:
    """The 1-minute load average, as /proc/loadavg gives it (os.getloadavg elsewhere)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return os.getloadavg()[0]


def cpu_ticks() -> tuple[int, int]:
    """(all ticks, idle ticks) of the machine since boot from /proc/stat's first line: user, nice, system, idle,
    iowait, irq, softirq and steal (time the hypervisor gave other machines counts as busy: it is taken from us).
    Guest time is inside user already."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def busy_cores(seconds: float = 3.0) -> float:
    """Cores kept busy by all processes over the next ``seconds`` (from /proc/stat; None-safe: 0 if unreadable).

    Called while the caller itself sleeps, it measures what *other* processes use right now, which the 1-minute
    average cannot tell apart from the tail of the benchmark that just finished."""

    try:
        total0, idle0 = cpu_ticks()
        time.sleep(seconds)
        total1, idle1 = cpu_ticks()
    except OSError:
        return 0.0
    if total1 == total0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def write_json(path: Path | None, name: str, rows: list[dict], load_before: float, threads: int, **extra) -> None:
    """Write the result file atomically (a temporary file renamed over the target)."""
    if path is None:
        return
    result = {
        "benchmark": name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "threads": threads,
        "load_before": load_before,
        "load_after": load_average(),
        "rows": rows,
        **extra,
    }
    write_atomic(path, json.dumps(result, indent=1) + "\n")
