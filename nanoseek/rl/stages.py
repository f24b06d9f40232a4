"""The reasoning stages as commands: ``nanoseek sft``, ``grpo`` and ``eval`` on a task, each on the one engine.

A run's config is the full RunConfig: [model], [data], [train], [task] (which problems, and how they are put to the
model: template, token budget, stop strings) and, for GRPO, [grpo]. A checkpoint's ``config.toml`` holds all of
them, so the next stage, ``load_model`` and ``nanoseek sample`` read it like any other checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.examples import TaskExamples
from nanoseek.data.tasks import Task, TaskConfig
from nanoseek.data.templates import render_target
from nanoseek.model.config import ModelConfig
from nanoseek.rl.evaluate import EvalResult, evaluate
from nanoseek.rl.grpo import GRPO, GRPOConfig
from nanoseek.schema import build_section
from nanoseek.train.runner import run
from nanoseek.train.sft import SFT


def task_of(cfg) -> Task:
    if cfg.task is None:
        raise ValueError("no task: pass --task NAME or give the config a [task] section")
    return cfg.task.build()


def check_task_fits(model: ModelConfig, tokenizer: Any, task: Task, *, targets: bool = False, n: int = 50) -> None:
    """Fail before any work if the model cannot read the task: prompts the tokenizer does not reproduce exactly,
    or a prompt plus task.max_new_tokens (or, for SFT, plus its ideal completion) longer than the model's seq_len.
    Checks the first n problems of each split."""
    longest = 0
    for split in ("train", "test"):
        for p in task.problems(split, n, seed=0):
            prompt = task.prompt(p)
            ids = tokenizer.encode(prompt)
            if tokenizer.decode(ids) != prompt:
                raise ValueError(f"task {task.name!r}: the model's tokenizer does not reproduce the prompt {prompt!r}")
            if max(ids, default=0) >= model.vocab_size:
                raise ValueError(f"task {task.name!r}: token ids exceed model.vocab_size={model.vocab_size}")
            extra = len(tokenizer.encode(render_target(prompt, p.reasoning, p.answer))) if targets else 0
            longest = max(longest, len(ids) + extra)
    budget = 0 if targets else task.max_new_tokens
    what = "prompts and ideal completions" if targets else "prompts"
    if longest + budget > model.seq_len:
        more = "" if targets else f" and task.max_new_tokens={budget} more are generated"
        raise ValueError(
            f"model.seq_len={model.seq_len} is too short for task {task.name!r}: its {what} take up to {longest} "
            f"tokens{more} (need {longest + budget})"
        )


def accuracy_evaluator(task: Task, tokenizer: Any, n: int) -> Callable[[torch.nn.Module], dict]:
    """Greedy pass@1, format rate and completion length on the first ``n`` test problems: the held-out metrics the
    reasoning stages log at every evaluation."""

    def measure(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        result = evaluate(model, tokenizer, task, n=n, samples=0, n_examples=0, allow_fewer=True)
        model.train(was_training)
        return {k: v for k, v in result.metrics().items() if not k.endswith(("_low", "_high"))}

    return measure


def run_sft(
    cfg, out: str | Path, *, init: str | Path | None = None, resume: bool = False, **run_options: Any
) -> dict[str, Any]:
    """Supervised cold start on the task's worked solutions (train split): train.steps steps on the engine, from
    ``init`` or from scratch; evaluation: held-out loss and greedy accuracy. ``run_options``: see train.runner.run."""
    task = task_of(cfg)
    if init is None and not resume and cfg.data.tokenizer != "byte":
        raise ValueError("data.tokenizer must be 'byte' for a model started from scratch (no corpus to fit BPE)")
    t = cfg.train

    def build(engine, tokenizer) -> SFT:
        check_task_fits(cfg.model, tokenizer, task, targets=True)
        evaluator = accuracy_evaluator(task, tokenizer, t.eval_batches * t.batch_size)
        return SFT(engine, tokenizer, TaskExamples(task, t.seed), cfg.model.seq_len, evaluator)

    return run(cfg, out, build, init=init, resume=resume, **run_options)


def run_grpo(
    cfg, out: str | Path, *, init: str | Path | None = None, resume: bool = False, **run_options: Any
) -> dict[str, Any]:
    """GRPO from checkpoint ``init`` (usually an SFT run), hyper-parameters from [grpo], everything the engine does
    from [train]; evaluation: greedy accuracy on held-out problems."""
    if init is None and not resume:
        raise ValueError("--init is required: GRPO starts from a checkpoint (e.g. an SFT run folder)")
    cfg.grpo = cfg.grpo if cfg.grpo is not None else GRPOConfig()  # a pretraining checkpoint has no [grpo]
    task = task_of(cfg)
    t = cfg.train

    def build(engine, tokenizer) -> GRPO:
        check_task_fits(cfg.model, tokenizer, task)
        evaluator = accuracy_evaluator(task, tokenizer, t.eval_batches * t.batch_size)
        return GRPO(engine, tokenizer, task, cfg.grpo, evaluator=evaluator)

    return run(cfg, out, build, init=init, resume=resume, **run_options)


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
    """Evaluate a checkpoint on the test split of ``task`` (default: the checkpoint's [task], with its template,
    budget and stop strings)."""
    from nanoseek.train.load import load_model

    loaded = load_model(ckpt)
    if task is None:
        if "task" not in loaded.config:
            raise ValueError(f"{loaded.folder} has no [task]: pass --task NAME")
        task = build_section(TaskConfig, loaded.config["task"], "task", str(loaded.folder / "config.toml"))
    built = task.build()
    check_task_fits(loaded.model.cfg, loaded.tokenizer, built)
    return evaluate(
        loaded.model, loaded.tokenizer, built, n=n, samples=samples, temperature=temperature, seed=seed,
        n_examples=n_examples,
    )  # fmt: skip
