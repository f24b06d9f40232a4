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
from nanoseek.train.bounds import check_training_memory
from nanoseek.train.checkpoint import Checkpoint, CheckpointError
from nanoseek.train.distributed import setup
from nanoseek.train.engine import Engine
from nanoseek.train.load import check_weights, load_model
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
    inputs: dict[str, str] | None = None,
    allow_changed_inputs: bool = False,
) -> dict[str, Any]:
    """Run the stage ``build(engine, tokenizer)`` in folder ``out``. ``cfg`` is the full run config (an object with
    .model, .train and .to_dict(): ``nanoseek.config.RunConfig``). The model: with ``resume``, the newest
    checkpoint of ``out`` (whose config ``cfg`` must be); else the checkpoint ``init`` (whose [model] ``cfg.model``
    must be); else fresh from cfg.model, seeded by train.seed. The tokenizer: the checkpoint's, else ``tokenizer``,
    else bytes. ``inputs``: hashes of what the run reads (e.g. the corpus), saved in every checkpoint; a resume whose
    inputs differ from the checkpoint's is refused naming both, unless ``allow_changed_inputs``. Before anything
    is allocated, the model and batch are checked against the machine's memory (nanoseek.train.bounds)."""
    d = setup(cfg.train.device)
    folder = RunFolder(out, main=d.main, log=log)
    created = not folder.path.exists()
    folder.lock()
    try:
        checkpoint = folder.begin(resume)
        if checkpoint is not None:
            check_resume(checkpoint, cfg, inputs, allow_changed_inputs)
        check_training_memory(cfg.model, cfg.train, d.world)
        if checkpoint is not None:
            model, tokenizer = Transformer(cfg.model), load_tokenizer(checkpoint.folder)
            check_weights(model, checkpoint.weights, checkpoint.folder / "model.safetensors")
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
            meter=meter, progress=progress, log=log, callback=callback, until=until, inputs=inputs,
        )  # fmt: skip
    except BaseException:
        if created:
            folder.remove_if_empty()  # a run that failed before writing anything leaves nothing behind
        raise
    finally:
        folder.unlock()


RESUME_STATE = ("step", "optimizers", "rng")
"""What a checkpoint's state.pt must hold for an exact resume."""


def check_resume(checkpoint: Checkpoint, cfg, inputs: dict[str, str] | None, allow_changed_inputs: bool) -> None:
    """Refuse a resume that cannot continue the run exactly: a state without what a resume needs, a [model]
    changed by --set (the weights keep their shape), or inputs (corpus, data file) whose hashes differ from the ones
    the checkpoint was trained on — unless ``allow_changed_inputs``."""
    missing = [key for key in RESUME_STATE if key not in checkpoint.state]
    if missing:
        raise CheckpointError(f"{checkpoint.folder / 'state.pt'} lacks {', '.join(missing)}: it cannot be resumed")
    saved = checkpoint.config.get("model", {})
    changed = sorted(k for k, v in vars(cfg.model).items() if k in saved and saved[k] != v)
    if changed:
        shown = ", ".join(f"model.{k}={saved[k]!r} -> {getattr(cfg.model, k)!r}" for k in changed)
        raise ValueError(f"--resume cannot change the model's shape ({shown}); the checkpoint's [model] is kept")
    before = checkpoint.state.get("inputs") or {}
    for key, now in (inputs or {}).items():
        then = before.get(key)
        if then is None or then == now:
            continue
        if not allow_changed_inputs:
            raise ValueError(
                f"--resume: the {key} differs from the one {checkpoint.folder} was trained on (SHA-256 {then} then, "
                f"{now} now); restore it, or pass --allow-data-change to continue on the changed data"
            )
