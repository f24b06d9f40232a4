"""A run folder: what one training run of any stage leaves on disk.

    run.lock            held (flock) by the process that writes the folder, for the run's whole life
    run.json            what ran: the full config, the data, parameters, FLOPs per token, processes, provenance
    metrics.jsonl       one JSON record per step, appended as the run goes (one format for every stage)
    summary.json        why and where the run stopped, with wall / CPU seconds and joules accumulated over resumes;
                        written atomically at the end: a complete summary.json marks a finished (or stopped) run
    ckpt-NNNNNNN/       checkpoints (checkpoint.py), the newest train.keep_last kept

Every file is written atomically (a temporary file renamed into place) or append-only; a resume trims
``metrics.jsonl`` back to the checkpoint's step, dropping a torn last line (a full disk, a kill mid-write) with a
warning, so every step appears exactly once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from nanoseek.train.checkpoint import (
    PREFIX,
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    repair_run_folder,
    save_checkpoint,
)


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename it into place: readers never see
    half a file, and a crash leaves the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is absent or unreadable (e.g. a run killed before writing it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(path: Path, log=None) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (no newline: the writer was killed or the disk filled) is
    dropped, with a warning through ``log``; a damaged line before it is an error naming the file and line."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, else a torn record
    if tail.strip() and log is not None:
        log(f"warning: {path}: dropped an incomplete last record ({len(tail)} bytes, cut mid-write)")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} is not a metrics record; repair or remove that line")
        records.append(record)
    return records


class RunFolderLocked(ValueError):
    """Another live process writes this run folder."""


class RunFolder:
    def __init__(self, path: str | Path, main: bool = True, log=None):
        """``main``: this process writes (rank 0); the others only read checkpoints."""
        self.path, self.main, self.log = Path(path), main, log or (lambda message: None)
        self.metrics = self.path / "metrics.jsonl"
        self._lock_file = None

    # -----------------------------------------------------------------------------------------------------------------
    # Ownership

    def lock(self) -> None:
        """Take the folder's exclusive lock for this process's life (released at exit, whatever the exit, by the
        kernel: a lock left by a killed process is free again). A live holder is named in the error."""
        if not self.main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {str(self.path)!r} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / "run.lock", "a+")  # noqa: SIM115 (held open for the run's life)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunFolderLocked(
                f"{self.path} is in use by {holder}; wait for it to finish (or stop it), or choose another --out"
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            self.log(f"{self.path}: taking over the lock left by {previous}, which is no longer running")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    def remove_if_empty(self) -> None:
        """Remove the folder if it holds nothing but its lock (a run that stopped before writing anything)."""
        if self.main and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {"run.lock"}:
            (self.path / "run.lock").unlink(missing_ok=True)
            self.path.rmdir()

    def unlock(self) -> None:
        """Release the lock; the holder's name is erased, so only a killed holder's name is ever found by the next."""
        if self._lock_file is not None:
            if (self.path / "run.lock").exists():
                self._lock_file.truncate(0)
            self._lock_file.close()
            self._lock_file = None

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)

    def begin(self, resume: bool) -> Checkpoint | None:
        """Check that a new run has an empty folder and a resumed one a checkpoint; return that checkpoint. Leftovers
        of a killed writer are repaired first; on resume, newer checkpoints that fail verification are set aside
        (renamed corrupt-ckpt-N, kept for inspection, never pruned in place of a good one) with a warning."""
        if self.main:
            repair_run_folder(self.path, self.log)
        if not resume:
            if self.checkpoints():
                raise ValueError(
                    f"{self.path} already holds checkpoints; continue it with --resume, or choose another --out"
                )
            return None
        if not self.checkpoints():
            raise ValueError(f"--resume: {self.path} holds no checkpoint to continue from")
        skipped: list[Path] = []
        checkpoint = load_checkpoint(self.path, self.log, skipped)
        for bad in skipped if self.main else ():
            aside = bad.with_name(f"corrupt-{PREFIX}{bad.name.rsplit(PREFIX, 1)[1].split('-')[0]}")
            if aside.exists():  # set aside before (a second fallback at the same step): keep both
                aside = aside.with_name(f"{aside.name}-{os.getpid()}")
            os.replace(bad, aside)
            self.log(f"warning: moved the unusable {bad.name} aside to {aside.name}")
        return checkpoint

    def save(self, step: int, weights: dict, config: dict, tokenizer, state: dict, keep_last: int) -> Path | None:
        if not self.main:
            return None
        return save_checkpoint(self.path, step, weights, config, tokenizer, state, keep_last)

    # -----------------------------------------------------------------------------------------------------------------
    # Records

    def start(self, info: dict, resumed_step: int | None) -> None:
        """Write run.json, and start metrics.jsonl: empty for a new run; for a resumed one, the records up to the
        checkpoint's step (a killed run may have written some after it), rewritten atomically."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            self.metrics.unlink(missing_ok=True)
            (self.path / "summary.json").unlink(missing_ok=True)
        else:
            keep = [r for r in read_metrics(self.metrics, self.log) if r["step"] <= resumed_step]
            write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))
        write_atomic(self.path / "run.json", json.dumps(info, indent=1))

    def append(self, record: dict) -> None:
        if self.main:
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return read_metrics(self.metrics, self.log)

    def summary(self) -> dict | None:
        return read_json(self.path / "summary.json")

    def finish(self, summary: dict) -> None:
        if self.main:
            write_atomic(self.path / "summary.json", json.dumps(summary, indent=1))
