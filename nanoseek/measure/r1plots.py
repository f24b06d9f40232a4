"""The r1-demo's plots, as PNG bytes (matplotlib Figures, no pyplot):

* held-out greedy accuracy against the student's cumulative FLOPs, per arm (mean over seeds of the accuracy checks
  made every train.eval_every steps);
* response length and format rate over the RL steps of R1-Zero and of GRPO after the cold start (R1's Fig. 3);
* pass@k against k, before RL (the cold start), after RL and after distillation.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from nanoseek.measure.plots import new_axes, to_png
from nanoseek.train.runfolder import read_metrics

CURVE_ARMS = ("grpo", "grpo-process", "sft-more", "sft-answers", "distill-traces", "distill-onpolicy", "sft-unlimited")


def _mean_curve(folders: list[Path], key: str, x_key: str = "flops") -> tuple[list[float], list[float]]:
    runs = [[(r[x_key], r[key]) for r in read_metrics(f / "metrics.jsonl") if key in r] for f in folders]
    runs = [r for r in runs if r]
    if not runs:
        return [], []
    n = min(len(r) for r in runs)
    return ([statistics.fmean(r[i][0] for r in runs) for i in range(n)],
            [statistics.fmean(r[i][1] for r in runs) for i in range(n)])  # fmt: skip


def accuracy_vs_flops(c, out: Path) -> bytes:
    fig, ax = new_axes()
    for i, arm in enumerate(CURVE_ARMS):
        x, y = _mean_curve([out / f"seed{s}" / arm for s in c.seeds], "pass1_greedy")
        if x:
            ax.plot(x, [v * 100 for v in y], marker="o", ms=3, label=arm, color=f"C{i}")
    ax.set_xlabel("student FLOPs after the cold start (analytic)")
    ax.set_ylabel("held-out greedy pass@1 (%)")
    ax.set_title("accuracy against student compute, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def rl_dynamics(c, out: Path) -> bytes:
    fig, ax = new_axes()
    right = ax.twinx()
    for i, arm in enumerate(("r1-zero", "grpo")):
        folders = [out / f"seed{s}" / arm for s in c.seeds]
        x, length = _mean_curve(folders, "completion_len", "step")
        _, fmt = _mean_curve(folders, "reward_format", "step")
        if x:
            ax.plot(x, length, color=f"C{i}", label=f"{arm}: response length")
            right.plot(x, [v * 100 for v in fmt], color=f"C{i}", ls="--", label=f"{arm}: format rate")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean response length (tokens)")
    right.set_ylabel("well-formed responses (%)")
    ax.set_title("R1-Zero and GRPO after a cold start: length and format over training")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def pass_at_k(report: dict) -> bytes:
    fig, ax = new_axes()
    for i, arm in enumerate(("cold", "grpo", "distill-traces", "distill-onpolicy", "r1-zero")):
        entry = report["arms"].get(arm)
        if not entry or not entry["pass_at_k"]:
            continue
        ks = sorted(entry["pass_at_k"])
        ax.plot(ks, [entry["pass_at_k"][k]["mean"] * 100 for k in ks], marker="o", label=arm, color=f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k (%), unbiased estimator")
    ax.set_title("does RL teach or only sharpen? pass@k before and after")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def plot_r1(c, out: Path, report: dict) -> dict[str, bytes]:
    return {
        "accuracy_vs_flops.png": accuracy_vs_flops(c, out),
        "rl_length_and_format.png": rl_dynamics(c, out),
        "pass_at_k.png": pass_at_k(report),
    }
