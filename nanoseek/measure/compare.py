"""Run a comparison: every (arm, seed) training run, cached, then the report built from the cache.

Each run lives in ``OUT/runs/<arm>-seed<k>-<hash12>``, the hash covering its full config, the training code and the
torch version (arms.py), so a changed config or code trains afresh while an unchanged one is reused:

* finished (summary.json with stop_reason 'steps' at the configured step count): skipped;
* interrupted with a checkpoint: resumed exactly (``pretrain(resume=True)``);
* otherwise: trained from the start.

Runs go interleaved by seed (all arms of seed 0, then seed 1, ...), so an interruption leaves comparable sets and
slow drifts of the machine's load touch every arm alike. With an explicit target loss the baseline's runs go first,
so a target the baseline never reaches stops the comparison before the other arms spend anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tomli_w
from tqdm import tqdm

from nanoseek.config import checkpoint_config
from nanoseek.data.loader import TokenData, load_token_data, val_batches
from nanoseek.measure.arms import Comparison, Run, device_type
from nanoseek.measure.energy import EnergyMeter, select_meter
from nanoseek.measure.provenance import provenance
from nanoseek.measure.report import write_report
from nanoseek.model.diagnostics import residual_gains
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.load import load_model
from nanoseek.train.pretrain import pretrain
from nanoseek.train.runfolder import RunFolder, read_json, write_atomic


def run_folder(out: Path, run: Run) -> Path:
    return out / "runs" / run.name


def run_state(folder: Path, run: Run) -> tuple[str, int]:
    """('finished' | 'resume' | 'new', steps already done)."""
    summary = read_json(folder / "summary.json")
    if summary and summary.get("stop_reason") == "steps" and summary.get("step") == run.cfg.train.steps:
        return "finished", run.cfg.train.steps
    checkpoints = list_checkpoints(folder)
    if checkpoints:
        return "resume", int(checkpoints[-1].name.split("-")[1])
    return "new", 0


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def check_target(comparison: Comparison, runs: list[Run], out: Path) -> None:
    """An explicit target must be reached by at least one baseline run, else the table would be empty."""
    lowest = min(
        r["val_loss"]
        for run in runs
        if run.arm == comparison.baseline
        for r in map(json.loads, (run_folder(out, run) / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    )
    if lowest > comparison.target_loss:
        raise ValueError(
            f"--target-loss {comparison.target_loss:g} is never reached by the baseline arm {comparison.baseline!r}: "
            f"its lowest validation loss over {len(comparison.seeds)} seed(s) is {lowest:.4f}; choose a target >= "
            "that, or 0 for the baseline's own final loss"
        )


def layer_gains(folder: Path, data: TokenData) -> dict | None:
    """Per-site and composite gains of the final checkpoint (hc / mhc), on the first validation windows."""
    loaded = load_model(folder)
    x, _ = next(val_batches(data.val, loaded.model.cfg.seq_len, 2, 1))
    gains = residual_gains(loaded.model, x)  # None when no site mixes streams (without running the model)
    if gains is None:
        return None
    return {"per_layer": [vars(g) for g in gains.per_layer], "composite": vars(gains.composite)}


def train_run(run: Run, folder: Path, data: TokenData, meter: EnergyMeter, bar: tqdm, resume: bool) -> dict:
    """Train (or finish) one run; its per-evaluation log lines go to train.log, the steps to ``bar``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "config.toml", tomli_w.dumps(run.cfg.to_dict()))
    if not resume:
        (folder / "train.log").unlink(missing_ok=True)

    def log(message: str) -> None:
        with open(folder / "train.log", "a") as f:
            f.write(message + "\n")

    bar.set_postfix_str(f"{run.arm} seed {run.seed}")
    return pretrain(
        checkpoint_config(folder) if resume else run.cfg, folder, resume=resume, data=data,
        info={"provenance": provenance()}, meter=meter, progress=False, log=log, callback=lambda record: bar.update(1),
    )  # fmt: skip


def run_comparison(
    comparison: Comparison, out: str | Path, report_only: bool = False, progress: bool = True, log=_log
) -> dict | None:
    """Train what the cache lacks (unless ``report_only``), then write the report; returns report.json's content,
    or None when training was interrupted (Ctrl-C: the current run is checkpointed; run again to continue)."""
    out = Path(out)
    folder = RunFolder(out, log=log)
    folder.lock()  # one comparison per --out: a second one would train the same runs and interleave their records
    try:
        return _run_comparison(comparison, out, report_only, progress, log)
    finally:
        folder.unlock()


def _run_comparison(comparison: Comparison, out: Path, report_only: bool, progress: bool, log) -> dict | None:
    first = comparison.arm_config(comparison.baseline, comparison.seeds[0])
    data = load_token_data(first.data, first.model.seq_len)
    runs = comparison.runs(data.tokenizer.vocab_size)
    states = {run.name: run_state(run_folder(out, run), run) for run in runs}
    missing = [run for run in runs if states[run.name][0] != "finished"]
    baseline_missing = [run for run in missing if run.arm == comparison.baseline]
    if report_only and missing:
        raise ValueError(
            f"--report-only: {len(missing)} of {len(runs)} runs are not finished in {out / 'runs'}: "
            f"{', '.join(run.name for run in missing)}; run without --report-only to train them"
        )
    if comparison.target_loss and not baseline_missing:
        check_target(comparison, runs, out)
    if missing:
        if comparison.target_loss:
            missing = baseline_missing + [run for run in missing if run.arm != comparison.baseline]
        meter = select_meter(device_type(first), comparison.watts_per_core)
        log(
            f"{len(runs)} runs ({len(comparison.arms)} arms × {len(comparison.seeds)} seeds), {len(missing)} to train "
            f"into {out / 'runs'}; energy {meter.method}: {meter.source}"
        )
        bar = tqdm(
            total=sum(run.cfg.train.steps for run in runs), initial=sum(done for _, done in states.values()),
            unit="step", disable=not progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
        )  # fmt: skip
        for run in missing:
            folder = run_folder(out, run)
            summary = train_run(run, folder, data, meter, bar, resume=states[run.name][0] == "resume")
            if summary["stop_reason"] != "steps":
                bar.close()
                log(f"{run.name}: {summary['stop_reason']} at step {summary['step']}; run the same command to continue")
                return None
            log(
                f"{run.arm} seed {run.seed}: {summary['step']} steps, val loss {summary['final']['val_loss']:.4f}, "
                f"{summary['wall_seconds']:.1f} s, {summary['flops']:.3g} FLOPs, {summary['energy_j']:.0f} J "
                f"({folder})"
            )
            if comparison.target_loss and baseline_missing and run is baseline_missing[-1]:
                check_target(comparison, runs, out)
        bar.close()
    for run in runs:  # per-layer gains of the final models, once
        folder = run_folder(out, run)
        if not (folder / "gains.json").is_file():
            write_atomic(folder / "gains.json", json.dumps(layer_gains(folder, data), indent=1))
    return write_report(comparison, [(run, run_folder(out, run)) for run in runs], out)
