"""Distillation into a small student, as DeepSeek-R1 (§4.1) and Qwen3 did it, in two ways.

* **Traces (off-policy)**: a teacher samples ``samples`` completions of each of ``problems`` training problems;
  the verifier keeps the right ones (rejection sampling, at most ``keep`` distinct ones per problem); the student is
  fine-tuned on them with the SFT stage. The traces are a JSONL file anyone can read
  (``datasets.load_dataset("json", data_files=...)``): prompt, completion, reward, teacher, sampling settings.
* **On-policy**: the student samples, the teacher scores every token the student wrote, and the per-token
  advantage is −(log π_student − log π_teacher), the negative reverse-KL term of that token, in the policy-gradient
  loop (GRPO's, with token advantages; Qwen3 technical report, "on-policy distillation"). Its expected gradient is
  the gradient of the per-token reverse KL(π_student ‖ π_teacher) (tested by enumeration on a small case); with
  teacher = student the advantage is 0 and nothing moves.

What the teacher costs (its sampling or its scoring) is counted apart from the student's FLOPs, as R1 reported its
teacher's cost apart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tasks import Task
from nanoseek.rl.grpo import GRPO, GRPOConfig
from nanoseek.rl.rewards import accuracy_reward, extract_answer
from nanoseek.rl.rollout import Rollout, complete
from nanoseek.schema import check_choice, require, require_int
from nanoseek.train.engine import Engine
from nanoseek.train.runfolder import write_atomic

MODES = ("traces", "on-policy")


@dataclass
class DistillConfig:
    """The [distill] section: how a teacher's knowledge reaches the student (the student's optimisation is
    [train]'s; the problems, template and token budget are [task]'s)."""

    mode: str = "traces"
    """traces (rejection-sampled teacher completions, then SFT on them) or on-policy (the student samples, the
    teacher scores every token: reverse-KL advantages in the policy-gradient loop)."""
    teacher: str = ""
    """The teacher checkpoint (a run folder or ckpt-* folder); `nanoseek distill --teacher` sets it."""
    problems: int = 512
    """traces: training problems the teacher attempts."""
    samples: int = 8
    """traces: completions sampled per problem (k of rejection sampling)."""
    keep: int = 1
    """traces: at most this many distinct verified completions kept per problem."""
    temperature: float = 1.0
    """Sampling temperature of the teacher (traces) or of the student (on-policy)."""
    group_size: int = 4
    """on-policy: completions the student samples per prompt (at least 2, as GRPO's groups)."""

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        require_int("problems", self.problems, 1, 10_000_000)
        require_int("samples", self.samples, 1, 4096)
        require_int("keep", self.keep, 1, 4096)
        require_int("group_size", self.group_size, 2, 65536)
        require(0 < self.temperature <= 10, "temperature", self.temperature, "expected a number in (0, 10]")


# ---------------------------------------------------------------------------------------------------------------------
# Traces: rejection sampling


def rejection_sample(
    teacher: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    cfg: DistillConfig,
    out: Path,
    *,
    seed: int = 0,
    teacher_name: str = "",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Sample cfg.samples completions of training problems 0 .. cfg.problems - 1 (of ``seed``'s stream) from the
    teacher, keep the verified ones (at most cfg.keep distinct per problem), write them to ``out`` (JSONL, written
    atomically) and return what it cost: problems, samples, kept, acceptance, tokens, FLOPs and seconds of the
    teacher."""
    teacher.eval()
    verify = accuracy_reward(task)
    generator = torch.Generator().manual_seed(seed)
    rows, tokens, t0, c0 = [], 0, time.perf_counter(), time.process_time()
    problems = [task.problem("train", seed, i) for i in range(cfg.problems)]
    flat = [(i, p) for i, p in enumerate(problems) for _ in range(cfg.samples)]
    kept: dict[int, set[str]] = {}
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        prompts = [task.prompt(p) for _, p in chunk]
        prompt_ids, completion_ids, _ = complete(
            teacher, tokenizer, prompts, task.max_new_tokens, stop=task.stop, temperature=cfg.temperature,
            generator=generator,
        )  # fmt: skip
        texts = [tokenizer.decode(c) for c in completion_ids]
        tokens += sum(len(a) + len(b) for a, b in zip(prompt_ids, completion_ids, strict=True))
        fields = {k: [p.fields[k] for _, p in chunk] for k in chunk[0][1].fields}
        right = verify(prompts, texts, **fields)
        for (index, _), prompt, text, ok in zip(chunk, prompts, texts, right, strict=True):
            seen = kept.setdefault(index, set())
            if ok and text not in seen and len(seen) < cfg.keep:
                seen.add(text)
                sampling = {"temperature": cfg.temperature, "samples": cfg.samples}
                rows.append({"prompt": prompt, "completion": text, "reward": 1.0, "problem": index,
                             "teacher": teacher_name, **sampling})  # fmt: skip
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    longest = task.max_new_tokens + max(len(tokenizer.encode(task.prompt(p))) for p in problems)
    return {
        "problems": cfg.problems,
        "samples": cfg.problems * cfg.samples,
        "kept": len(rows),
        "problems_solved": sum(1 for v in kept.values() if v),
        "acceptance": len(rows) / (cfg.problems * cfg.samples),
        "teacher_tokens": tokens,
        "teacher_flops": tokens * teacher.flops_per_token(longest) / 3,  # sampling: forward passes only
        "teacher_seconds": time.perf_counter() - t0,
        "teacher_cpu_seconds": time.process_time() - c0,
        "has_answer": sum(extract_answer(r["completion"]) is not None for r in rows),
    }


# ---------------------------------------------------------------------------------------------------------------------
# On-policy: reverse-KL advantages from the teacher, in GRPO's loop


def reverse_kl_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages −(log π_student − log π_teacher) on the completion tokens (0 elsewhere): (N, T)."""
    return -(student_logp - teacher_logp) * mask


class OnPolicyDistill(GRPO):
    """The student samples grpo-style groups (``group_size`` completions per prompt, train.batch_size prompts per
    micro-batch), the teacher scores every token, and the update is the policy gradient with per-token advantages
    −(log π_s − log π_t). Logged: reverse_kl (mean per token of log π_s − log π_t on the student's samples, an
    estimate of the per-token reverse KL), the accuracy of the samples, teacher_flops (its scoring, apart)."""

    name = "distill"
    postfix = ("reverse_kl", "reward_accuracy", "completion_len")

    def __init__(self, engine: Engine, tokenizer: Any, task: Task, teacher: torch.nn.Module, cfg: DistillConfig,
                 evaluator=None):  # fmt: skip
        grpo = GRPOConfig(group_size=cfg.group_size, temperature=cfg.temperature, loss_type="dapo")
        super().__init__(engine, tokenizer, task, grpo, {"accuracy": (accuracy_reward(task), 1.0)}, evaluator)
        self.teacher = teacher.to(engine.device).eval().requires_grad_(False)
        self._extra: dict[str, float] = {}

    def advantages(self, rollout: Rollout, n_tokens: int) -> torch.Tensor:
        device = self.engine.device
        ids, starts, mask = (x.to(device) for x in rollout.batch())
        lengths = starts + mask.sum(-1)
        with torch.no_grad(), self.engine.autocast():
            was_training = self.model.training
            self.model.eval()
            student = self._logprobs(self.model, ids, starts, lengths, n_tokens)[0]
            self.model.train(was_training)
            teacher = self._logprobs(self.teacher, ids, starts, lengths, n_tokens)[0]
        real = int(lengths.sum())
        self._extra = {
            "reverse_kl": float(((student - teacher) * mask).sum() / mask.sum().clamp(min=1)),
            "teacher_flops": real * self.teacher.flops_per_token(ids.shape[1]) / 3,
            "scoring_flops": real * self.model.flops_per_token(ids.shape[1]) / 3,
        }
        return reverse_kl_advantages(student, teacher, mask).cpu()

    def step(self, step: int = 0) -> dict[str, float]:
        metrics = super().step(step)
        extra = self._extra
        metrics["flops"] += extra.pop("scoring_flops", 0.0)  # the student's own extra forward is student compute
        return {**metrics, **extra}
