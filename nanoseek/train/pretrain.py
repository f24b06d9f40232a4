"""Pretraining: next-token prediction on windows of a corpus, as a stage of the engine.

One step = one optimizer update over train.grad_accum micro-batches of train.batch_size windows per process.
Windows are a pure function of (seed, step, micro-batch), so a resumed run reads exactly what an uninterrupted one
would. Evaluation: the mean validation loss over fixed windows, averaged over processes; diagnostics: the residual
gains of hc / mhc models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.loader import TokenData, load_token_data, train_batch, val_batches
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.model.diagnostics import residual_gains
from nanoseek.train.checkpoint import find_checkpoint
from nanoseek.train.engine import Engine
from nanoseek.train.loop import log_stderr
from nanoseek.train.runner import run


class Pretraining:
    name = "pretrain"
    postfix = ("train_loss", "val_loss")

    def __init__(self, engine: Engine, data: TokenData, seq_len: int):
        self.engine, self.data, self.seq_len = engine, data, seq_len
        t, d = engine.cfg, engine.dist
        self.tokens_per_step = t.batch_size * t.grad_accum * d.world * seq_len
        windows, room = t.eval_batches * t.batch_size * d.world, len(data.val) - seq_len
        if windows > room:
            raise ValueError(
                f"train.eval_batches={t.eval_batches} × train.batch_size={t.batch_size} asks for {windows} validation "
                f"windows, but the validation split has only {room} distinct ones; lower train.eval_batches"
            )
        self.flops_per_token = engine.model.flops_per_token()

    def step(self, step: int) -> dict[str, Any]:
        t, d, engine = self.engine.cfg, self.engine.dist, self.engine

        def micro(i: int):
            def loss() -> torch.Tensor:
                x, y = train_batch(self.data.train, self.seq_len, t.batch_size, t.seed, step, i, d.rank, d.world)
                return engine.forward(x.to(d.device), y.to(d.device))[1] / t.grad_accum

            return loss

        update = engine.update([micro(i) for i in range(t.grad_accum)])
        return {
            "train_loss": update.loss,
            "grad_norm": update.grad_norm,
            "tokens": self.tokens_per_step,
            "flops": self.tokens_per_step * self.flops_per_token,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean validation loss over the fixed validation windows, averaged over processes."""
        engine, t, d = self.engine, self.engine.cfg, self.engine.dist
        engine.forward.eval()
        losses = []
        for x, y in val_batches(self.data.val, self.seq_len, t.batch_size, t.eval_batches, d.rank, d.world):
            with engine.autocast():
                losses.append(engine.forward(x.to(d.device), y.to(d.device))[1].float())
        engine.forward.train()
        return {"val_loss": d.mean(torch.stack(losses).mean()).item()}

    def diagnostics(self) -> dict[str, Any]:
        x, _ = next(val_batches(self.data.val, self.seq_len, 2, 1))
        gains = residual_gains(self.engine.model, x.to(self.engine.device))
        if gains is None:
            return {}
        c = gains.composite
        return {
            "gain_fwd_max": c.forward_max,
            "gain_fwd_min": c.forward_min,
            "gain_bwd_max": c.backward_max,
            "gain_bwd_min": c.backward_min,
        }

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def pretrain(
    cfg,
    out: str | Path,
    *,
    resume: bool = False,
    data: TokenData | None = None,
    info: dict[str, Any] | None = None,
    meter=None,
    progress: bool = True,
    log=log_stderr,
    callback=None,
    until: int | None = None,
    allow_changed_inputs: bool = False,
) -> dict[str, Any]:
    """Pretrain (or, with ``resume``, continue the newest checkpoint of) the run in folder ``out``. ``cfg`` is a
    run config with [model], [data] and [train] (``nanoseek.config.RunConfig``; on resume, the checkpoint's).
    ``data`` saves re-reading the corpus; ``info``, ``meter``, ``callback``, ``until``: see ``run_stage``. A resume
    reads the corpus with the checkpoint's tokenizer and refuses a corpus whose SHA-256 changed, unless
    ``allow_changed_inputs``."""
    tokenizer = None
    if resume and data is None:  # the checkpoint's tokenizer: a BPE retrained on edited data would renumber tokens
        tokenizer = load_tokenizer(find_checkpoint(out, log=lambda message: None))
    data = data or load_token_data(cfg.data, cfg.model.seq_len, tokenizer=tokenizer)
    if cfg.model.vocab_size != data.tokenizer.vocab_size:
        cfg.model = dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size)
    return run(
        cfg, out, lambda engine, tokenizer: Pretraining(engine, data, cfg.model.seq_len), resume=resume,
        tokenizer=data.tokenizer, info={"data": data.metadata, **(info or {})}, meter=meter, progress=progress,
        log=log, callback=callback, until=until, inputs={"corpus": data.metadata["corpus_sha256"]},
        allow_changed_inputs=allow_changed_inputs,
    )  # fmt: skip
