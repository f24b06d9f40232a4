"""Checkpoints: one folder per save, written atomically, verified on load, never executing code.

A checkpoint folder ``ckpt-0000123`` holds
    model.safetensors   the weights (and persistent buffers such as MoE router biases)
    config.toml         the full run configuration (every section, as the stage that wrote it saw it)
    tokenizer.json      the tokenizer the model was trained with
    state.pt            optimizer states, step, counters, RNG (tensors and plain values only: weights_only=True)
    meta.json           SHA-256 of each file above; written last
It is assembled in a temporary folder and renamed into place, so a crash mid-write leaves the previous checkpoint
untouched. Loading checks every hash and names the file that does not match; a run folder's newest checkpoint that
fails the check gives way, with a warning, to the newest one that passes. A file whose hash matches but whose
content is not what nanoseek writes (a foreign state.pt, a wrong header) is an error naming it, never a traceback.

Crash safety of a re-save and of pruning: a checkpoint that is replaced (the same step written again) is first
renamed to ``.old-ckpt-N-PID`` and a pruned one to ``.del-ckpt-N-PID``, so a kill at any point leaves either the
new checkpoint or the old one under a name ``list_checkpoints`` still finds; ``repair_run_folder`` (run by the
writer under its lock) puts such a folder back or removes it, and removes stale ``.tmp-*`` folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
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


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` survive a power loss (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


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
    _fsync_files(tmp)
    if final.exists():  # re-saving the same step (e.g. the end of a resumed run): swap, then drop the old one
        old = run_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)  # a kill from here until the next rename leaves .old-*: still listed, then repaired
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        gone = run_dir / f".del-{stale.name.removeprefix('.old-')}-{os.getpid()}"
        os.replace(stale, gone)  # out of the listing at once: a half-deleted folder is never read as a checkpoint
        shutil.rmtree(gone)
    return final


def _step_name(path: Path) -> str | None:
    """'ckpt-0000012' for ckpt-0000012 and for a displaced .old-ckpt-0000012-PID; None for anything else."""
    name = path.name
    if name.startswith(PREFIX):
        return name
    if name.startswith(f".old-{PREFIX}"):
        return name[len(".old-") :].rsplit("-", 1)[0]
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``run_dir``, oldest first (temporary folders are not listed). A checkpoint
    displaced by a re-save that was killed before its replacement was renamed in (``.old-ckpt-N-PID`` with no
    ``ckpt-N``) is listed in its place."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found: dict[str, Path] = {}
    for p in sorted(run_dir.iterdir(), key=lambda p: p.name.startswith(".")):  # ckpt-N before its .old-ckpt-N
        name = _step_name(p)
        if name is not None and p.is_dir():
            found.setdefault(name, p)
    return [found[name] for name in sorted(found)]


def repair_run_folder(run_dir: str | Path, log=None) -> None:
    """Clean up after a writer that was killed (call it holding the folder's lock): stale ``.tmp-*`` and
    ``.del-*`` folders are removed; a ``.old-ckpt-N-PID`` becomes ``ckpt-N`` again when no ckpt-N exists, else is
    removed."""
    run_dir, log = Path(run_dir), log or _warn
    if not run_dir.is_dir():
        return
    for p in sorted(run_dir.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith((".tmp-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)
            log(f"warning: removed {p.name}, left by a run that was stopped while writing a checkpoint")
        elif p.name.startswith(f".old-{PREFIX}"):
            name = _step_name(p)
            if (run_dir / name).exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, run_dir / name)
                log(f"warning: restored {name}, displaced by a re-save that was stopped before it finished")
    _fsync_dir(run_dir)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint in a run folder."""
    return _candidates(Path(path))[-1]


def _candidates(path: Path) -> list[Path]:
    """``path`` itself when it is a checkpoint folder, else the run folder's checkpoints, oldest first."""
    if (path / "meta.json").is_file() or (path / "model.safetensors").is_file():
        return [path]
    found = list_checkpoints(path)
    if not found:
        if not path.exists():
            raise CheckpointError(
                f"{path}: no checkpoint found, the path does not exist (expected a ckpt-* folder or a run folder)"
            )
        raise CheckpointError(f"{path}: no checkpoint found (expected a ckpt-* folder or a run folder containing one)")
    return found


def verify_checkpoint(folder: Path) -> dict:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: the checkpoint is incomplete")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path} is corrupt (not valid JSON)") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("files"), dict)):
        raise CheckpointError(f"{meta_path} is not a nanoseek checkpoint's meta.json (expected an object with 'files')")
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        if _sha256(path) != meta["files"].get(name):
            raise CheckpointError(f"{path} is corrupt or truncated: its SHA-256 does not match {meta_path}")
    return meta


def find_checkpoint(path: str | Path, log=None, skipped: list[Path] | None = None) -> Path:
    """The checkpoint folder ``path`` names, verified: a ckpt-* folder itself, or the newest checkpoint of a run
    folder that passes verification. A newer one that fails is skipped with a warning through ``log`` (stderr by
    default) and appended to ``skipped``; if none passes, the newest one's error is raised."""
    candidates = _candidates(Path(path))
    errors = []
    for folder in reversed(candidates):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            errors.append(err)
            continue
        for err, bad in zip(errors, reversed(candidates), strict=False):
            (log or _warn)(f"warning: {err}; using the newest intact checkpoint, {folder.name}, instead")
            if skipped is not None:
                skipped.append(bad)
        return folder
    raise errors[0]


STATE_KEYS = {"step": int, "stage": str, "optimizers": dict, "rng": torch.Tensor}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for a malformed header or data
        raise CheckpointError(f"{path} is not a readable safetensors file: {str(err).splitlines()[0]}") from None


def _read_state(path: Path) -> dict[str, Any]:
    """state.pt, read with weights_only=True (no code runs), and checked to be the dict a checkpoint writes."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refuses foreign objects with several error types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a nanoseek training state: {reason[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a nanoseek training state: expected a dict, found {type(state).__name__}")
    for key, kind in STATE_KEYS.items():
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(f"{path}: {key!r} should be a {kind.__name__}, found {type(state[key]).__name__}")
    rng = state.get("rng")
    if rng is not None and rng.dtype != torch.uint8:
        raise CheckpointError(f"{path}: 'rng' is not a random generator state (expected uint8, found {rng.dtype})")
    return state


def load_checkpoint(path: str | Path, log=None, skipped: list[Path] | None = None) -> Checkpoint:
    """Verify and read a checkpoint (a ckpt-* folder, or a run folder's newest intact one: see find_checkpoint).
    No code is executed while loading; content that is not what nanoseek writes is a CheckpointError naming the
    file."""
    folder = find_checkpoint(path, log, skipped)
    config = loads((folder / "config.toml").read_text(encoding="utf-8"), f"{folder / 'config.toml'}")
    return Checkpoint(folder, config, _read_weights(folder / "model.safetensors"), _read_state(folder / "state.pt"))
