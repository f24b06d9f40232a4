"""Write docs/BENCHMARKS.md from the JSON results of ``benchmarks/bench.py`` (runs/bench by default).

python benchmarks/table.py [--results runs/bench] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import meets, parse_goal, write_atomic

ROOT = Path(__file__).resolve().parents[1]

HEADER = """\
# Benchmarks

Written by `make bench` (`benchmarks/bench.py`, then `benchmarks/table.py`): every benchmark in `benchmarks/` at the
size given in its command, each result a ratio measured in one run where the figure is a comparison. "Load" is the
1-minute load average before and after the benchmark; "others" is the CPU (in cores) that processes other than the
benchmark used while it ran, measured from /proc/stat. A row marked **load too high** was measured while other work
competed for the cores (after waiting and rerunning): its figure is noise, not a result. A result written by a
benchmark run by hand (not through `bench.py`, so without the load check) is marked **unchecked** and never counted
as met. "Commit" and "date" say which code measured each benchmark and when ("+changes": with uncommitted changes
to nanoseek or the benchmarks): `bench.py --only` reruns some benchmarks and keeps the others' last results.
Where a figure is the median of paired repeats, "repeats a–b" is its range over them, and a verdict says when the goal
was met in some repeats and missed in others.
"""

UNCHECKED = "unchecked: not run by bench.py"


def fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e6:
        return f"{value:.2e}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def verdict(r: dict, status: str) -> str:
    if r["met"] is None:
        return "—"
    if status == "load too high":
        return "(load too high)"
    if status != "ok":
        return "(unchecked)"
    text = "met" if r["met"] else "**not met**"
    if r.get("spread") and r.get("goal"):  # the goal's bound inside the repeats' range: the verdict is the median's
        low, high = (meets(r["goal"], v) for v in r["spread"])
        if low != high:
            text += " (not in every repeat)" if r["met"] else " (met in some repeats)"
    return text


def write_table(results: Path, out: Path, names: list[str] | None = None) -> None:
    machine = json.loads((results / "machine.json").read_text())
    files = sorted(p for p in results.glob("*.json") if p.name != "machine.json")
    found = {json.loads(p.read_text())["benchmark"]: json.loads(p.read_text()) for p in files}
    order = [n for n in (names or sorted(found)) if n in found]
    lines = [HEADER]
    bf16 = "yes" if machine["bf16"] else "no"
    if machine.get("bf16_units"):  # which units: bf16 figures on AMX and on AVX512-BF16 alone differ several-fold
        bf16 = f"yes, {machine['bf16_units']}"
    peers = {}
    for res in found.values():
        peers |= res.get("versions", {})
    peer_text = "; compared with " + ", ".join(f"{k} {v}" for k, v in sorted(peers.items())) if peers else ""
    lines.append(
        f"Machine: {machine['cpu']}, {machine['cores']} cores (bf16 instructions: {bf16}); Python "
        f"{machine['python']}, torch {machine['torch']} ({machine['torch_threads']} threads by default){peer_text}; "
        f"benchmarks last run at commit `{machine['commit']}`, {machine['date']} (each benchmark's own commit and "
        "date are in the second table).\n"
    )
    lines.append("| benchmark | figure | value | goal | met |\n|---|---|---|---|---|")
    for name in order:
        res = found[name]
        status = res.get("status", UNCHECKED)
        rows = res["rows"] or [{"metric": status, "value": "", "unit": "", "goal": None, "met": None}]
        for r in rows:
            value = f"{fmt(r['value'])} {r['unit']}".strip()
            if r["goal"] and isinstance(r["value"], float) and fmt(r["value"]) == fmt(parse_goal(r["goal"])[1]):
                value = f"{r['value']:.4f} {r['unit']}".strip()  # rounded onto the bound: show which side it is on
            if r.get("spread"):
                value += f" (repeats {fmt(r['spread'][0])}–{fmt(r['spread'][1])})"
            if status in ("load too high", UNCHECKED):
                value += f" ({status.split(':')[0]})"
            lines.append(f"| {name} | {r['metric']} | {value} | {r['goal'] or '—'} | {verdict(r, status)} |")
    lines.append("\n## How each was run\n")
    lines.append(
        "| benchmark | command | threads | load before → after | others (cores) | minutes | status | commit | date |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name in order:
        res = found[name]
        when = f"{res.get('commit', '—')} | {res.get('date', '—')}"
        if "command" not in res:
            lines.append(f"| {name} | — | — | — | — | — | {res['status']} | {when} |")
            continue
        others = f"{res['others_cores']:.2f}" if "others_cores" in res else "—"
        minutes = f"{res['seconds'] / 60:.1f}" if "seconds" in res else "—"
        command = res["command"].replace(f"{ROOT}/", "")  # paths relative to the checkout
        lines.append(
            f"| {name} | `{command}` | {res['threads']} | {res['load_before']:.2f} → "
            f"{res['load_after']:.2f} | {others} | {minutes} | {res.get('status', UNCHECKED)} | {when} |"
        )
    write_atomic(out, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "runs" / "bench", help="folder of bench.py's JSON files")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    a = p.parse_args()
    if not (a.results / "machine.json").exists():
        raise SystemExit(f"{a.results}: no machine.json; run benchmarks/bench.py first")
    from bench import BENCHMARKS  # the table's order: make bench's

    write_table(a.results, a.out, list(BENCHMARKS))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
