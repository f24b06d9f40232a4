"""``load_model``: the one way every caller gets a trained model back from disk (sampling, the next stage's
``--init``, evaluation, serving, export)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.model import Transformer
from nanoseek.model.config import ModelConfig
from nanoseek.schema import build_section
from nanoseek.train.bounds import check_model_memory
from nanoseek.train.checkpoint import CheckpointError, load_checkpoint


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any
    config: dict[str, Any]
    """The checkpoint's run config as plain TOML tables (every section it was saved with: [model], [data],
    [train], and [task], [grpo], ... for the reasoning stages)."""
    folder: Path
    """The checkpoint folder actually read."""
    step: int
    stage: str
    """The stage that wrote the checkpoint: pretrain, sft, grpo, ... ("hf" for an imported Hugging Face model)."""


def load_model(path: str | Path, *, device: str | torch.device = "cpu", train: bool = False) -> LoadedModel:
    """The model (in eval mode unless ``train``) and tokenizer of a checkpoint folder, or of a run folder's newest
    checkpoint; hashes are verified and nothing is executed while loading. ``hf:DIR`` (or a folder with a
    config.json and no nanoseek checkpoint) imports a Hugging Face causal LM exactly, or fails naming what nanoseek
    does not compute (nanoseek.interop.hf_import); it comes back as step 0 of stage "hf"."""
    from nanoseek.interop.hf_import import hf_folder, import_hf

    folder = hf_folder(path)
    if folder is not None:
        model, tokenizer, tables = import_hf(folder)
        return LoadedModel(model.to(device).train(train), tokenizer, tables, folder, 0, "hf")
    checkpoint = load_checkpoint(path)
    where = str(checkpoint.folder / "config.toml")
    cfg = build_section(ModelConfig, checkpoint.config.get("model", {}), "model", where)
    check_model_memory(cfg, where)
    model = Transformer(cfg)
    check_weights(model, checkpoint.weights, checkpoint.folder / "model.safetensors")
    model.load_state_dict(checkpoint.weights)
    model.to(device).train(train)
    state = checkpoint.state
    return LoadedModel(
        model, load_tokenizer(checkpoint.folder), checkpoint.config, checkpoint.folder, int(state.get("step", 0)),
        str(state.get("stage", "pretrain")),
    )  # fmt: skip


def check_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """The saved tensors are exactly the model's: the same names, shapes and dtypes (a missing, extra or reshaped
    tensor is a CheckpointError naming the file and the first difference, never a partly loaded model)."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an unknown tensor {extra[0]}"
        more = len(missing) + len(extra) - 1
        raise CheckpointError(f"{where} does not fit its config.toml: it {what}" + (f" (+{more} more)" if more else ""))
    for name, tensor in expected.items():
        got = weights[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(
                f"{where} does not fit its config.toml: {name} is {tuple(got.shape)} {got.dtype}, the model expects "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
