"""`nanoseek r1-demo`: the R1 pipeline at laptop scale, each claim against its own control, over seeds.

The setting is DeepSeek-R1's, not the generator's: worked solutions are scarce (``worked_examples``, a fixed set)
while problems with a rule-checkable answer are unlimited (the task's training pool). Every student run below is
one stage command on the engine (``nanoseek.rl.stages``), in its own run folder, cached like the comparison
harness's runs (a finished run is reused, an interrupted one resumed), and evaluated on the test split and on a
harder split (one more operand). Per seed:

    base            pretrained on generated arithmetic text that never shows the template (data/synthetic.py)
    r1-zero         GRPO from the base, rule-based rewards only (accuracy + format)                      claim 1
    cold            SFT on the scarce worked examples: the cold start every other student arm starts from
    grpo            + GRPO on the pool (answers only)                                               claims 2, 3, 6
    sft-more        + SFT on the same worked examples, at grpo's student FLOPs                            claim 2
    sft-answers     + SFT on the pool's answers alone, at grpo's student FLOPs                            claim 2
    sft-unlimited   + SFT on unlimited generator solutions, at grpo's FLOPs (an unrealistic upper bound)
    distill-traces  + SFT on the teacher's rejection-sampled traces, at grpo's FLOPs                      claim 3
    distill-onpolicy + on-policy distillation from the teacher, at grpo's FLOPs                          claim 4
    grpo-process    + GRPO with process rewards (verified steps), grpo's steps                            claim 5

and once, shared by the seeds: the teacher (a larger model, cold start on the same worked examples, then GRPO on
the pool) and its traces; its cost is reported apart. Nothing is tuned on the test split: the settings below were
chosen before the demo's evaluations, from training metrics (docs/LOG.md). Report: measure/r1report.py.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nanoseek.schema import build_section, read_toml, require, require_int

EVAL_K = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class R1DemoConfig:
    """The [r1] section of an r1-demo preset: sizes and hyper-parameters of every arm."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Student seeds (every student arm runs every seed)."""
    workers: int = 2
    """Runs trained at once, each in its own process on one thread."""
    digits: int = 1
    """Task: arithmetic operands in [0, 10**digits)."""
    operators: str = "+-"
    """Task: operators."""
    n_operands: int = 3
    """Task: operands per problem (the harder held-out split has one more)."""
    max_new_tokens: int = 48
    """Token budget of a completion (the harder split gets 16 more)."""
    worked_examples: int = 256
    """The scarce set of worked solutions (R1: "thousands" against 800k)."""
    student_width: int = 64
    """Student d_model (2 heads)."""
    student_layers: int = 2
    """Student blocks."""
    teacher_width: int = 128
    """Teacher d_model (4 heads)."""
    teacher_layers: int = 4
    """Teacher blocks."""
    seq_len: int = 96
    """Context of every model."""
    batch_size: int = 32
    """SFT examples per step."""
    cold_steps: int = 600
    """Cold-start SFT steps, at the constant lr cold_lr after a short warm-up (a cold start annealed to convergence
    left GRPO nothing to work with: docs/LOG.md)."""
    cold_lr: float = 3e-3
    """lr of the cold start."""
    sft_lr: float = 3e-3
    """Constant lr of the SFT continuations (the cold start's: more SFT is the cold start, continued)."""
    rl_steps: int = 200
    """GRPO steps of the grpo and grpo-process arms (their FLOPs set the other arms' budget)."""
    rl_lr: float = 1e-4
    """GRPO / on-policy distillation lr (constant)."""
    rl_prompts: int = 8
    """Prompts per GRPO step."""
    group_size: int = 8
    """Completions per prompt."""
    base_lines: int = 40000
    """Lines of the R1-Zero base's generated corpus."""
    base_steps: int = 800
    """Pretraining steps of the R1-Zero base."""
    r1zero_steps: int = 200
    """GRPO steps from the base."""
    r1zero_format_weight: float = 0.1
    """Format reward weight of R1-Zero (the other GRPO arms use accuracy alone)."""
    teacher_cold_steps: int = 1000
    """Teacher cold-start SFT steps."""
    teacher_rl_steps: int = 300
    """Teacher GRPO steps."""
    traces_problems: int = 2048
    """Pool problems the teacher attempts for the traces."""
    traces_samples: int = 4
    """Samples per problem (rejection sampling keeps the verified ones)."""
    eval_problems: int = 100
    """Test problems per evaluation (and of the harder split)."""
    eval_samples: int = 64
    """Samples per problem: pass@1 sampled, maj@k and pass@k up to this k."""
    eval_every: int = 50
    """Steps between the held-out greedy accuracy checks during training (the accuracy-vs-FLOPs curves)."""

    def __post_init__(self) -> None:
        require(len(self.seeds) >= 1, "seeds", self.seeds, "expected at least one seed")
        for name in ("workers", "worked_examples", "cold_steps", "rl_steps", "eval_problems", "eval_samples"):
            require_int(name, getattr(self, name), 1)
        require(all(isinstance(s, int) and s >= 0 for s in self.seeds), "seeds", self.seeds, "expected integers >= 0")


