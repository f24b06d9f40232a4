"""The run loops behind `nanoseek sft`, `nanoseek grpo` and `nanoseek eval`: config, checkpoints, metrics, resume.

Both training stages write into a run folder, as pretraining does: ``metrics.jsonl`` (one record per step),
``summary.json`` and ``ckpt-*`` checkpoints whose ``config.toml`` is the full RunConfig ([model], [data], [train],
[task], [grpo]), so ``load_model`` and a later stage read them like any other checkpoint. The optimizer, the step
and (GRPO) ``GRPOTrainer.state_dict()`` go into ``state.pt``; SFT batches are a pure function of the step, so a
resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.config import RunConfig
from nanoseek.data.tasks import Task, TaskConfig
from nanoseek.data.tokenizer import ByteTokenizer, load_tokenizer
from nanoseek.model import Transformer
from nanoseek.rl.evaluate import EvalResult, evaluate
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
from nanoseek.rl.rewards import render_prompt, render_target
from nanoseek.rl.sft import sft_batch, sft_step, task_examples
from nanoseek.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, start_metrics
from nanoseek.train.optim import build_optimizers, lr_factor, set_lr
from nanoseek.train.trainer import deferred_interrupt

# keys of a step record that measure the machine, not the run (they differ between identical runs)
TIMING_KEYS = ("gen_tokens_per_s", "train_tokens_per_s", "seconds", "cpu_seconds")


def grpo_section(cfg: RunConfig) -> GRPOConfig:
    """The [grpo] section, or its defaults (SFT and evaluation read the template and token budget from it)."""
    return cfg.grpo if cfg.grpo is not None else GRPOConfig()


def task_of(cfg: RunConfig) -> Task:
    if cfg.task is None:
        raise ValueError("no task: pass --task NAME or give the config a [task] section")
    return cfg.task.build()


def check_task_fits(
    cfg: RunConfig, tokenizer: Any, task: Task, max_new_tokens: int, *, targets: bool = False, n: int = 50
) -> None:
    """Fail before any work if the model cannot read the task: prompts the tokenizer does not reproduce exactly,
    or a prompt plus max_new_tokens (or, for SFT, plus its ideal completion) longer than the model's seq_len.
    Checks the first n problems of each split."""
    template, seq_len = grpo_section(cfg).template, cfg.model.seq_len
    longest = 0
    for split in ("train", "test"):
        for p in task.problems(split, n, seed=0):
            prompt = render_prompt(template, p.question)
            ids = tokenizer.encode(prompt)
            if tokenizer.decode(ids) != prompt:
                raise ValueError(
                    f"task {task.name!r}: the checkpoint's tokenizer does not reproduce the prompt {prompt!r}"
                )
            if max(ids, default=0) >= cfg.model.vocab_size:
                raise ValueError(f"task {task.name!r}: token ids exceed model.vocab_size={cfg.model.vocab_size}")
            extra = len(tokenizer.encode(render_target(prompt, p.reasoning, p.answer))) if targets else 0
            longest = max(longest, len(ids) + extra)
    what = "prompts and ideal completions" if targets else "prompts"
    if longest + max_new_tokens > seq_len:
        raise ValueError(
            f"model.seq_len={seq_len} is too short for task {task.name!r}: its {what} take up to {longest} tokens "
            f"and grpo.max_new_tokens={max_new_tokens} more are generated (need {longest + max_new_tokens})"
        )


def start_model(cfg: RunConfig, init: str | Path | None) -> tuple[Transformer, Any]:
    """(model, tokenizer): the weights of checkpoint ``init``, or a fresh model from cfg.model (byte tokenizer)."""
    if init is None:
        if cfg.data.tokenizer != "byte":
            raise ValueError("data.tokenizer must be 'byte' for a model started from scratch (no corpus to fit BPE)")
        torch.manual_seed(cfg.train.seed)
        return Transformer(cfg.model), ByteTokenizer()
    folder, _, weights, _ = load_checkpoint(init)
    model = Transformer(cfg.model)
    model.load_state_dict(weights)
    return model, load_tokenizer(folder)


class RunFolder:
    """metrics.jsonl and checkpoints of one stage; on resume, records written after the checkpoint are dropped."""

    def __init__(self, out: str | Path, cfg: RunConfig, resumed_step: int | None):
        self.out, self.cfg = Path(out), cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out / "metrics.jsonl"
        start_metrics(self.metrics, resumed_step)

    def write(self, record: dict[str, float]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, step: int, model: torch.nn.Module, tokenizer: Any, state: dict) -> Path:
        return save_checkpoint(self.out, step, model, self.cfg, tokenizer, state, self.cfg.train.keep_last)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _resume_state(out: Path, resume: bool, stage: str) -> dict | None:
    if not resume:
        if list_checkpoints(out):
            raise ValueError(f"{out} already holds checkpoints; continue it with --resume, or choose another --out")
        return None
    _, _, _, state = load_checkpoint(out)
    if state.get("stage") != stage:
        raise ValueError(f"{out} holds a {state.get('stage', 'pretraining')!r} run, not {stage!r}: cannot resume")
    return state


def _loop(cfg, out, model, tokenizer, state, stage, step_fn, state_fn, postfix, progress):
    """The shared step loop: run ``step_fn(step) -> record`` to train.steps, with metrics, progress bar,
    checkpoints (state.pt = ``state_fn(step)``) every train.ckpt_every steps and at the end, and Ctrl-C finishing
    the current step first."""
    t = cfg.train
    step = int(state["step"]) if state else 0
    folder = RunFolder(out, cfg, step if state else None)
    bar = tqdm(total=t.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True, mininterval=0.5)
    wall, cpu, stop_reason = time.perf_counter(), time.process_time(), "steps"
    model.train()
    with deferred_interrupt() as interrupted:
        while step < t.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            record = {**step_fn(step), "step": step + 1}
            record |= {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
            step += 1
            folder.write(record)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in postfix if k in record})
            bar.update(1)
            if interrupted():
                stop_reason = "interrupted"
                break
            if t.ckpt_every and step % t.ckpt_every == 0 and step < t.steps:
                folder.save(step, model, tokenizer, state_fn(step))
    bar.close()
    path = folder.save(step, model, tokenizer, state_fn(step))
    return folder.finish(
        {
            "stage": stage,
            "step": step,
            "stop_reason": stop_reason,
            "final": {k: v for k, v in record.items() if k not in TIMING_KEYS} if step else {},
            "wall_seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu,
            "checkpoint": str(path),
        }
    )


def run_sft(
    cfg: RunConfig, out: str | Path, *, init: str | Path | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Supervised cold start on the task's train split: train.steps steps of train.batch_size (prompt, ideal
    completion) pairs, loss on the completion only, lr schedule of [train]. Starts from ``init`` or from scratch."""
    out = Path(out)
    state = _resume_state(out, resume, "sft")
    task = task_of(cfg)
    model, tokenizer = start_model(cfg, out if resume else init)
    grpo = grpo_section(cfg)
    check_task_fits(cfg, tokenizer, task, 0, targets=True)
    (optimizer,) = build_optimizers(model, replace(cfg.train, optimizer="adamw"))
    if state:
        optimizer.load_state_dict(state["optimizer"])
    t = cfg.train

    def step_fn(step: int) -> dict[str, float]:
        lr = set_lr([optimizer], lr_factor(step, t))
        examples = task_examples(task, t.batch_size, template=grpo.template, seed=t.seed, start=t.batch_size * step)
        idx, targets = sft_batch(tokenizer, examples, cfg.model.seq_len)
        return {"lr": lr, **sft_step(model, optimizer, idx, targets, t.grad_clip)}

    def state_fn(step: int) -> dict:
        return {"stage": "sft", "step": step, "optimizer": optimizer.state_dict()}

    return _loop(cfg, out, model, tokenizer, state, "sft", step_fn, state_fn, ("loss", "lr"), progress)


