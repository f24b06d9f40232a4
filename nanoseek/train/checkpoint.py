"""Checkpoints: one folder per save, written atomically, verified on load, never executing code.

A checkpoint folder ``ckpt-0000123`` holds
    model.safetensors   the weights (and persistent buffers such as MoE router biases)
    config.toml         the full run configuration (every section, as the stage that wrote it saw it)
    tokenizer.json      the tokenizer the model was trained with
    state.pt            optimizer states, step, counters, RNG (tensors and plain values only: weights_only=True)
    meta.json           SHA-256 of each file above; written last
It is assembled in a temporary folder and renamed into place, so a crash mid-write leaves the previous checkpoint
untouched. Loading checks every hash and names the file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors.torch import load_file, save_file

from nanoseek.schema import loads

FILES = ("model.safetensors", "config.toml", "tokenizer.json", "state.pt")
PREFIX = "ckpt-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    """The run config as plain TOML tables; ``nanoseek.config.RunConfig.from_dict`` validates it."""
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer,
    state: dict,
    keep_last: int = 2,
) -> Path:
    """Write ``ckpt-{step}`` atomically into ``run_dir`` and delete all but the newest ``keep_last``."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:07d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
    (tmp / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    tokenizer.save(tmp)
    torch.save(state, tmp / "state.pt")
    meta = {"step": step, "files": {name: _sha256(tmp / name) for name in FILES}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():  # re-saving the same step (e.g. the end of a resumed run): swap, then drop the old one
        old = run_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``run_dir``, oldest first (temporary folders are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint in a run folder."""
    path = Path(path)
    if (path / "meta.json").is_file() or (path / "model.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoint found (expected a ckpt-* folder or a run folder containing one)")
    return found[-1]


def verify_checkpoint(folder: Path) -> dict:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: the checkpoint is incomplete")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise CheckpointError(f"{meta_path} is corrupt (not valid JSON)") from None
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        if _sha256(path) != meta.get("files", {}).get(name):
            raise CheckpointError(f"{path} is corrupt or truncated: its SHA-256 does not match {meta_path}")
    return meta


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify and read a checkpoint (a ckpt-* folder, or a run folder's newest). No code is executed while loading."""
    folder = resolve_checkpoint(path)
    verify_checkpoint(folder)
    config = loads((folder / "config.toml").read_text(encoding="utf-8"), f"{folder / 'config.toml'}")
    weights = load_file(folder / "model.safetensors")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    return Checkpoint(folder, config, weights, state)