def load_r1_config(path: str | Path, overrides: dict[str, Any] | None = None) -> R1DemoConfig:
    raw = read_toml(path, "r1-demo preset").get("r1", {})
    return build_section(R1DemoConfig, {**raw, **(overrides or {})}, "r1", str(path))


# ---------------------------------------------------------------------------------------------------------------------
# The run configs of every arm


def _task(c: R1DemoConfig, hard: bool = False, **more: Any) -> dict[str, Any]:
    return {"name": "arithmetic", "digits": c.digits, "operators": c.operators,
            "n_operands": c.n_operands + hard, "max_new_tokens": c.max_new_tokens + 16 * hard, **more}  # fmt: skip


def _model(c: R1DemoConfig, teacher: bool = False) -> dict[str, Any]:
    width, layers = (c.teacher_width, c.teacher_layers) if teacher else (c.student_width, c.student_layers)
    return {"d_model": width, "n_layers": layers, "n_heads": 4 if teacher else 2, "seq_len": c.seq_len}


def _train(c: R1DemoConfig, seed: int, steps: int, lr: float, **more: Any) -> dict[str, Any]:
    batch = more.get("batch_size", 16)
    warmup = min(20, steps // 5)
    return {"steps": steps, "lr": lr, "seed": seed, "weight_decay": 0.0, "eval_every": c.eval_every,
            "eval_batches": max(1, 128 // batch), "keep_last": 1, "threads": 1, "warmup_steps": warmup,
            **more}  # fmt: skip


def _steady(c: R1DemoConfig, seed: int, lr: float, **more: Any) -> dict[str, Any]:
    """A constant-lr continuation whose length is set by a FLOPs budget (steps is only a bound)."""
    return _train(c, seed, 1_000_000, lr, schedule="constant", warmup_steps=0, **more)


def arm_config(c: R1DemoConfig, arm: str, seed: int, budget: float = 0.0, out: Path | None = None) -> dict:
    """The raw run config (TOML tables) of ``arm`` at ``seed``; ``budget`` = the student FLOPs of the grpo arm."""
    pool = seed + 1000  # the RL pool's problem stream: not the worked examples' (problems 0..N-1 of `seed`)
    task = _task(c, worked_examples=c.worked_examples)
    grpo = {"group_size": c.group_size, "loss_type": "dapo", "format_weight": 0.0}
    rl = _train(c, pool, c.rl_steps, c.rl_lr, schedule="constant", warmup_steps=0, batch_size=c.rl_prompts)
    sft_budget = {"max_flops": budget, "batch_size": c.batch_size}
    table = {
        "cold": {"train": _train(c, seed, c.cold_steps, c.cold_lr, batch_size=c.batch_size, schedule="constant"),
                 "sft": {"targets": "worked"}},
        "grpo": {"train": rl, "grpo": grpo},
        "grpo-process": {"train": rl, "grpo": {**grpo, "advantage": "process"}},
        "sft-more": {"train": _steady(c, seed, c.sft_lr, **sft_budget), "sft": {"targets": "worked"}},
        "sft-answers": {"train": _steady(c, pool, c.sft_lr, **sft_budget), "sft": {"targets": "answers"}},
        "sft-unlimited": {"train": _steady(c, pool, c.sft_lr, **sft_budget), "sft": {"targets": "worked"}},
        "distill-traces": {"train": _steady(c, seed + 1, c.sft_lr, **sft_budget),
                           "sft": {"data": str(out / "teacher" / "traces.jsonl") if out else ""}},
        "distill-onpolicy": {"train": _steady(c, pool, c.rl_lr, max_flops=budget, batch_size=c.rl_prompts),
                             "distill": {"mode": "on-policy", "teacher": str(out / "teacher" / "grpo") if out else "",
                                         "group_size": c.group_size}},
        "base": {"train": _train(c, seed, c.base_steps, 3e-3, batch_size=c.batch_size, eval_every=200),
                 "data": {"source": str(out / f"seed{seed}" / "base-corpus.txt") if out else "python-docs"}},
        "r1-zero": {"train": rl, "grpo": {**grpo, "format_weight": c.r1zero_format_weight}},
        "teacher-cold": {"train": _train(c, 100, c.teacher_cold_steps, c.cold_lr, batch_size=c.batch_size,
                                         schedule="constant")},
        "teacher-grpo": {"train": _train(c, 1100, c.teacher_rl_steps, c.rl_lr, schedule="constant", warmup_steps=0,
                                         batch_size=c.rl_prompts), "grpo": grpo},
    }  # fmt: skip
    if arm == "sft-unlimited":
        task = _task(c, worked_examples=0)
    raw = {"model": _model(c, teacher=arm.startswith("teacher")), "task": task, **table[arm]}
    if arm == "base":
        raw.pop("task")
    return raw


# ---------------------------------------------------------------------------------------------------------------------
# The job graph

STUDENT_ARMS = ("cold", "grpo", "grpo-process", "sft-more", "sft-answers", "sft-unlimited", "distill-traces",
                "distill-onpolicy", "base", "r1-zero")  # fmt: skip
DEPENDS = {
    "r1-zero": ("base",),
    "grpo": ("cold",),
    "grpo-process": ("cold",),
    "sft-more": ("grpo",),
    "sft-answers": ("grpo",),
    "sft-unlimited": ("grpo",),
    "distill-traces": ("grpo", "traces"),
    "distill-onpolicy": ("grpo", "teacher-grpo"),
}
INIT = {
    "r1-zero": "base",
    "grpo": "cold",
    "grpo-process": "cold",
    "sft-more": "cold",
    "sft-answers": "cold",
    "sft-unlimited": "cold",
    "distill-traces": "cold",
    "distill-onpolicy": "cold",
    "teacher-grpo": "teacher-cold",
}
BUDGETED = ("sft-more", "sft-answers", "sft-unlimited", "distill-traces", "distill-onpolicy")


def jobs(c: R1DemoConfig) -> dict[str, tuple[str, ...]]:
    """Every job name -> the jobs it waits for. Training jobs are 'seed{s}/{arm}' or 'teacher/{stage}', evaluations
    'eval:' + the training job."""
    graph: dict[str, tuple[str, ...]] = {
        "teacher/cold": (),
        "teacher/grpo": ("teacher/cold",),
        "teacher/traces": ("teacher/grpo",),
        "eval:teacher/grpo": ("teacher/grpo",),
    }
    shared = {"traces": "teacher/traces", "teacher-grpo": "teacher/grpo"}
    for seed in c.seeds:
        for arm in STUDENT_ARMS:
            name = f"seed{seed}/{arm}"
            graph[name] = tuple(shared.get(d, f"seed{seed}/{d}") for d in DEPENDS.get(arm, ()))
            graph[f"eval:{name}"] = (name,)
    return graph


def folder_of(out: Path, job: str) -> Path:
    return out / job.removeprefix("eval:")


def finished(folder: Path) -> bool:
    from nanoseek.train.runfolder import read_json

    summary = read_json(folder / "summary.json")
    return bool(summary) and summary.get("stop_reason") in ("steps", "max_flops")


def run_job(job: str, c_dict: dict, out: str) -> dict[str, Any]:
    """Run one job in this (worker) process on one thread; cached: a finished run or evaluation is not redone."""
    import torch

    torch.set_num_threads(1)
    c, out = R1DemoConfig(**c_dict), Path(out)
    t0 = time.perf_counter()
    if job.startswith("eval:"):
        result = evaluate_job(c, folder_of(out, job))
    elif job == "teacher/traces":
        result = traces_job(c, out)
    else:
        result = train_job(c, out, job)
    return {"job": job, "seconds": time.perf_counter() - t0, **result}


def train_job(c: R1DemoConfig, out: Path, job: str) -> dict[str, Any]:
    from nanoseek.config import checkpoint_config, load_run_config
    from nanoseek.data.synthetic import base_corpus
    from nanoseek.rl.stages import run_distill, run_grpo, run_sft
    from nanoseek.train.pretrain import pretrain
    from nanoseek.train.runfolder import read_json

    where, arm = job.split("/")
    seed = 0 if where == "teacher" else int(where.removeprefix("seed"))
    name = f"teacher-{arm}" if where == "teacher" else arm
    folder = out / job
    if finished(folder):
        return {"cached": True}
    if name == "distill-traces" and not read_json(out / "teacher" / "traces.json")["kept"]:
        return {"skipped": "the teacher solved none of its problems: no traces"}
    budget = 0.0
    if name in BUDGETED:
        budget = read_json(out / where / "grpo" / "summary.json")["flops"]
    resume = bool(list(folder.glob("ckpt-*")))
    cfg = checkpoint_config(folder) if resume else load_run_config([], [], base=arm_config(c, name, seed, budget, out))
    if name == "base" and not (out / where / "base-corpus.txt").is_file():
        from nanoseek.data.tasks import TaskConfig

        task = TaskConfig(**_task(c)).build()
        (out / where).mkdir(parents=True, exist_ok=True)
        (out / where / "base-corpus.txt").write_text(base_corpus(task, c.base_lines, seed=seed), encoding="utf-8")
    init = None if resume or name not in INIT else out / where / INIT[name].removeprefix("teacher-")
    options = {"init": init, "resume": resume, "progress": False, "log": lambda message: None}
    if name == "base":
        summary = pretrain(cfg, folder, resume=resume, progress=False, log=lambda message: None)
    elif name in ("grpo", "grpo-process", "r1-zero", "teacher-grpo"):
        summary = run_grpo(cfg, folder, **options)
    elif name == "distill-onpolicy":
        summary = run_distill(cfg, folder, **options)
    else:
        summary = run_sft(cfg, folder, **options)
    return {"step": summary["step"], "flops": summary["flops"], "stop_reason": summary["stop_reason"]}


def traces_job(c: R1DemoConfig, out: Path) -> dict[str, Any]:
    from nanoseek.data.tasks import TaskConfig
    from nanoseek.rl.distill import DistillConfig, rejection_sample
    from nanoseek.train.load import load_model
    from nanoseek.train.runfolder import read_json, write_atomic

    stats = out / "teacher" / "traces.json"
    if read_json(stats):
        return {"cached": True}
    teacher = load_model(out / "teacher" / "grpo")
    task = TaskConfig(**_task(c)).build()
    cfg = DistillConfig(problems=c.traces_problems, samples=c.traces_samples, keep=1)
    cost = rejection_sample(teacher.model, teacher.tokenizer, task, cfg, out / "teacher" / "traces.jsonl", seed=2000,
                            teacher_name="teacher/grpo")  # fmt: skip
    write_atomic(stats, json.dumps(cost, indent=1))
    return cost


def evaluate_job(c: R1DemoConfig, folder: Path) -> dict[str, Any]:
    """pass@1 greedy and sampled, maj@k, pass@k (k up to eval_samples) on the test split, and greedy / sampled on the
    harder split, written to EVAL.json beside the run."""
    from nanoseek.data.tasks import TaskConfig
    from nanoseek.rl.evaluate import evaluate
    from nanoseek.train.load import load_model
    from nanoseek.train.runfolder import read_json, write_atomic

    path = folder / "eval.json"
    if read_json(path):
        return {"cached": True}
    if not finished(folder):
        return {"skipped": "no finished run to evaluate"}
    loaded = load_model(folder)
    ks = tuple(k for k in EVAL_K if k <= c.eval_samples)
    result = {}
    for split, hard in (("test", False), ("hard", True)):
        task = TaskConfig(**_task(c, hard=hard)).build()
        samples = c.eval_samples if not hard else min(16, c.eval_samples)
        r = evaluate(loaded.model, loaded.tokenizer, task, n=c.eval_problems, samples=samples, seed=0, n_examples=2,
                     pass_at=ks if not hard else (1,), allow_fewer=True)  # fmt: skip
        result[split] = {"n": r.n, "samples": r.samples, **r.metrics(), "examples": r.examples}
    write_atomic(path, json.dumps(result, indent=1))
    return {}


# ---------------------------------------------------------------------------------------------------------------------
# Running it all


def run_demo(c: R1DemoConfig, out: str | Path, log=print) -> float:
    """Run every job not already done, ``c.workers`` at a time; returns the wall seconds spent."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    graph, done, running = jobs(c), set(), {}
    t0 = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=c.workers, mp_context=context) as pool:
        while len(done) < len(graph):
            for job, deps in graph.items():
                if job not in done and job not in running and all(d in done for d in deps):
                    running[job] = pool.submit(run_job, job, asdict(c), str(out))
            finished_now, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for job, future in list(running.items()):
                if future in finished_now:
                    result = future.result()  # a failed job raises here, with its message
                    del running[job]
                    done.add(job)
                    shown = "cached" if result.get("cached") else result.get("skipped") or f"{result['seconds']:.0f} s"
                    log(f"[{len(done)}/{len(graph)}] {job}: {shown}")
    return time.perf_counter() - t0


def main_r1(preset_path: Path, out: Path, overrides: dict[str, Any], report_only: bool) -> int:
    from nanoseek.measure.r1report import write_r1_report

    c = load_r1_config(preset_path, overrides)
    if not report_only:
        wall = run_demo(c, out, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"all runs done in {wall:.0f} s", file=sys.stderr)
    report = write_r1_report(c, out)
    print(report["markdown"])
    return 0
