"""The one step loop under every stage.

A stage is an object with

    name                      'pretrain', 'sft', 'grpo', ... (recorded in its checkpoints; a resume checks it)
    step(step) -> dict        one step: the stage's work, with engine.update() for each optimizer update; returns
                              the step's metrics, with 'tokens' and 'flops' it processed (summed up by the loop)
    evaluate() -> dict        metrics of an evaluation (validation loss, held-out accuracy, ...), or {}
    diagnostics() -> dict     occasional extra metrics (residual gains), or {}
    state_dict() / load_state_dict(state)    what an exact resume needs besides weights and optimizers
    postfix                   the metric names shown on the progress bar
    close()                   optional: called once when the stage stops, before its last checkpoint

and ``run_stage`` does everything else, the same way for all: the lr schedule, the clock (wall, process CPU and
joules of the caller's energy meter, accumulated over resumes, excluding each process's first step — compilation
and allocator warm-up, reported as warmup_seconds — and evaluation / checkpoint time), evaluation every
train.eval_every steps and at the end, metrics.jsonl, the progress bar, checkpoints every train.ckpt_every steps
and at the end, the time and compute budgets, and Ctrl-C / SIGTERM (finish the step, evaluate, checkpoint, stop;
a second signal aborts at once).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from nanoseek.model import moe_stats
from nanoseek.train.checkpoint import Checkpoint
from nanoseek.train.engine import Engine
from nanoseek.train.runfolder import RunFolder

TIMING_KEYS = ("wall_seconds", "cpu_seconds", "warmup_seconds", "tokens_per_second", "energy_j")
"""Keys of a step record that measure the machine, not the run (they differ between identical runs)."""
COUNTERS = ("step", "tokens", "flops")
"""Cumulative keys of a step record; the summary has them at its top level."""


class Stage(Protocol):
    name: str
    postfix: tuple[str, ...]

    def step(self, step: int) -> dict[str, Any]: ...

    def evaluate(self) -> dict[str, Any]: ...

    def diagnostics(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C / SIGTERM: the run stops at once, without a checkpoint of the step in progress."""


