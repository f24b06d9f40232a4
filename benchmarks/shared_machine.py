"""Training speed on an idle machine and on one shared with two busy processes, for several threading settings.

OpenMP worker threads that wait for work by spinning (libgomp's default when OMP_WAIT_POLICY is unset) steal the
cores other processes need, and a thread descheduled mid-step makes the others spin for it: on a shared 2-core
machine a step can take several times its idle time. This benchmark trains the demo model (preset `demo`, its
shape and batch) for a fixed number of steps in a fresh process per setting — OpenMP reads its environment once,
at start-up — first with the machine as it is, then with two background processes spinning on the CPU, and prints
seconds per step (median of the timed steps), the CPU seconds, and the ratio loaded / idle.

Settings: the threading nanoseek chooses by itself (`nanoseek auto`: the wait of nanoseek/openmp.py, set as
nanoseek is imported before torch — a short spin on an idle machine, sleeping at once (passive) beside busy
processes — and the automatic thread count of nanoseek/train/threads.py, which leaves the cores busy processes use
to them unless the threads sleep while they wait), torch's defaults (nanoseek told to keep the environment), a
passive wait policy, a short spin (GOMP_SPINCOUNT), and one thread; all but the first keep their thread count
whatever the load. (Until 2026-12-04 the child imported torch first, so `nanoseek auto` ran with libgomp's default
wait, not nanoseek's; until 2026-12-04, afternoon, nanoseek spun briefly beside busy processes too and trained
there on one thread.)
Goal: under load the demo takes at most 2.5× its idle time, with no slowdown on an idle machine against torch's
defaults.

    python benchmarks/shared_machine.py [--steps 30] [--repeats 2] [--settings "nanoseek auto,torch defaults"]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

from common import add_json_argument, load_average, require_at_least_one, row, write_json

KEEP = {"NANOSEEK_OPENMP": "keep"}  # nanoseek leaves the OpenMP environment as it finds it
SETTINGS = {
    "nanoseek auto": {},
    "torch defaults": KEEP,
    "passive wait": {**KEEP, "OMP_WAIT_POLICY": "PASSIVE"},
    "short spin": {**KEEP, "GOMP_SPINCOUNT": "10000"},
    "one thread": {**KEEP, "OMP_NUM_THREADS": "1"},
}
KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "NANOSEEK_OPENMP")

CHILD = """
import json, statistics, sys, time
import nanoseek  # first, as nanoseek's command line does: its OpenMP setting must precede torch's loading OpenMP
import torch
from nanoseek.config import load_run_config, preset_path
from nanoseek.data.loader import load_token_data
from nanoseek.model import Transformer
from nanoseek.train.engine import Engine
from nanoseek.train.pretrain import Pretraining
steps, automatic = int(sys.argv[1]), sys.argv[2] == "auto"
threads = 0 if automatic else torch.get_num_threads()  # the other settings keep their count whatever the load
cfg = load_run_config([preset_path("demo")], ["train.eval_every=100000", f"train.threads={threads}"])
data = load_token_data(cfg.data, cfg.model.seq_len)
torch.manual_seed(0)
engine = Engine(Transformer(cfg.model), cfg.train, log=lambda m: None)
stage = Pretraining(engine, data, cfg.model.seq_len)
times, cpu0 = [], time.process_time()
for step in range(steps):
    t0 = time.perf_counter()
    engine.set_lr(step)
    stage.step(step)
    times.append(time.perf_counter() - t0)
from nanoseek import openmp
wait = openmp.chosen or "none"  # what nanoseek set as it was imported ("none": the environment as it was)
print(json.dumps({"step_s": statistics.median(times[3:]), "cpu_s": time.process_time() - cpu0,
                  "threads": torch.get_num_threads(), "wait": wait}))
"""


def spin(stop) -> None:
    """A busy process: what another user's job looks like to the scheduler."""
    x = 0
    while not stop.is_set():
        x += 1


