"""Run every benchmark with ``--json``, guarding against a busy machine, then write docs/BENCHMARKS.md.

    python benchmarks/bench.py                      # all of them (what `make bench` runs), then the table
    python benchmarks/bench.py --only moe_throughput,decode_speed   # rerun some; the others' last results stay

A table is one machine's: `--only` is refused where runs/bench lacks the other benchmarks' results or holds another
machine's (a fresh clone, another CPU), as their rows would be dropped or mixed in.

Before each benchmark the 1-minute load average (/proc/loadavg) is read. A machine whose load is above --max-load
is not necessarily busy now (the average still holds the tail of the benchmark that just ended), so the CPU time
other processes use is then sampled from /proc/stat over a few seconds while this script sleeps; the benchmark
waits (up to --max-wait seconds) until others use at most --max-others cores. During the run the CPU time of the
whole machine minus the benchmark's own (its process tree) gives what other processes took; a run during which they
took more than --max-others cores on average is run again (--reruns), and if it stays so its rows are marked "load
too high" in the table — the figures are kept, never reported as clean. A benchmark whose optional dependency is
missing (TRL, transformers: ``pip install -e ".[bench]" torch==2.13.0``) gets a row saying so instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import busy_cores, cpu_bf16_units, cpu_has_bf16, cpu_ticks, load_average, require_at_least, write_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name: (arguments used by `make bench`, modules it needs beyond nanoseek's own dependencies)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "residual_overhead": (["--threads", "2", "--repeats", "6", "--compile-cache"], []),
    "moe_throughput": (["--threads", "2", "--skip-quality", "--repeats", "11"], []),  # a repeat varies by ±0.1
    "train_throughput": (["--steps", "4"], []),
    "grpo_vs_trl": ([], ["trl", "transformers", "datasets"]),
    "autocast_copy": ([], []),
    "short_attention": ([], []),
    "hf_parity": (["--threads", "2", "--repeats", "3"], ["transformers"]),
    "decode_speed": ([], []),
    "serve_load": (["--seconds", "5"], ["fastapi", "uvicorn", "httpx"]),
    "shared_machine": (["--steps", "20", "--settings", "nanoseek auto,torch defaults"], []),
}


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, steal included, CPU seconds of this process's finished
    children)."""
    total, idle = cpu_ticks()
    busy = (total - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.children_user + t.children_system


def wait_until_quiet(max_load: float, max_others: float, max_wait: float) -> tuple[bool, float, float]:
    """(quiet?, 1-minute load, cores other processes used in the last sample)."""
    deadline = time.monotonic() + max_wait
    while True:
        load = load_average()
        if load <= max_load:
            return True, load, 0.0
        others = busy_cores(3.0)
        if others <= max_others:
            return True, load, others
        if time.monotonic() > deadline:
            return False, load, others
        print(f"  waiting: load average {load:.2f}, other processes use {others:.2f} cores", flush=True)
        time.sleep(10)


def run_one(name: str, extra: list[str], out: Path, a: argparse.Namespace) -> dict:
    args, needs = BENCHMARKS[name]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        return {"benchmark": name, "status": f"skipped: {', '.join(missing)} not installed "
                "(pip install -e \".[bench]\" torch==2.13.0)", "rows": []}  # fmt: skip
    path = out / f"{name}.json"
    for attempt in range(1 + a.reruns):
        quiet, load, others_before = wait_until_quiet(a.max_load, a.max_others, a.max_wait)
        path.unlink(missing_ok=True)
        commit = source_commit()
        busy0, own0 = cpu_seconds()
        t0 = time.monotonic()
        relative = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        command = [sys.executable, str(HERE / f"{name}.py"), *args, *extra, "--json", str(relative)]
        print(f"[{name}] attempt {attempt + 1}: load average {load:.2f}; {' '.join(command[1:])}", flush=True)
        done = run_group(command, a.timeout)
        elapsed = time.monotonic() - t0
        busy1, own1 = cpu_seconds()
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed
        write_atomic(out / f"{name}.log", done.stdout + done.stderr)
        if done.returncode or not path.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"benchmark": name, "status": f"failed (exit {done.returncode}): {last}", "rows": []}
        result = json.loads(path.read_text())
        result |= {"seconds": elapsed, "others_cores": others, "others_before": others_before, "commit": commit,
                   "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        clean = quiet and others <= a.max_others
        result["status"] = "ok" if clean else "load too high"
        print(f"[{name}] {elapsed:.0f} s, other processes {others:.2f} cores: {result['status']}", flush=True)
        if clean:
            break
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    return result


def run_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a benchmark in a process group of its own; past ``timeout`` the whole group is killed (a server, the
    children of a benchmark that times out must not load the next one), then TimeoutExpired is raised."""
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:  # a timed-out benchmark, or whatever a finished one left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def goal_rows(previous: Path) -> list[dict]:
    """The goals a benchmark's last result file held, each as a row "not measured": what a failed run leaves in the
    table instead of the goals disappearing from it."""
    try:
        rows = json.loads(previous.read_text()).get("rows", [])
    except (OSError, ValueError):
        return []
    return [{"metric": r["metric"], "value": "not measured (the run failed)", "unit": "", "goal": r["goal"],
             "met": None} for r in rows if r.get("goal")]  # fmt: skip


def source_commit() -> str:
    """The checkout's commit, with "+changes" when nanoseek's or the benchmarks' tracked files differ from it: a
    long run records it before each benchmark, so a row says which code measured it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no", "--", "nanoseek", "benchmarks", "pyproject.toml")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16": cpu_has_bf16(),
        "bf16_units": cpu_bf16_units(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": source_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def refuse_partial_table(out: Path, names: list[str], info: dict, table: Path) -> None:
    """A table is one machine's: ``--only`` may rerun some benchmarks only where the others' results from this same
    machine are in ``out`` (on a fresh clone or another machine their rows would be dropped or mixed in)."""
    others = [n for n in BENCHMARKS if n not in names]
    if not others:
        return
    missing = [n for n in others if not (out / f"{n}.json").exists()]
    before = json.loads((out / "machine.json").read_text()) if (out / "machine.json").exists() else {}
    if missing or (before.get("cpu"), before.get("cores")) != (info["cpu"], info["cores"]):
        elsewhere = f"results from another machine ({before.get('cpu')}, {before.get('cores')} cores)"
        why = f"{out} holds " + (f"no results of {', '.join(missing)}" if missing else elsewhere)
        raise SystemExit(f"--only {','.join(names)}: {why}, so {table} would lose or mix rows; run every "
                         "benchmark here (make bench), or write the table elsewhere with --table")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset (default: all); the table "
                   "keeps the other benchmarks' last results, each with its commit and load")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="folder for the JSON results")
    p.add_argument("--table", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="the table to write")
    p.add_argument("--max-load", type=float, default=0.5, help="1-minute load under which the machine is quiet")
    p.add_argument("--max-others", type=float, default=0.3, help="cores other processes may use (default 0.3)")
    p.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet machine (default 120)")
    p.add_argument("--reruns", type=int, default=1, help="reruns of a benchmark disturbed by other processes")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a benchmark is stopped")
    a = p.parse_args()
    require_at_least(p, a, 0, "reruns", "max_wait", "max_load", "max_others")
    if a.timeout <= 0:
        p.error(f"--timeout={a.timeout} is invalid: expected seconds > 0")
    names = [n for n in a.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    refuse_partial_table(a.out, names, info, a.table)
    if names or not (a.out / "machine.json").exists():  # the header says when benchmarks last ran, not when the
        # table was only rewritten
        write_atomic(a.out / "machine.json", json.dumps(info, indent=1) + "\n")
    print(f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, torch {info['torch']}", flush=True)
    t0 = time.monotonic()
    for name in names:
        goals = goal_rows(a.out / f"{name}.json")  # before a run replaces the file
        try:
            result = run_one(name, [], a.out, a)
        except subprocess.TimeoutExpired:
            result = {"benchmark": name, "status": f"failed: stopped after {a.timeout:.0f} s", "rows": []}
        if result["status"].startswith("failed"):
            result["rows"] = goals  # the goals this benchmark checks stay in the table, not measured
        if result["status"].startswith(("skipped", "failed")):
            print(f"[{name}] {result['status']}", flush=True)
            result |= {"commit": source_commit(), "date": time.strftime("%Y-%m-%d %H:%M")}
            write_atomic(a.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    print(f"all benchmarks: {(time.monotonic() - t0) / 60:.1f} minutes", flush=True)
    from table import write_table

    write_table(a.out, a.table, list(BENCHMARKS))  # with --only, the others keep their last results
    print(f"wrote {a.table}")


if __name__ == "__main__":
    main()
