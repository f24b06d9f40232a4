"""The training loop: pretraining on token windows, exact resume, evaluation, diagnostics, failure handling.

One optimizer step = ``grad_accum`` micro-batches per process, gradient clipping, the optimizer(s), then any
post-step hook of the model (MoE router-bias balancing). Measured per step and written to ``metrics.jsonl``: loss,
learning rate, gradient norm, tokens, cumulative analytic FLOPs, tokens/s, wall / process-CPU seconds of training
and, given an energy meter, its joules. Timed seconds and joules exclude the first step of each process (compilation
and allocator warm-up, reported as ``warmup_seconds``) and the time spent evaluating or checkpointing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nanoseek.config import RunConfig
from nanoseek.data.loader import TokenData, load_token_data, train_batch, val_batches
from nanoseek.measure.energy import EnergyMeter
from nanoseek.measure.provenance import provenance
from nanoseek.model import Transformer, moe_stats
from nanoseek.model.diagnostics import residual_gains
from nanoseek.train import distributed
from nanoseek.train.checkpoint import load_checkpoint, save_checkpoint, start_metrics
from nanoseek.train.optim import build_optimizers, lr_factor, set_lr


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss with on_nan='stop'); the message names the step."""


class Clock:
    """Wall and process-CPU seconds, and the joules of an optional energy meter, accumulated only while running."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0, energy: float = 0.0, meter: EnergyMeter | None = None):
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


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        resume: str | Path | None = None,
        overrides: list[str] = (),
        data: TokenData | None = None,
        progress: bool = True,
        log=None,
        meter: EnergyMeter | None = None,
        callback: Callable[[dict], None] | None = None,
    ):
        """``meter`` adds cumulative ``energy_j`` to every metrics record; ``callback(record)`` is called after each
        step (e.g. to drive an outer progress bar)."""
        state, weights = None, None
        if resume is not None:
            _, cfg, weights, state = load_checkpoint(resume, overrides)
        self.dist = distributed.setup(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.out_dir, self.log, self.progress = Path(out_dir), log or _log, progress
        self.meter, self.callback = meter, callback
        self.data = data or load_token_data(cfg.data, cfg.model.seq_len)
        if cfg.model.vocab_size != self.data.tokenizer.vocab_size:
            cfg.model = dataclasses.replace(cfg.model, vocab_size=self.data.tokenizer.vocab_size)
        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.dist.device)
        if weights is not None:
            self.model.load_state_dict(weights)
        self.optimizers = build_optimizers(self.model, cfg.train)
        self.step, self.tokens, self.flops, self.skipped = 0, 0, 0.0, 0
        self.clock, self.warmup_seconds = Clock(meter=meter), 0.0
        if state is not None:
            for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
            self.step, self.tokens, self.flops = state["step"], state["tokens"], state["flops"]
            self.skipped, self.warmup_seconds = state["skipped"], state["warmup_seconds"]
            self.clock = Clock(state["wall_seconds"], state["cpu_seconds"], state.get("energy_j", 0.0), meter)
            torch.set_rng_state(state["rng"])
        self.flops_per_token = self.model.flops_per_token()
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        if self.dist.world > 1:
            ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.forward, device_ids=ids)
        self.autocast = (
            torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
            if cfg.train.dtype == "bfloat16"
            else nullcontext()
        )
        if self.dist.main:
            self._start_run_folder(resumed=state is not None)

    # -----------------------------------------------------------------------------------------------------------------

    def _start_run_folder(self, resumed: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start_metrics(self.out_dir / "metrics.jsonl", self.step if resumed else None)
        run = {
            "config": self.cfg.to_dict(),
            "data": self.data.metadata,
            "provenance": provenance(),
            "params": self.model.num_params(),
            "flops_per_token": self.flops_per_token,
            "world_size": self.dist.world,
        }
        if self.meter is not None:
            run["energy"] = self.meter.describe()
        (self.out_dir / "run.json").write_text(json.dumps(run, indent=1))

    def _write_metrics(self, record: dict) -> None:
        if self.dist.main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation windows, averaged over processes."""
        self.model.eval()
        t = self.cfg.train
        losses = []
        d = self.dist
        for x, y in val_batches(self.data.val, self.cfg.model.seq_len, t.batch_size, t.eval_batches, d.rank, d.world):
            with self.autocast:
                losses.append(self.model(x.to(d.device), y.to(d.device))[1].float())
        self.model.train()
        return d.mean(torch.stack(losses).mean()).item()

    def _diagnostics(self) -> dict:
        x, _ = next(val_batches(self.data.val, self.cfg.model.seq_len, 2, 1))
        gains = residual_gains(self.model, x.to(self.dist.device))
        if gains is None:
            return {}
        c = gains.composite
        return {
            "gain_fwd_max": c.forward_max,
            "gain_fwd_min": c.forward_min,
            "gain_bwd_max": c.backward_max,
            "gain_bwd_min": c.backward_min,
        }

    def save(self) -> Path | None:
        """Checkpoint the current state (main process only)."""
        if not self.dist.main:
            return None
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "flops": self.flops,
            "skipped": self.skipped,
            "wall_seconds": self.clock.wall,
            "cpu_seconds": self.clock.cpu,
            "energy_j": self.clock.energy,
            "warmup_seconds": self.warmup_seconds,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "rng": torch.get_rng_state(),
        }
        return save_checkpoint(
            self.out_dir, self.step, self.model, self.cfg, self.data.tokenizer, state, self.cfg.train.keep_last
        )

    # -----------------------------------------------------------------------------------------------------------------

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean loss over processes, gradient norm), before the update is applied."""
        t, d = self.cfg.train, self.dist
        total = torch.zeros((), device=d.device)
        for micro in range(t.grad_accum):
            x, y = train_batch(
                self.data.train, self.cfg.model.seq_len, t.batch_size, t.seed, self.step, micro, d.rank, d.world
            )
            sync = micro == t.grad_accum - 1 or d.world == 1
            with nullcontext() if sync else self.forward.no_sync(), self.autocast:
                loss = self.forward(x.to(d.device), y.to(d.device))[1] / t.grad_accum
            loss.backward()
            total += loss.detach().float()
        loss = d.mean(total).item()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf).item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            what = f"loss={loss}" if not math.isfinite(loss) else f"gradient norm={norm}"
            if t.on_nan == "stop":
                raise TrainingError(
                    f"non-finite {what} at step {self.step + 1}: training stopped and no checkpoint was written from "
                    "these weights (set train.on_nan='skip' to skip such steps, or lower train.lr)"
                )
            self.skipped += 1
            self.log(f"step {self.step + 1}: non-finite {what}, step skipped ({self.skipped} so far)")
            return loss, norm
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()  # MoE load balancing (a no-op for dense models)
        return loss, norm

    def run(self, until: int | None = None) -> dict:
        """Train up to ``train.steps`` (or ``until``, for tests that simulate an interruption). Returns a summary.

        Ctrl-C (SIGINT) finishes the current step, evaluates, checkpoints and returns; a second Ctrl-C aborts."""
        t = self.cfg.train
        last = min(t.steps, until) if until is not None else t.steps
        tokens_per_step = t.batch_size * t.grad_accum * self.dist.world * self.cfg.model.seq_len
        bar = tqdm(
            total=t.steps, initial=self.step, disable=not (self.progress and self.dist.main), unit="step",
            dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip
        loss, val_loss, first, stop_reason = None, None, True, None
        self.model.train()
        with deferred_interrupt() as interrupted:
            while self.step < last and stop_reason is None:
                lr = set_lr(self.optimizers, lr_factor(self.step, t))
                t0 = time.perf_counter()
                if not first:
                    self.clock.start()
                loss, norm = self._train_step()
                self.clock.stop()
                if first:
                    self.warmup_seconds += time.perf_counter() - t0
                    first = False
                self.step += 1
                self.tokens += tokens_per_step
                self.flops += tokens_per_step * self.flops_per_token
                if self.dist.broadcast_flag(interrupted()):
                    stop_reason = "interrupted"
                elif t.max_time and self.dist.broadcast_flag(self.clock.wall + self.warmup_seconds >= t.max_time):
                    stop_reason = "max_time"
                elif self.step == last:
                    stop_reason = "steps"
                record = {
                    "step": self.step,
                    "tokens": self.tokens,
                    "train_loss": loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "flops": self.flops,
                    "wall_seconds": self.clock.wall,
                    "cpu_seconds": self.clock.cpu,
                    "warmup_seconds": self.warmup_seconds,
                    "tokens_per_second": tokens_per_step / (time.perf_counter() - t0),
                    **moe_stats(self.model),
                }
                if self.meter is not None:
                    record["energy_j"] = self.clock.energy
                if self.step % t.eval_every == 0 or stop_reason:
                    val_loss = record["val_loss"] = self.evaluate()
                    self.log(f"step {self.step}/{t.steps}: train loss {loss:.4f}, val loss {val_loss:.4f}")
                if t.diag_every and (self.step % t.diag_every == 0 or stop_reason):
                    record |= self._diagnostics()
                self._write_metrics(record)
                if self.callback is not None:
                    self.callback(record)
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}" if val_loss is not None else "-")
                bar.update(1)
                if t.ckpt_every and self.step % t.ckpt_every == 0 and not stop_reason:
                    self.save()
        bar.close()
        if stop_reason == "interrupted":
            self.log(f"interrupted at step {self.step}: checkpoint written; continue with --resume")
        path = self.save()
        summary = {
            "step": self.step,
            "stop_reason": stop_reason or "steps",
            "final_train_loss": loss,
            "final_val_loss": val_loss,
            "tokens": self.tokens,
            "flops": self.flops,
            "wall_seconds": self.clock.wall,
            "cpu_seconds": self.clock.cpu,
            "warmup_seconds": self.warmup_seconds,
            "skipped_steps": self.skipped,
            "checkpoint": str(path) if path else None,
        }
        if self.meter is not None:
            summary["energy_j"] = self.clock.energy
        if self.dist.main:  # atomically: a complete summary.json is what marks a finished run
            tmp = self.out_dir / f".summary.json.tmp{os.getpid()}"
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, self.out_dir / "summary.json")
        return summary


def _log(message: str) -> None:
    """Human-readable progress goes to stderr (above the progress bar); stdout is left for results."""
    tqdm.write(message, file=sys.stderr)


@contextmanager
def deferred_interrupt():
    """Turn the first SIGINT into a flag checked between steps, so a checkpoint is never taken mid-update."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)
