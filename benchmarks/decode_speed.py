"""Batch-1 decode speed of the generator against a baseline commit's generator, measured in the same run.

Three sides: the baseline commit's generator, this tree's eager generator, and this tree's compiled one
(``generate(compile=True)``: on CPU the decode step compiled ahead of time, nanoseek/model/ahead.py; its export and
build or load happen in a warm-up call before the clock starts and are reported apart). The compiled side's process
also times, in turns with it, the same model decoded by the torch.compile'd step (``generate.AHEAD_OF_TIME = False``):
what the ahead-of-time library buys, measured in pairs because the machine's drift between processes is as large.

The model is the demo preset's shape (byte tokenizer, d_model 192, 4 layers, seq_len 128: 1.8M parameters) with
random weights: decode speed does not depend on what the weights learned. Each side runs in its own child process
(the baseline from ``git archive`` of ``--baseline`` into a temporary folder), alternating, ``--repeats`` times; the
figures are medians of wall-clock and process-CPU tokens per second. CPU time is the steadier figure on a shared
machine: wall time includes waiting for the core.

    python benchmarks/decode_speed.py                       # vs the commit before the serving work
    python benchmarks/decode_speed.py --baseline HEAD~3 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common import add_json_argument, load_average, require_at_least_one, row, write_json

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "2915186"  # main before the serving work: the generator this benchmark was written to speed up

CHILD = """
import json, sys, time, torch
from nanoseek import ModelConfig, Transformer
from nanoseek.model.generate import generate
torch.set_num_threads(1)
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=256, d_model=192, n_layers=4, n_heads=4, seq_len=128)).eval()
prompt, new = [list(b"The with statement")], 128 - len(b"The with statement")
kw = {"compile": True} if sys.argv[2] == "compiled" else {}
import nanoseek.model.generate as G
paths = {"": True}  # result-key suffix -> generate.AHEAD_OF_TIME (compiled side only; the others do not read it)
t0 = time.perf_counter()
generate(model, prompt, 16, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)  # warm-up, compile
out = {"warm_up_s": time.perf_counter() - t0}
if kw:  # the torch.compile'd step on the same model, timed in turns with the ahead-of-time one
    paths["_compile"] = G.AHEAD_OF_TIME = False
    t0 = time.perf_counter()
    generate(model, prompt, 16, generator=torch.Generator().manual_seed(1), **kw)
    out["warm_up_compile_s"] = time.perf_counter() - t0
for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
    wall, cpu, tokens = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0)
    for rep in range(int(sys.argv[1])):
        for key, ahead in paths.items():
            G.AHEAD_OF_TIME = ahead
            seeded = torch.Generator().manual_seed(rep)
            w, c = time.perf_counter(), time.process_time()
            g = generate(model, prompt, new, temperature=temperature, generator=seeded, **kw)
            wall[key] += time.perf_counter() - w
            cpu[key] += time.process_time() - c
            tokens[key] += g.tokens.shape[1]
    for key in paths:
        out[name + key] = {"wall": tokens[key] / wall[key], "cpu": tokens[key] / cpu[key]}
print(json.dumps(out))
"""


def run_side(path: Path, runs: int, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", CHILD, str(runs), mode]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=BASELINE, help="git commit of the baseline generator")
    ap.add_argument("--repeats", type=int, default=3, help="alternating child runs per side")
    ap.add_argument("--runs", type=int, default=5, help="generations of 110 tokens per child run and mode")
    add_json_argument(ap)
    args = ap.parse_args()
    require_at_least_one(ap, args, "repeats", "runs")
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}"], cwd=ROOT,
                           capture_output=True)  # fmt: skip
    if known.returncode:
        ap.error(f"--baseline={args.baseline!r} is not a commit of this checkout (a shallow clone may lack it)")
    load_before, rows = load_average(), []
    with tempfile.TemporaryDirectory() as tmp:
        command = ["git", "archive", args.baseline, "nanoseek"]
        archive = subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        sides = {"baseline": (Path(tmp), "eager"), "eager": (ROOT, "eager"), "compiled": (ROOT, "compiled")}
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, (path, mode) in sides.items():
                results[side].append(run_side(path, args.runs, mode))
    load = os.getloadavg()[0]
    print(f"batch-1 decode, demo shape, 1 thread; load average {load_before:.2f} before, {load:.2f} at the end; "
          f"medians of {args.repeats}; tokens/s wall / CPU")  # fmt: skip
    print(f"| mode | baseline {args.baseline} | eager | compiled | compiled, torch.compile | eager / baseline | "
          "compiled / baseline | ahead of time / torch.compile |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("sampled", "greedy"):
        med = {
            side: {k: statistics.median(r[mode][k] for r in runs) for k in ("wall", "cpu")}
            for side, runs in results.items()
        }
        b, e, c = med["baseline"], med["eager"], med["compiled"]
        p = {k: statistics.median(r[mode + "_compile"][k] for r in results["compiled"]) for k in ("wall", "cpu")}
        ahead = statistics.median(r[mode]["wall"] / r[mode + "_compile"]["wall"] for r in results["compiled"])
        print(
            f"| {mode} | {b['wall']:.0f} / {b['cpu']:.0f} | {e['wall']:.0f} / {e['cpu']:.0f} | "
            f"{c['wall']:.0f} / {c['cpu']:.0f} | {p['wall']:.0f} / {p['cpu']:.0f} | {e['wall'] / b['wall']:.2f}× | "
            f"{c['wall'] / b['wall']:.2f}× | {ahead:.2f}× |"
        )
        rows.append(row(f"batch-1 {mode} decode, compiled, demo shape, 1 thread", c["wall"], "tokens/s", ">= 500"))
        rows.append(row(f"batch-1 {mode} decode, eager", e["wall"], "tokens/s"))
        rows.append(row(f"batch-1 {mode} decode, compiled: ahead of time / torch.compile, in turns", ahead, "×"))
        # the serving issue's 500 tokens/s was set against ≈ 170 from the baseline generator on its day's machine:
        # side by side on any machine, that is ≈ 2.9× the baseline
        ratio_goal = ">= 2.9" if args.baseline == BASELINE else None
        rows.append(row(f"batch-1 {mode} decode, compiled / baseline {args.baseline}", c["wall"] / b["wall"], "×",
                        ratio_goal))  # fmt: skip
    warm = statistics.median(r["warm_up_s"] for r in results["compiled"])
    warm_compile = statistics.median(r["warm_up_compile_s"] for r in results["compiled"])
    print(f"compiled side's first call (the prefill's torch.compile, the decode step's library built or loaded): "
          f"median {warm:.1f} s; torch.compile's decode step's first call (compile, or load from its cache): median "
          f"{warm_compile:.1f} s")  # fmt: skip
    write_json(args.json, "decode_speed", rows, load_before, 1)


if __name__ == "__main__":
    main()
