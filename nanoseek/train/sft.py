"""Supervised fine-tuning on (prompt, completion) pairs, with the loss on the completion tokens only — a stage of
the engine.

Used for the "cold start" (show a small model the task format before RL, as DeepSeek-R1 does) and for
distillation (completions written by a teacher). Prompt and completion are tokenised separately, exactly as the
prompt is tokenised at generation time, so the model learns to continue the prompt it will actually see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.data.examples import TARGETS
from nanoseek.schema import check_choice
from nanoseek.train.engine import Engine


@dataclass
class SFTConfig:
    """The [sft] section: what the supervised stage learns from (its optimisation is [train]'s)."""

    data: str = ""
    """A JSONL file of {"prompt", "completion"} rows (e.g. teacher traces from `nanoseek distill`); empty: the task's
    own examples ([task])."""
    targets: str = "worked"
    """With the task's examples: worked (think block with the generator's worked solution, then the answer — at most
    task.worked_examples of them) or answers (an empty think block and the answer alone, for every problem of the
    pool)."""

    def __post_init__(self) -> None:
        check_choice("targets", self.targets, TARGETS)


def sft_batch(
    tokenizer: Any, examples: Sequence[tuple[str, str]], seq_len: int, *, pack: bool = False, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, targets and the real-token mask, each (B, L), for next-token prediction; targets are -1
    (ignored) on prompt tokens and padding.

    An example of p prompt and t target tokens (plus the tokenizer's ``eos_id``, if it has one) takes p + t - 1
    positions. Without ``pack`` each example is one row; with it, whole examples are placed one after another in a
    row while they fit (attention then crosses example boundaries, as in plain LM packing; the targets still score
    each target token once). Rows are right-padded to the longest row, L ≤ seq_len; an example longer than
    seq_len is an error, not silently cut."""
    eos = getattr(tokenizer, "eos_id", None)
    rows: list[tuple[list[int], list[int]]] = []
    for i, (prompt, target) in enumerate(examples):
        p, t = tokenizer.encode(prompt), tokenizer.encode(target) + ([eos] if eos is not None else [])
        if not p or not t:
            raise ValueError(f"example {i} is invalid: prompt and target must both be non-empty")
        ids, labels = p + t[:-1], [-1] * (len(p) - 1) + t  # position j predicts token j + 1
        if len(ids) > seq_len:
            raise ValueError(f"example {i} is invalid: {len(ids)} positions are longer than seq_len={seq_len}")
        if pack and rows and len(rows[-1][0]) + len(ids) <= seq_len:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(labels)
        else:
            rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (ids, labels) in enumerate(rows):
        idx[r, : len(ids)] = torch.tensor(ids)
        targets[r, : len(labels)] = torch.tensor(labels)
        real[r, : len(ids)] = True
    return idx, targets, real


class SFT:
    """``examples``: a source with ``train(start, n)`` and ``held_out(n)`` (nanoseek.data.examples). Per step and
    process, train.grad_accum micro-batches of train.batch_size examples, the stream dealt out over processes;
    evaluation: the loss on train.eval_batches × train.batch_size held-out examples, plus ``evaluator(model)``
    (e.g. held-out accuracy) when given."""

    name = "sft"
    postfix = ("train_loss", "val_loss", "pass1_greedy")

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        examples,
        seq_len: int,
        evaluator: Callable[[torch.nn.Module], dict] | None = None,
    ):
        self.engine, self.tokenizer, self.examples, self.seq_len = engine, tokenizer, examples, seq_len
        self.evaluator = evaluator
        self._held_out: list[tuple[str, str]] | None = None

    def _batch(self, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(x.to(self.engine.device) for x in sft_batch(self.tokenizer, examples, self.seq_len))

    def step(self, step: int) -> dict[str, Any]:
        t, d, engine = self.engine.cfg, self.engine.dist, self.engine
        per_step = t.batch_size * t.grad_accum * d.world
        tokens = [0, 0]  # real tokens, target tokens

        def micro(i: int):
            def loss() -> torch.Tensor:
                start = step * per_step + (i * d.world + d.rank) * t.batch_size
                idx, targets, real = self._batch(self.examples.train(start, t.batch_size))
                tokens[0] += int(real.sum())
                tokens[1] += int((targets >= 0).sum())
                return engine.forward(idx, targets, pad_mask=real)[1] / t.grad_accum

            return loss

        update = engine.update([micro(i) for i in range(t.grad_accum)])
        seen = int(d.sum(torch.tensor(tokens[0])).item())
        return {
            "train_loss": update.loss,
            "grad_norm": update.grad_norm,
            "target_tokens": float(d.sum(torch.tensor(tokens[1])).item()),
            "tokens": seen,
            "flops": seen * engine.model.flops_per_token(self.seq_len),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss per target token over the held-out examples (every process scores train.eval_batches batches
        of its share), then ``evaluator(model)`` if any."""
        t, d, engine = self.engine.cfg, self.engine.dist, self.engine
        if self._held_out is None:
            self._held_out = self.examples.held_out(t.eval_batches * t.batch_size * d.world)
        mine = self._held_out[d.rank :: d.world]
        metrics = self.evaluator(engine.model) if self.evaluator is not None else {}
        if not mine:  # nothing held out (a small JSONL file): no validation loss
            return metrics
        engine.forward.eval()
        total, weight = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
        for s in range(0, len(mine), t.batch_size):
            idx, targets, real = self._batch(mine[s : s + t.batch_size])
            with engine.autocast():
                loss = engine.forward(idx, targets, pad_mask=real)[1].float()
            n = (targets >= 0).sum()
            total, weight = total + loss * n, weight + n
        engine.forward.train()
        return {"val_loss": (d.sum(total) / d.sum(weight).clamp(min=1)).item(), **metrics}

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
