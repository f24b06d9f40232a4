"""The report of a comparison, built from its cached runs: report.json, report.md and PNG plots.

How the headline table is computed:

* **target**: the baseline's final validation loss, mean over its seeds (or the given target loss);
* a run's **compute / time / energy / cost to reach** quality: its cumulative analytic FLOPs, timed wall seconds,
  joules and cost at its first evaluation with val loss ≤ target (``stats.first_reach``). A run that never gets
  there counts in ``reached_runs / total_runs`` and is left out of the mean: it is never extrapolated;
* **100 %** is the baseline's reference: with the default target, its full run (mean over seeds — on average the
  point where it reaches its own final loss); with a given target, its own values to reach it (mean over its seeds
  that did). Every other figure is mean ± 95 % CI (Student's t) over the arm's seeds that reached, in % of it;
* **cost** = device-hours (timed wall seconds × processes / 3600) × price per device-hour.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import tomli_w

from nanoseek.measure.arms import Comparison, Run, device_type
from nanoseek.measure.plots import plot_report
from nanoseek.measure.provenance import provenance
from nanoseek.measure.stats import SPIKE_RISE, SPIKE_WINDOW, diff_ci, figure, first_reach, loss_spikes
from nanoseek.train.runfolder import RunFolder, read_json, write_atomic

# report.json name -> metrics.jsonl key, for the "to reach" figures
MEASURES = {"compute": "flops", "time": "wall_seconds", "cpu_time": "cpu_seconds", "energy": "energy_j", "cost": "cost"}
GAIN_KEYS = ("fwd_max", "fwd_min", "bwd_max", "bwd_min")


def read_metrics(folder: Path) -> list[dict]:
    return RunFolder(folder).records()


def run_result(run: Run, folder: Path, target: float, price: float) -> dict:
    """Everything the report needs from one finished run folder."""
    records, info = read_metrics(folder), read_json(folder / "run.json")
    evals = [r for r in records if "val_loss" in r]

    def point(r: dict) -> dict:
        cost = r["wall_seconds"] * info["world_size"] / 3600 * price
        return {"step": r["step"]} | {k: r[k] for k in MEASURES.values() if k != "cost"} | {"cost": cost}

    hit = first_reach(evals, target)
    after_warmup = [r for r in records if r["step"] > run.cfg.train.warmup_steps] or records  # step 1's is large
    diag = next((r for r in reversed(records) if "gain_fwd_max" in r), None)
    gains = read_json(folder / "gains.json")
    return {
        "arm": run.arm,
        "seed": run.seed,
        "folder": folder.name,
        "steps": records[-1]["step"],
        "final_val_loss": evals[-1]["val_loss"],
        "full": point(records[-1]),
        "reached": point(hit) if hit else None,
        "warmup_seconds": records[-1]["warmup_seconds"],
        "params": info["params"],
        "flops_per_token": info["flops_per_token"],
        "energy": info["energy"],
        "git_commit": info["provenance"]["git_commit"],
        "data": info["data"],
        "max_grad_norm": max(r["grad_norm"] for r in after_warmup),
        "loss_spikes": len(loss_spikes([r["train_loss"] for r in records])),
        "skipped_steps": read_json(folder / "summary.json")["skipped_steps"],
        "composite_gain": {k: diag[f"gain_{k}"] for k in GAIN_KEYS} if diag else None,
        "moe_max_violation": records[-1].get("moe_max_violation"),
        "layer_gains": gains["per_layer"] if gains else None,
        "evals": [{k: r[k] for k in ("step", "flops", "wall_seconds", "val_loss")} for r in evals],
    }


def _mean_per_layer(seeds: list[list[dict]]) -> list[dict]:
    """Per-site gains averaged over seeds: seeds[s][site] -> {gain name: value}."""
    return [{k: statistics.fmean(seed[i][k] for seed in seeds) for k in seeds[0][i]} for i in range(len(seeds[0]))]


def analyse(comparison: Comparison, runs: list[tuple[Run, Path]]) -> dict:
    """report.json's content from the finished runs."""
    base = comparison.baseline
    device = device_type(runs[0][0].cfg)
    price = comparison.price(device)
    finals = [read_json(folder / "summary.json")["final"]["val_loss"] for run, folder in runs if run.arm == base]
    target = comparison.target_loss or statistics.fmean(finals)
    results = [run_result(run, folder, target, price) for run, folder in runs]
    by_arm = {arm: [r for r in results if r["arm"] == arm] for arm in comparison.arms}
    full_reference = not comparison.target_loss

    def reference_points(arm: str) -> list[dict]:
        rs = by_arm[arm]
        return [r["full"] for r in rs] if arm == base and full_reference else [r["reached"] for r in rs if r["reached"]]

    ref = {k: statistics.fmean(p[k] for p in reference_points(base)) for k in MEASURES.values()}
    base_finals = [r["final_val_loss"] for r in by_arm[base]]
    arms = []
    for arm, rs in by_arm.items():
        points = reference_points(arm)
        arm_finals = [r["final_val_loss"] for r in rs]
        entry = {"name": arm, "reached_runs": sum(r["reached"] is not None for r in rs), "total_runs": len(rs)}
        for name, key in MEASURES.items():
            entry[f"{name}_pct"] = figure([p[key] for p in points], 100 / ref[key]) if ref[key] else None
        entry["final_val_loss"] = figure(arm_finals)
        if arm != base:
            delta, ci = diff_ci(arm_finals, base_finals)
            entry["final_val_loss_vs_baseline"] = {"mean": delta, "ci95": ci}
        entry["steps_to_reach"] = [r["reached"]["step"] if r["reached"] else None for r in rs]
        entry["full_run"] = {
            "steps": rs[0]["steps"],
            "params": rs[0]["params"],
            "flops_per_token": rs[0]["flops_per_token"],
            "flops": rs[0]["full"]["flops"],
            "wall_seconds": figure([r["full"]["wall_seconds"] for r in rs]),
            "cpu_seconds": figure([r["full"]["cpu_seconds"] for r in rs]),
            "warmup_seconds": figure([r["warmup_seconds"] for r in rs]),
            "energy_j": figure([r["full"]["energy_j"] for r in rs]),
            "seconds_per_step": figure([r["full"]["wall_seconds"] / max(1, r["steps"] - 1) for r in rs]),
        }
        gains = [r["composite_gain"] for r in rs if r["composite_gain"]]
        layers = [r["layer_gains"] for r in rs if r["layer_gains"]]
        violations = [r["moe_max_violation"] for r in rs if r["moe_max_violation"] is not None]
        entry["stability"] = {
            "max_grad_norm": figure([r["max_grad_norm"] for r in rs]),
            "loss_spikes": [r["loss_spikes"] for r in rs],
            "skipped_steps": [r["skipped_steps"] for r in rs],
            "composite_gain": {k: figure([g[k] for g in gains]) for k in GAIN_KEYS} if gains else None,
            "layer_gains": _mean_per_layer(layers) if layers else None,
            "moe_max_violation": figure(violations) if violations else None,
        }
        arms.append(entry)
    meters = {json.dumps(r["energy"], sort_keys=True): r["energy"] for r in results}
    methods = {m["method"] for m in meters.values()}
    return {
        "comparison": comparison.name,
        "baseline": base,
        "target_loss": target,
        "target_source": "given" if comparison.target_loss else f"baseline final val loss, mean of {len(finals)} seeds",
        "reference": "baseline full run" if full_reference else "baseline to reach the target",
        "reference_values": ref,
        "budget": comparison.budget,
        "seeds": comparison.seeds,
        "energy_method": methods.pop() if len(methods) == 1 else "mixed",
        "energy_sources": [m["source"] for m in meters.values()],
        "device": device,
        "price_per_hour": price,
        "loss_spike": f"train loss > (1 + {SPIKE_RISE:g}) × median of the previous {SPIKE_WINDOW} steps, or not finite",
        "arms": arms,
        "runs": results,
        "config": {"base": comparison.base, "arms": comparison.arms},
        "provenance": provenance()
        | {
            "run_git_commits": sorted({r["git_commit"] for r in results}),
            "corpus": {k: results[0]["data"][k] for k in ("corpus", "corpus_sha256", "corpus_bytes", "python_version")},
            "tokenizer": results[0]["data"]["tokenizer"],
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# report.md


def _pct(fig: dict | None) -> str:
    if fig is None:
        return "not reached"
    ci = f" ± {fig['ci95']:.1f}" if fig["ci95"] is not None else " (1 run)"
    return f"{fig['mean']:.1f} %{ci}"


def _num(fig: dict | None, fmt: str = ".4f", sign: str = "") -> str:
    if fig is None:
        return "–"
    return f"{fig['mean']:{sign}{fmt}}" + (f" ± {fig['ci95']:{fmt}}" if fig["ci95"] is not None else "")


def _absolute(report: dict) -> dict[str, str]:
    """The baseline's 100 % in units."""
    mean = report["reference_values"]
    return {
        "compute": f"{mean['flops']:.3g} FLOP",
        "time": f"{mean['wall_seconds']:.1f} s",
        "energy": f"{mean['energy_j']:.0f} J",
        "cost": f"${mean['cost']:.4f}",
    }


def render_headline(report: dict) -> str:
    """The claim-shaped table and the final losses: what the command prints."""
    arms, base = report["arms"], report["baseline"]
    absolute = _absolute(report)
    head = "| | " + " | ".join(a["name"] for a in arms) + " |\n|---|" + "---|" * len(arms)
    rows = []
    for label, key in (("Compute", "compute"), ("Time", "time"), ("Energy", "energy"), ("Cost", "cost")):
        cells = [_pct(a[f"{key}_pct"]) + (f" ({absolute[key]})" if a["name"] == base else "") for a in arms]
        rows.append(f"| **{label}** to reach quality | " + " | ".join(cells) + " |")
    rows.append(
        "| Runs that reached the target | " + " | ".join(f"{a['reached_runs']}/{a['total_runs']}" for a in arms) + " |"
    )
    steps = [", ".join("–" if s is None else str(s) for s in a["steps_to_reach"]) for a in arms]
    rows.append("| Step reached, per seed | " + " | ".join(steps) + " |")
    lines = [
        f"# nanoseek compare: {report['comparison']}",
        "",
        f"Quality = validation loss ≤ **{report['target_loss']:.4f}** nats/token ({report['target_source']}). "
        f"Budget: same {report['budget']} per arm. Seeds: {', '.join(map(str, report['seeds']))}. "
        f"Energy: **{report['energy_method']}** ({'; '.join(report['energy_sources'])}). "
        f"Cost: device-hours × ${report['price_per_hour']:g} per {report['device']} device-hour.",
        "",
        head,
        *rows,
        "",
        f"100 % = the {report['reference']} ({base}). Other cells: mean ± 95 % CI (Student's t) over the seeds that "
        "reached the target, as % of it; a run that never reached it is counted as not reached and never "
        "extrapolated. Time is timed wall-clock training (warm-up, evaluation and checkpoints excluded).",
        "",
        "## Final validation loss",
        "",
        "| arm | mean ± 95 % CI | per seed | vs baseline (Welch 95 % CI) |",
        "|---|---|---|---|",
    ]
    for a in arms:
        seeds = ", ".join(f"{r['final_val_loss']:.4f}" for r in report["runs"] if r["arm"] == a["name"])
        vs = a.get("final_val_loss_vs_baseline")
        lines.append(f"| {a['name']} | {_num(a['final_val_loss'])} | {seeds} | {_num(vs, sign='+') if vs else '–'} |")
    return "\n".join(lines) + "\n"


def render_markdown(report: dict) -> str:
    arms = report["arms"]
    lines = [
        render_headline(report),
        "## Full runs",
        "",
        "| arm | steps | params | FLOPs/token | s/step | wall s | CPU s | warm-up s | energy J |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        f = a["full_run"]
        lines.append(
            f"| {a['name']} | {f['steps']} | {f['params']:,} | {f['flops_per_token']:,} | "
            f"{_num(f['seconds_per_step'], '.3f')} | {_num(f['wall_seconds'], '.1f')} | {_num(f['cpu_seconds'], '.1f')}"
            f" | {_num(f['warmup_seconds'], '.2f')} | {_num(f['energy_j'], '.0f')} |"
        )
    lines += [
        "",
        "## Stability",
        "",
        f"Max grad norm: the largest gradient norm (before clipping) after the learning-rate warm-up. "
        f"Loss spike: a step whose {report['loss_spike']}. Composite gain: the mHC paper's Amax gain of the product "
        "of all H_res at the last step (forward = max row sum, backward = max column sum; ideal 1), mean over seeds. "
        "MoE max violation: max_i load_i / mean load − 1 over the experts of the last step (0 = balanced).",
        "",
        "| arm | max grad norm | loss spikes per seed | skipped steps | gain fwd max / min | gain bwd max / min "
        "| MoE max violation |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        s, g = a["stability"], a["stability"]["composite_gain"]
        fwd = f"{_num(g['fwd_max'], '.3f')} / {_num(g['fwd_min'], '.3f')}" if g else "–"
        bwd = f"{_num(g['bwd_max'], '.3f')} / {_num(g['bwd_min'], '.3f')}" if g else "–"
        spikes, skipped = ", ".join(map(str, s["loss_spikes"])), ", ".join(map(str, s["skipped_steps"]))
        moe = _num(s["moe_max_violation"], ".2f") if s["moe_max_violation"] else "–"
        lines.append(
            f"| {a['name']} | {_num(s['max_grad_norm'], '.3f')} | {spikes} | {skipped} | {fwd} | {bwd} | {moe} |"
        )
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    p = report["provenance"]
    m, c = p["machine"], p["corpus"]
    lines += [
        "",
        "## Provenance",
        "",
        f"- code: nanoseek {p['nanoseek']}, git {p['git_commit']} (runs trained at {', '.join(p['run_git_commits'])})",
        f"- versions: Python {p['python']}, torch {p['torch']}, numpy {p['numpy']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['platform']}",
        f"- corpus: {c['corpus']} ({c['corpus_bytes']:,} bytes, Python {c['python_version']}), "
        f"SHA-256 {c['corpus_sha256']}, tokenizer {p['tokenizer']}",
        f"- seeds: {', '.join(map(str, report['seeds']))}; runs: {', '.join(r['folder'] for r in report['runs'])}",
        "",
        "Base config:",
        "",
        "```toml",
        tomli_w.dumps(report["config"]["base"]).strip(),
        "```",
        "",
        "Arms (overrides of the base):",
        "",
        "```toml",
        tomli_w.dumps({"arms": report["config"]["arms"]}).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_report(comparison: Comparison, runs: list[tuple[Run, Path]], out: Path) -> dict:
    """Write report.json, report.md and the plots into ``out``; return the report."""
    report = analyse(comparison, runs)
    plots = plot_report(report)
    for name, png in plots.items():
        write_atomic(out / name, png)
    report["plots"] = list(plots)
    write_atomic(out / "report.json", json.dumps(report, indent=1))
    write_atomic(out / "report.md", render_markdown(report))
    return report