def run(setting: dict[str, str], steps: int, automatic: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEYS} | setting
    command = [sys.executable, "-c", CHILD, str(steps), "auto" if automatic else "fixed"]
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=3600)  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(steps: int, repeats: int, loaded: bool, settings: list[str]) -> dict[str, list[dict]]:
    stop = multiprocessing.Event()
    busy = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(2 if loaded else 0)]
    for p in busy:
        p.start()
    try:
        results: dict[str, list[dict]] = {name: [] for name in settings}
        for _ in range(repeats):  # settings interleaved, so a drift of the machine touches them all
            for name in settings:
                results[name].append(run(SETTINGS[name], steps, automatic=name == "nanoseek auto"))
        return results
    finally:
        stop.set()
        for p in busy:
            p.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per run (the first 3 are not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting and condition (median taken)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings to measure (default "
                        "all; 'nanoseek auto' and 'torch defaults', which the goals need, always are)")  # fmt: skip
    add_json_argument(parser)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error(f"--steps={args.steps} is invalid: expected at least 4 (the first 3 are not timed)")
    require_at_least_one(parser, args, "repeats")
    settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        parser.error(f"--settings: {', '.join(map(repr, unknown))} unknown; expected some of: {', '.join(SETTINGS)}")
    settings = [name for name in SETTINGS if name in settings or name in ("nanoseek auto", "torch defaults")]
    load = load_average()
    print(f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}")
    idle = measure(args.steps, args.repeats, loaded=False, settings=settings)
    print(f"load average between: {os.getloadavg()[0]:.2f}")
    time.sleep(1)
    busy = measure(args.steps, args.repeats, loaded=True, settings=settings)
    base = statistics.median(r["step_s"] for r in idle["torch defaults"])
    print(f"\n{'setting':<22}{'threads':>9}{'idle s/step':>13}{'× default':>10}{'loaded s/step':>15}"
          f"{'loaded/idle':>13}{'idle cpu s':>12}{'loaded cpu s':>14}")  # fmt: skip
    for name in settings:
        a = statistics.median(r["step_s"] for r in idle[name])
        b = statistics.median(r["step_s"] for r in busy[name])
        ca = statistics.median(r["cpu_s"] for r in idle[name])
        cb = statistics.median(r["cpu_s"] for r in busy[name])
        counts = f"{idle[name][0]['threads']}/{busy[name][0]['threads']}"
        print(f"{name:<22}{counts:>9}{a:>13.3f}{a / base:>10.2f}{b:>15.3f}{b / a:>13.2f}"
              f"{ca:>12.1f}{cb:>14.1f}")  # fmt: skip
    waits = {
        side: sorted({r["wait"] for r in runs["nanoseek auto"]}) for side, runs in (("idle", idle), ("loaded", busy))
    }
    print(f"\nnanoseek auto's wait, as chosen at import: idle {' / '.join(waits['idle'])}, loaded "
          f"{' / '.join(waits['loaded'])}")  # fmt: skip
    print("goal: loaded/idle <= 2.5 for 'nanoseek auto', and its idle time not above torch's defaults")
    # the goals' ratios per repeat (repeat i's runs of the two sides): their median and range
    loaded = [b["step_s"] / a["step_s"] for a, b in zip(idle["nanoseek auto"], busy["nanoseek auto"], strict=True)]
    versus = [a["step_s"] / d["step_s"] for a, d in zip(idle["nanoseek auto"], idle["torch defaults"], strict=True)]
    print(f"per repeat: loaded / idle {', '.join(f'{x:.2f}' for x in loaded)}; nanoseek auto / torch defaults idle "
          f"{', '.join(f'{x:.2f}' for x in versus)}")  # fmt: skip
    rows = [
        row(
            "nanoseek auto: demo step time with 2 busy processes / idle",
            statistics.median(loaded),
            "×",
            "<= 2.5",
            spread=(min(loaded), max(loaded)),
        ),
        row(
            "nanoseek auto / torch defaults, idle step time",
            statistics.median(versus),
            "×",
            "<= 1.0",
            spread=(min(versus), max(versus)),
        ),
        row(
            "torch defaults: step time with 2 busy processes / idle",
            statistics.median(r["step_s"] for r in busy["torch defaults"]) / base,
            "×",
        ),  # fmt: skip
    ]
    write_json(args.json, "shared_machine", rows, load, idle["nanoseek auto"][0]["threads"])


if __name__ == "__main__":
    main()
