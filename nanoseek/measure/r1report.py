"""The r1-demo's report: a table in the layout of DeepSeek-R1's Table 6, one verdict per claim, plots.

Every figure is the mean over seeds ± the half-width of its 95 % Student-t interval (measure/stats.py); a claim
compares two arms seed by seed (the same seed's cold start under both), so its interval is the t-interval of the
per-seed differences. Verdicts: **confirmed** when the interval lies on the claim's side of zero, **reversed** when
it lies on the other side, **not confirmed** when it contains zero — with one seed there is no interval and no
verdict but "not confirmed".
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from nanoseek.measure.provenance import provenance
from nanoseek.measure.stats import mean_ci
from nanoseek.train.runfolder import read_json, read_metrics, write_atomic

ROWS = [  # arm, what it is
    ("base", "R1-Zero base (arithmetic text, never the template)"),
    ("r1-zero", "R1-Zero: base + GRPO, rule rewards only"),
    ("cold", "cold start: SFT on the scarce worked examples"),
    ("grpo", "cold start + GRPO on the pool"),
    ("grpo-process", "cold start + GRPO, process rewards"),
    ("sft-more", "cold start + SFT on the same worked examples"),
    ("sft-answers", "cold start + SFT on the pool's answers"),
    ("distill-traces", "cold start + SFT on teacher traces (off-policy)"),
    ("distill-onpolicy", "cold start + on-policy distillation"),
    ("sft-unlimited", "cold start + SFT on unlimited solutions (upper bound, unrealistic)"),
]


def k_max(c) -> int:
    """The largest k of pass@k the evaluations measured (64 at the demo's 64 samples per problem)."""
    return max(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= c.eval_samples)


def figure(values: list[float]) -> dict[str, Any]:
    mean, ci = mean_ci(values)
    return {"mean": mean, "ci95": ci, "n": len(values), "values": values}


def verdict(diffs: list[float], claim_positive: bool = True) -> tuple[str, dict]:
    """'confirmed' / 'reversed' / 'not confirmed' from the t-interval of per-seed differences."""
    f = figure(diffs)
    if f["ci95"] is None:
        return "not confirmed", f
    low, high = f["mean"] - f["ci95"], f["mean"] + f["ci95"]
    if not claim_positive:
        low, high = -high, -low
    return ("confirmed" if low > 0 else "reversed" if high < 0 else "not confirmed"), f


def _eval(out: Path, seed: int, arm: str) -> dict | None:
    return read_json(out / f"seed{seed}" / arm / "eval.json")


def _summary(folder: Path) -> dict:
    return read_json(folder / "summary.json") or {}


def analyse(c, out: Path) -> dict[str, Any]:
    seeds = list(c.seeds)
    arms: dict[str, dict] = {}
    teacher = {
        "cold": _summary(out / "teacher" / "cold"),
        "grpo": _summary(out / "teacher" / "grpo"),
        "traces": read_json(out / "teacher" / "traces.json") or {},
        "eval": read_json(out / "teacher" / "grpo" / "eval.json"),
    }
    teacher_flops = sum(teacher[k].get("flops", 0.0) for k in ("cold", "grpo")) + teacher["traces"].get(
        "teacher_flops", 0.0
    )
    teacher_seconds = sum(teacher[k].get("wall_seconds", 0.0) for k in ("cold", "grpo")) + teacher["traces"].get(
        "teacher_seconds", 0.0
    )
    for arm, label in ROWS:
        evals = [_eval(out, s, arm) for s in seeds]
        if any(e is None for e in evals):
            continue
        start = {"r1-zero": "base", "base": None}.get(arm, None if arm == "cold" else "cold")
        flops = [
            _summary(out / f"seed{s}" / arm).get("flops", 0.0)
            + (_summary(out / f"seed{s}" / start).get("flops", 0.0) if start else 0.0)
            for s in seeds
        ]
        seconds = [
            _summary(out / f"seed{s}" / arm).get("wall_seconds", 0.0)
            + (_summary(out / f"seed{s}" / start).get("wall_seconds", 0.0) if start else 0.0)
            for s in seeds
        ]
        entry = {"label": label, "student_flops": figure(flops), "student_seconds": figure(seconds)}
        for key in ("pass1_greedy", "pass1_sampled", "maj", f"pass{k_max(c)}"):
            entry[key] = figure([e["test"][key] for e in evals])
        entry["hard_pass1_greedy"] = figure([e["hard"]["pass1_greedy"] for e in evals])
        entry["pass_at_k"] = {
            k: figure([e["test"][f"pass{k}"] for e in evals])
            for k in (1, 2, 4, 8, 16, 32, 64)
            if f"pass{k}" in evals[0]["test"]
        }
        if arm.startswith("distill"):
            entry["teacher_flops"], entry["teacher_seconds"] = teacher_flops, teacher_seconds
        arms[arm] = entry
    return {"seeds": seeds, "arms": arms, "teacher": teacher, "claims": claims(c, out, arms),
            "teacher_cost": {"flops": teacher_flops, "seconds": teacher_seconds}}  # fmt: skip


def _per_seed(c, out: Path, arm: str, key: str, split: str = "test") -> list[float]:
    return [_eval(out, s, arm)[split][key] for s in c.seeds]


def _curve(folder: Path, key: str) -> list[tuple[float, float]]:
    """(cumulative FLOPs, value) at every record that has ``key``."""
    return [(r["flops"], r[key]) for r in read_metrics(folder / "metrics.jsonl") if key in r]


def claims(c, out: Path, arms: dict) -> list[dict[str, Any]]:
    out_claims = []

    def diff(a: str, b: str, key: str = "pass1_greedy") -> list[float]:
        return [x - y for x, y in zip(_per_seed(c, out, a, key), _per_seed(c, out, b, key), strict=True)]

    def add(number, text, outcome, evidence):
        out_claims.append({"claim": number, "text": text, "verdict": outcome, "evidence": evidence})

    if {"r1-zero", "base"} <= set(arms):
        v, f = verdict(diff("r1-zero", "base"))
        shape = {}
        for key in ("completion_len", "reward_format", "reward_accuracy"):
            firsts, lasts = [], []
            for s in c.seeds:
                steps = [r for r in read_metrics(out / f"seed{s}" / "r1-zero" / "metrics.jsonl") if key in r]
                fifth = max(1, len(steps) // 5)
                firsts.append(statistics.fmean(r[key] for r in steps[:fifth]))
                lasts.append(statistics.fmean(r[key] for r in steps[-fifth:]))
            shape[key] = f"{statistics.fmean(firsts):.3g} → {statistics.fmean(lasts):.3g}"
        add(
            1,
            "R1-Zero: RL with rule-based rewards from a base that never saw a worked solution raises accuracy",
            v,
            {
                "greedy pass@1, r1-zero − base": f,
                **{f"{k}, first → last fifth of the RL steps (mean over seeds)": x for k, x in shape.items()},
            },  # fmt: skip
        )
    if {"grpo", "sft-more", "sft-answers"} <= set(arms):
        v1, f1 = verdict(diff("grpo", "sft-more"))
        v2, f2 = verdict(diff("grpo", "sft-answers"))
        v = "confirmed" if v1 == v2 == "confirmed" else "reversed" if "reversed" in (v1, v2) else "not confirmed"
        add(2, "cold start + RL beats more SFT on the same worked examples, and SFT on the pool's answers, at equal "
            "compute", v, {"greedy pass@1, grpo − sft-more": f1, "greedy pass@1, grpo − sft-answers": f2})  # fmt: skip
    missing = "not measured: the teacher's traces or the arm's runs are missing (see the run log)"
    if "distill-traces" not in arms:
        add(3, "distillation beats RL on the small student, at equal student compute", missing, {})
        add(4, "on-policy distillation reaches the off-policy student's accuracy with fewer student FLOPs", missing, {})
    if {"distill-traces", "grpo"} <= set(arms):
        v, f = verdict(diff("distill-traces", "grpo"))
        add(3, "distillation (SFT on a larger RL teacher's verified traces) beats RL on the small student, at equal "
            "student compute", v, {"greedy pass@1, distill-traces − grpo": f})  # fmt: skip
    if {"distill-onpolicy", "distill-traces"} <= set(arms):
        ratios, reached = [], 0
        for s in c.seeds:
            off = _curve(out / f"seed{s}" / "distill-traces", "pass1_greedy")
            on = _curve(out / f"seed{s}" / "distill-onpolicy", "pass1_greedy")
            target, off_flops = off[-1][1], off[-1][0]
            hit = next((flops for flops, value in on if value >= target), None)
            if hit is not None:
                reached += 1
                ratios.append(hit / off_flops)
        if reached == len(c.seeds):
            v, f = verdict([1 - r for r in ratios])
        else:
            v, f = ("reversed" if reached == 0 else "not confirmed"), figure(ratios) if ratios else None
        add(
            4,
            "on-policy distillation reaches the off-policy student's accuracy with fewer student FLOPs",
            v,
            {"seeds that reached it": f"{reached}/{len(c.seeds)}", "FLOPs ratio on/off-policy (1 − ratio tested)": f},
        )
    if {"grpo-process", "grpo"} <= set(arms):
        v, f = verdict(diff("grpo-process", "grpo"))
        add(
            5,
            "process rewards (each verified step) beat the outcome reward alone",
            v,
            {"greedy pass@1, grpo-process − grpo": f},
        )
    if {"grpo", "cold"} <= set(arms):
        top = k_max(c)
        d1, dk = verdict(diff("grpo", "cold", "pass1"))[1], verdict(diff("grpo", "cold", f"pass{top}"))[1]
        lifts_1 = d1["ci95"] is not None and d1["mean"] - d1["ci95"] > 0
        lifts_k = dk["ci95"] is not None and dk["mean"] - dk["ci95"] > 0
        v = "confirmed" if lifts_1 and not lifts_k else "reversed" if lifts_k else "not confirmed"
        add(
            6,
            f"RL sharpens rather than teaches: it lifts pass@1 but not pass@{top}",
            v,
            {"pass@1 (sampled), grpo − cold": d1, f"pass@{top}, grpo − cold": dk},
        )
    return out_claims


# ---------------------------------------------------------------------------------------------------------------------


def _cell(f: dict | None, pct: bool = True) -> str:
    if f is None:
        return "–"
    scale, unit = (100, "") if pct else (1, "")
    ci = "" if f["ci95"] is None else f" ± {f['ci95'] * scale:.1f}"
    return f"{f['mean'] * scale:.1f}{ci}{unit}"


def _sci(f: dict) -> str:
    ci = "" if f["ci95"] is None else f" ± {f['ci95']:.1e}"
    return f"{f['mean']:.2e}{ci}"


def render(c, report: dict) -> str:
    k = f"pass{k_max(c)}"
    lines = [
        f"# nanoseek r1-demo: {len(report['seeds'])} seeds, {c.worked_examples} worked examples",
        "",
        f"Test split: {c.eval_problems} problems, {c.eval_samples} samples each; harder split: one more operand. "
        "Mean ± 95 % t-interval over seeds, in %.",
        "",
        f"| arm | pass@1 greedy | pass@1 sampled | maj@{c.eval_samples} | pass@{k_max(c)} | harder split pass@1 "
        "| student FLOPs | student time (s) | teacher cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in report["arms"].items():
        teacher = ""
        if "teacher_flops" in entry:
            teacher = f"{entry['teacher_flops']:.2e} FLOPs, {entry['teacher_seconds']:.0f} s (apart)"
        lines.append(
            f"| **{arm}**: {entry['label']} | {_cell(entry['pass1_greedy'])} | {_cell(entry['pass1_sampled'])} | "
            f"{_cell(entry['maj'])} | {_cell(entry[k])} | {_cell(entry['hard_pass1_greedy'])} | "
            f"{_sci(entry['student_flops'])} | {_cell(entry['student_seconds'], pct=False)} | {teacher} |"
        )
    lines += ["", "## The claims", ""]
    for claim in report["claims"]:
        lines.append(f"**{claim['claim']}. {claim['text']}: {claim['verdict'].upper()}.**")
        for name, value in claim["evidence"].items():
            if isinstance(value, dict) and "mean" in value:
                value = f"{value['mean'] * 100:+.1f} points" + (
                    ""
                    if value["ci95"] is None
                    else f" ± {value['ci95'] * 100:.1f} (per seed: "
                    + ", ".join(f"{x * 100:+.1f}" for x in value["values"])
                    + ")"
                )
            lines.append(f"- {name}: {value}")
        lines.append("")
    t = report["teacher"]
    if t.get("traces"):
        tr = t["traces"]
        lines.append(
            f"Teacher: {c.teacher_width}-wide, {c.teacher_layers} layers; greedy pass@1 "
            f"{(t['eval'] or {}).get('test', {}).get('pass1_greedy', float('nan')) * 100:.1f} %; traces: "
            f"{tr['kept']} kept of {tr['samples']} samples ({tr['acceptance'] * 100:.1f} %), "
            f"{tr['problems_solved']}/{tr['problems']} problems solved."
        )
    return "\n".join(lines) + "\n"


def write_r1_report(c, out: Path) -> dict[str, Any]:
    from nanoseek.measure.r1plots import plot_r1

    report = analyse(c, Path(out))
    report["provenance"] = provenance()
    markdown = render(c, report)
    write_atomic(Path(out) / "report.json", json.dumps(report, indent=1, default=str))
    write_atomic(Path(out) / "report.md", markdown)
    for name, png in plot_r1(c, Path(out), report).items():
        write_atomic(Path(out) / name, png)
    return {**report, "markdown": markdown}
