"""`make reason-demo`: SFT cold start, evaluate, GRPO, evaluate again, against an extra-SFT control, over seeds.

For each seed: SFT a tiny model from scratch (configs/sft/demo.toml), evaluate it on held-out problems, then from
that checkpoint run (a) GRPO (configs/grpo/demo.toml) and (b) the control: as many extra SFT steps at the cold
start's final learning rate, on fresh training problems. The honest question is whether GRPO beats (b), not only
whether it beats the starting point (docs/LOG.md, "Reasoning by RL"). Prints a before/after table with 95 % Wilson
intervals over the test problems, per seed and the mean.

    python -m nanoseek.rl.demo --out runs/reason-demo --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nanoseek.cli import preset_path
from nanoseek.config import load_run_config
from nanoseek.rl.evaluate import Estimate, EvalResult
from nanoseek.rl.run import run_eval, run_grpo, run_sft


def seed_runs(out: Path, seed: int, n: int, samples: int, progress: bool) -> dict[str, EvalResult]:
    sft_cfg = load_run_config([preset_path("demo", "sft")], [f"train.seed={seed}"])
    run_sft(sft_cfg, out / "sft", progress=progress)
    results = {"sft": run_eval(out / "sft", n=n, samples=samples, n_examples=0)}

    base = {k: v for k, v in sft_cfg.to_dict().items() if k in ("model", "data")}
    grpo_cfg = load_run_config([preset_path("demo", "grpo")], [f"grpo.seed={seed}"], base=base)
    run_grpo(grpo_cfg, out / "grpo", init=out / "sft", progress=progress)
    results["grpo"] = run_eval(out / "grpo", n=n, samples=samples, n_examples=0)

    t = sft_cfg.train
    control = [
        f"train.steps={grpo_cfg.train.steps}",
        f"train.lr={t.lr * t.min_lr_ratio}",  # the cold start's final lr, held constant
        "train.warmup_steps=0",
        "train.min_lr_ratio=1.0",
        f"train.seed={seed + 1000}",  # fresh training problems, not a replay of the cold start's
    ]
    run_sft(
        load_run_config([preset_path("demo", "sft")], control), out / "control", init=out / "sft", progress=progress
    )
    results["control"] = run_eval(out / "control", n=n, samples=samples, n_examples=0)
    return results


def _cell(e: Estimate) -> str:
    return f"{e.value:.1%} [{e.low:.1%}, {e.high:.1%}]"


def table(rows: dict[int, dict[str, EvalResult]]) -> str:
    arms = ("sft", "grpo", "control")
    head = "| seed | metric | after SFT | + GRPO | + extra SFT (control) |\n| --- | --- | --- | --- | --- |"
    lines = [head]
    for seed, res in rows.items():
        for metric in ("greedy", "sampled", "majority"):
            lines.append(f"| {seed} | {metric} | " + " | ".join(_cell(getattr(res[a], metric)) for a in arms) + " |")
    for metric in ("greedy", "sampled", "majority"):
        means = [sum(getattr(r[a], metric).value for r in rows.values()) / len(rows) for a in arms]
        lines.append(f"| mean | {metric} | " + " | ".join(f"{m:.1%}" for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/reason-demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=200, help="held-out test problems per evaluation")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem for pass@1 sampled and maj@k")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    rows, wall, cpu = {}, time.perf_counter(), time.process_time()
    for seed in args.seeds:
        rows[seed] = seed_runs(Path(args.out) / f"seed{seed}", seed, args.n, args.samples, not args.no_progress)
        print(f"seed {seed}: " + json.dumps({a: r.metrics() for a, r in rows[seed].items()}), flush=True)
    print(table(rows))
    print(f"total: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