class Clock:
    """Wall and process-CPU seconds, and the joules of an optional energy meter, accumulated only while running."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0, energy: float = 0.0, meter=None):
        self.wall, self.cpu, self.energy, self.meter, self._t0 = wall, cpu, energy, meter, None

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), self.meter.read() if self.meter else 0.0

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> None:
        if self._t0 is not None:
            now = self._now()
            self.wall += now[0] - self._t0[0]
            self.cpu += now[1] - self._t0[1]
            self.energy += now[2] - self._t0[2]
            self._t0 = None


@contextmanager
def deferred_interrupt():
    """Turn the first SIGINT or SIGTERM into a flag checked between steps, so a checkpoint is never taken
    mid-update; the flag's value is the signal's name. A second signal raises ``Interrupted``."""
    hit: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        if hit:
            raise Interrupted(f"second {signal.Signals(signum).name}: stopped at once, without a checkpoint")
        hit.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: hit[0] if hit else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def log_stderr(message: str) -> None:
    """Human-readable progress goes to stderr (above the progress bar); stdout is left for results."""
    tqdm.write(message, file=sys.stderr)


def run_stage(
    stage: Stage,
    engine: Engine,
    folder: RunFolder,
    config: dict[str, Any],
    tokenizer,
    *,
    checkpoint: Checkpoint | None = None,
    info: dict[str, Any] | None = None,
    meter=None,
    progress: bool = True,
    log: Callable[[str], None] = log_stderr,
    callback: Callable[[dict], None] | None = None,
    until: int | None = None,
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``stage`` to train.steps (or ``until``, for tests that simulate an interruption), continuing from
    ``checkpoint`` when given. ``config`` is the full run config (saved in every checkpoint and in run.json),
    ``info`` more facts for run.json (data, provenance, the meter's description), ``meter`` an energy meter with
    ``read() -> joules``, ``callback(record)`` is called after every step. Returns the summary (also written to
    summary.json); ``inputs``, hashes of what the run reads, go into every checkpoint for the resume check."""
    t, d = engine.cfg, engine.dist
    state: dict[str, Any] = {}
    if checkpoint is not None:
        state = checkpoint.state
        if state.get("stage", "pretrain") != stage.name:
            raise ValueError(
                f"{folder.path} holds a {state.get('stage', 'pretrain')!r} run, not {stage.name!r}: cannot resume it"
            )
        engine.load_state(checkpoint.weights, state["optimizers"])
        stage.load_state_dict(state.get("stage_state", {}))
        torch.set_rng_state(state["rng"])
    step = int(state.get("step", 0))
    counters = {"tokens": state.get("tokens", 0), "flops": state.get("flops", 0.0)}
    engine.skipped = state.get("skipped", 0)
    clock = Clock(state.get("wall_seconds", 0.0), state.get("cpu_seconds", 0.0), state.get("energy_j", 0.0), meter)
    warmup = state.get("warmup_seconds", 0.0)
    if checkpoint is not None and step >= t.steps:
        summary = folder.summary() or {"stage": stage.name, "step": step, "stop_reason": "steps"}
        log(f"{folder.path} is already finished ({step} of train.steps={t.steps} steps): nothing to do")
        return summary

    model = engine.model
    run_info = {
        "stage": stage.name,
        "config": config,
        "params": model.num_params(),
        "active_params": model.num_params(active=True),
        "flops_per_token": model.flops_per_token(),
        "world_size": d.world,
        **(info or {}),
    }
    if meter is not None:
        run_info["energy"] = meter.describe()
    folder.start(run_info, step if checkpoint is not None else None)
    saved_step = step if checkpoint is not None else None

    def save() -> Path | None:
        nonlocal saved_step
        weights, optimizer_state = engine.state()
        path = folder.save(
            step,
            weights,
            config,
            tokenizer,
            {
                "stage": stage.name,
                "step": step,
                **counters,
                "skipped": engine.skipped,
                "wall_seconds": clock.wall,
                "cpu_seconds": clock.cpu,
                "energy_j": clock.energy,
                "warmup_seconds": warmup,
                "optimizers": optimizer_state,
                "stage_state": stage.state_dict(),
                "rng": torch.get_rng_state(),
                "inputs": inputs or {},
            },
            t.keep_last,
        )
        saved_step = step
        return path

    last = min(t.steps, until) if until is not None else t.steps
    bar = tqdm(
        total=t.steps, initial=step, disable=not (progress and d.main), unit="step", dynamic_ncols=True,
        mininterval=0.5, file=sys.stderr,
    )  # fmt: skip
    record: dict[str, Any] = {}
    final: dict[str, Any] = {}
    first, stop_reason, signal_name = True, None, None
    model.train()
    with deferred_interrupt() as interrupted:
        while step < last and stop_reason is None:
            lr = engine.set_lr(step)
            t0 = time.perf_counter()
            if not first:
                clock.start()
            metrics = stage.step(step)
            clock.stop()
            if first:
                warmup += time.perf_counter() - t0
                first = False
            step += 1
            step_tokens = metrics.pop("tokens", 0)
            counters["tokens"] += step_tokens
            counters["flops"] += metrics.pop("flops", 0.0)
            signal_name = interrupted()
            if d.broadcast_flag(signal_name is not None):
                stop_reason = "interrupted"
            elif t.max_time and d.broadcast_flag(clock.wall + warmup >= t.max_time):
                stop_reason = "max_time"
            elif t.max_flops and counters["flops"] >= t.max_flops:
                stop_reason = "max_flops"
            elif step == last:
                stop_reason = "steps"
            record = {
                "step": step,
                "lr": lr,
                **metrics,
                "tokens": counters["tokens"],
                "flops": counters["flops"],
                "wall_seconds": clock.wall,
                "cpu_seconds": clock.cpu,
                "warmup_seconds": warmup,
                "tokens_per_second": step_tokens / max(time.perf_counter() - t0, 1e-9),
                **moe_stats(model),
            }
            if meter is not None:
                record["energy_j"] = clock.energy
            if step % t.eval_every == 0 or stop_reason:
                evaluation = stage.evaluate()
                record |= evaluation
                if evaluation:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items() if isinstance(v, float))
                    log(f"step {step}/{t.steps}: {shown}")
            if t.diag_every and (step % t.diag_every == 0 or stop_reason):
                record |= stage.diagnostics()
            folder.append(record)
            final |= {k: v for k, v in record.items() if k not in (*TIMING_KEYS, *COUNTERS) and not isinstance(v, list)}
            if callback is not None:
                callback(record)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in stage.postfix if isinstance(record.get(k), float)})
            bar.update(1)
            if t.ckpt_every and step % t.ckpt_every == 0 and not stop_reason:
                save()
    bar.close()
    if hasattr(stage, "close"):
        stage.close()  # background work of the stage (GRPO's overlap) ends before the final checkpoint
    if stop_reason == "interrupted":
        log(f"interrupted ({signal_name}) at step {step}: checkpoint written; continue with --resume")
    path = save() if saved_step != step else None  # else: this step is already checkpointed (ckpt_every)
    summary = {
        "stage": stage.name,
        "step": step,
        "stop_reason": stop_reason or "steps",
        "signal": signal_name if stop_reason == "interrupted" else None,
        "final": final,
        "tokens": counters["tokens"],
        "flops": counters["flops"],
        "wall_seconds": clock.wall,
        "cpu_seconds": clock.cpu,
        "warmup_seconds": warmup,
        "skipped_steps": engine.skipped,
        "checkpoint": str(path or folder.path / f"ckpt-{step:07d}") if d.main else None,
    }
    if meter is not None:
        summary["energy_j"] = clock.energy
    folder.finish(summary)
    return summary
