"""Starting a stage: the run folder (locked), the model — a checkpoint's to resume, ``--init``'s, or a fresh one —
the engine around it, then ``run_stage``. Every stage's command goes through ``run``; it differs only in the stage
it builds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tokenizer import ByteTokenizer, load_tokenizer
from nanoseek.model import Transformer
from nanoseek.train.distributed import setup
from nanoseek.train.engine import Engine
from nanoseek.train.load import load_model
from nanoseek.train.loop import Stage, log_stderr, run_stage
from nanoseek.train.runfolder import RunFolder


def run(
    cfg,
    out: str | Path,
    build: Callable[[Engine, Any], Stage],
    *,
    init: str | Path | None = None,
    resume: bool = False,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
    meter=None,
    progress: bool = True,
    log: Callable[[str], None] = log_stderr,
    callback: Callable[[dict], None] | None = None,
    until: int | None = None,
) -> dict[str, Any]:
    """Run the stage ``build(engine, tokenizer)`` in folder ``out``. ``cfg`` is the full run config (an object with
    .model, .train and .to_dict(): ``nanoseek.config.RunConfig``). The model: with ``resume``, the newest
    checkpoint of ``out`` (whose config ``cfg`` must be); else the checkpoint ``init`` (whose [model] ``cfg.model``
    must be); else fresh from cfg.model, seeded by train.seed. The tokenizer: the checkpoint's, else ``tokenizer``,
    else bytes."""
    d = setup(cfg.train.device)
    folder = RunFolder(out, main=d.main, log=log)
    created = not folder.path.exists()
    folder.lock()
    try:
        checkpoint = folder.begin(resume)
        if checkpoint is not None:
            model, tokenizer = Transformer(cfg.model), load_tokenizer(checkpoint.folder)  # weights: run_stage
        elif init is not None:
            loaded = load_model(init, train=True)
            if loaded.model.cfg != cfg.model:
                raise ValueError(f"--init {init}: its [model] differs from the run's; a loaded model keeps its shape")
            model, tokenizer = loaded.model, loaded.tokenizer
            info = {"init": str(loaded.folder), "init_stage": loaded.stage, **(info or {})}
        else:
            torch.manual_seed(cfg.train.seed)
            model, tokenizer = Transformer(cfg.model), tokenizer or ByteTokenizer()
        engine = Engine(model, cfg.train, d, log=log)
        return run_stage(
            build(engine, tokenizer), engine, folder, cfg.to_dict(), tokenizer, checkpoint=checkpoint, info=info,
            meter=meter, progress=progress, log=log, callback=callback, until=until,
        )  # fmt: skip
    except BaseException:
        if created:
            folder.remove_if_empty()  # a run that failed before writing anything leaves nothing behind
        raise
    finally:
        folder.unlock()