def run_grpo(
    cfg: RunConfig, out: str | Path, *, init: str | Path | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """GRPO from checkpoint ``init`` (usually an SFT run): train.steps GRPOTrainer steps at a constant train.lr
    (AdamW, train.weight_decay), hyper-parameters from [grpo]."""
    out = Path(out)
    state = _resume_state(out, resume, "grpo")
    if init is None and not resume:
        raise ValueError("--init is required: GRPO starts from a checkpoint (e.g. an SFT run folder)")
    cfg.grpo = grpo_section(cfg)  # a pretraining checkpoint has no [grpo]: its defaults
    task = task_of(cfg)
    model, tokenizer = start_model(cfg, out if resume else init)
    check_task_fits(cfg, tokenizer, task, cfg.grpo.max_new_tokens)
    (optimizer,) = build_optimizers(model, replace(cfg.train, optimizer="adamw"))
    trainer = GRPOTrainer(model, optimizer, tokenizer, task, cfg.grpo)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        trainer.load_state_dict(state["grpo"])

    def state_fn(step: int) -> dict:
        return {"stage": "grpo", "step": step, "optimizer": optimizer.state_dict(), "grpo": trainer.state_dict()}

    shown = ("reward_mean", "reward_accuracy", "completion_len", "zero_variance_frac", "kl", "entropy")
    return _loop(cfg, out, model, tokenizer, state, "grpo", lambda _: trainer.step(), state_fn, shown, progress)


def run_eval(
    ckpt: str | Path,
    *,
    task: TaskConfig | None = None,
    n: int = 200,
    samples: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    n_examples: int = 3,
) -> EvalResult:
    """Evaluate a checkpoint on the test split of ``task`` (default: the checkpoint's [task]); the template and
    token budget are the checkpoint's [grpo] ones."""
    folder, cfg, weights, _ = load_checkpoint(ckpt)
    cfg.task = task or cfg.task
    built = task_of(cfg)
    grpo = grpo_section(cfg)
    tokenizer = load_tokenizer(folder)
    check_task_fits(cfg, tokenizer, built, grpo.max_new_tokens)
    model = Transformer(cfg.model)
    model.load_state_dict(weights)
    model.eval()
    return evaluate(
        model,
        tokenizer,
        built,
        n=n,
        samples=samples,
        template=grpo.template,
        max_new_tokens=grpo.max_new_tokens,
        temperature=temperature,
        seed=seed,
        n_examples=n_examples,
    )
