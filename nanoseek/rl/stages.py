"""The reasoning stages as commands: ``nanoseek sft``, ``grpo`` and ``eval`` on a task, each on the one engine.

A run's config is the full RunConfig: [model], [data], [train], [task] (which problems, and how they are put to the
model: template, token budget, stop strings) and, for GRPO, [grpo]. A checkpoint's ``config.toml`` holds all of
them, so the next stage, ``load_model`` and ``nanoseek sample`` read it like any other checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.examples import JsonlExamples, TaskExamples
from nanoseek.data.tasks import MAX_PROBLEMS, Task, TaskConfig
from nanoseek.data.templates import render_target
from nanoseek.model.config import ModelConfig
from nanoseek.rl.distill import DistillConfig, OnPolicyDistill, rejection_sample
from nanoseek.rl.evaluate import EvalResult, evaluate
from nanoseek.rl.grpo import GRPO, GRPOConfig
from nanoseek.schema import build_section, require_int
from nanoseek.train.runfolder import write_atomic
from nanoseek.train.runner import run
from nanoseek.train.sft import SFT, SFTConfig


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
    """Supervised fine-tuning, from ``init`` or from scratch, on [sft]'s data: a JSONL file (sft.data), or the task's
    examples — worked solutions (at most task.worked_examples of them) or answers alone (sft.targets). Evaluation:
    held-out loss and, with a [task], greedy accuracy. ``run_options``: see train.runner.run."""
    sft = cfg.sft if cfg.sft is not None else SFTConfig()
    task = task_of(cfg) if cfg.task is not None or not sft.data else None
    if init is None and not resume and cfg.data.tokenizer != "byte":
        raise ValueError("data.tokenizer must be 'byte' for a model started from scratch (no corpus to fit BPE)")
    examples = (
        JsonlExamples(sft.data) if sft.data else TaskExamples(task, cfg.train.seed, sft.targets, task.worked_examples)
    )
    t = cfg.train

    def build(engine, tokenizer) -> SFT:
        if task is not None and not sft.data:
            check_task_fits(cfg.model, tokenizer, task, targets=True)
        evaluator = accuracy_evaluator(task, tokenizer, t.eval_batches * t.batch_size) if task is not None else None
        return SFT(engine, tokenizer, examples, cfg.model.seq_len, evaluator)

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


def run_distill(cfg, out: str | Path, *, init: str | Path | None = None, resume: bool = False, **run_options: Any):
    """Distil [distill].teacher into the student (``init``, or a fresh model from cfg.model) on the task's pool of
    problems. traces: rejection-sample the teacher once into OUT/traces.jsonl (its cost in OUT/traces.json, reused
    on resume), then SFT on the traces; on-policy: the OnPolicyDistill stage. Evaluation: greedy accuracy."""
    from nanoseek.train.load import load_model

    d = cfg.distill if cfg.distill is not None else DistillConfig()
    if not d.teacher:
        raise ValueError("no teacher: pass --teacher CKPT (or set distill.teacher)")
    task = task_of(cfg)
    teacher = load_model(d.teacher)
    out = Path(out)
    t = cfg.train

    def build(engine, tokenizer):
        if (teacher.tokenizer.name, teacher.tokenizer.vocab_size) != (tokenizer.name, tokenizer.vocab_size):
            raise ValueError(f"the teacher's tokenizer ({teacher.tokenizer.name}) differs from the student's")
        check_task_fits(cfg.model, tokenizer, task)
        evaluator = accuracy_evaluator(task, tokenizer, t.eval_batches * t.batch_size)
        if d.mode == "on-policy":
            return OnPolicyDistill(engine, tokenizer, task, teacher.model, d, evaluator)
        traces, stats = out / "traces.jsonl", out / "traces.json"
        settings = {"teacher": str(teacher.folder), "distill": vars(d), "task": vars(cfg.task), "seed": t.seed}
        done = json.loads(stats.read_text()) if stats.is_file() and traces.is_file() else {}
        if done.get("settings") != settings:
            cost = rejection_sample(
                teacher.model, tokenizer, task, d, traces, seed=t.seed, teacher_name=str(teacher.folder)
            )
            write_atomic(stats, json.dumps({"settings": settings, **cost}, indent=1))
            done = {"kept": cost["kept"]}
        if not done["kept"]:
            raise ValueError(
                f"the teacher solved none of the {d.problems} problems ({d.samples} samples each): no traces to learn "
                "from; use a stronger teacher, more samples, or more problems"
            )
        return SFT(engine, tokenizer, JsonlExamples(traces), cfg.model.seq_len, evaluator)

    return run(cfg, out, build, init=init, resume=resume, **run_options)


MAX_SAMPLES = 4096
"""Most samples per problem in an evaluation (as --pass-at-k's largest k)."""


def run_eval(
    ckpt: str | Path,
    *,
    task: TaskConfig | None = None,
    n: int = 200,
    samples: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    n_examples: int = 3,
    pass_at: tuple[int, ...] = (),
) -> EvalResult:
    """Evaluate a checkpoint on the test split of ``task`` (default: the checkpoint's [task], with its template,
    budget and stop strings); ``pass_at``: the k of pass@k (``samples`` is raised to the largest)."""
    from nanoseek.train.load import load_model

    require_int("--n", n, 1, MAX_PROBLEMS)
    require_int("--samples", samples, 0, MAX_SAMPLES)
    loaded = load_model(ckpt)
    if task is None:
        if "task" not in loaded.config:
            raise ValueError(f"{loaded.folder} has no [task]: pass --task NAME")
        task = build_section(TaskConfig, loaded.config["task"], "task", str(loaded.folder / "config.toml"))
    built = task.build()
    check_task_fits(loaded.model.cfg, loaded.tokenizer, built)
    return evaluate(
        loaded.model, loaded.tokenizer, built, n=n, samples=max(samples, *pass_at, 0), temperature=temperature,
        seed=seed, n_examples=n_examples, pass_at=pass_at,
    )  # fmt: skip
