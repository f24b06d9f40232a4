"""Fault campaign: how often does nanoseek survive what a hostile world does to a run? Prints three counts.

1. kill points: a tiny pretraining run (and a GRPO run from a tiny SFT checkpoint) is stopped by an abrupt
   process exit (os._exit, no cleanup at all: what kill -9 leaves) right before the k-th call of each file
   operation a checkpoint save makes (the tmp -> ckpt rename, the rename of a pruned checkpoint, the recursive
   delete, the weight / state writes, the metrics append), and by a real SIGKILL at random moments; then
   `--resume` runs to the end and the final weights are compared with an uninterrupted run's, bit for bit.
2. bad inputs: corrupt or foreign checkpoints and bad arguments through the real command line; each must end in
   exactly one line on stderr and a non-zero exit; counted: one-line errors, tracebacks, hangs (> 120 s).
3. pickle payloads: state.pt files (with matching hashes) and token caches whose pickles would run a command;
   counted: payloads whose command ran.

    python benchmarks/fault_campaign.py            # about 10 minutes on 2 cores
    python benchmarks/fault_campaign.py --random-kills 2 --quick        # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PY = sys.executable
TRAIN = ["--preset", "tiny", "--no-progress", "--set", "train.threads=1"]
PRETRAIN_RUN = [*TRAIN, "--set", "train.steps=12", "--set", "train.ckpt_every=2", "--set", "train.keep_last=1"]
GRPO_RUN = ["--preset", "demo", "--no-progress", "--set", "train.threads=1", "--set", "train.steps=4",
            "--set", "train.ckpt_every=1", "--set", "train.keep_last=1", "--set", "train.batch_size=2",
            "--set", "train.eval_batches=1", "--set", "grpo.group_size=4", "--set", "task.max_new_tokens=16",
            "--set", "train.eval_every=4"]  # fmt: skip
SFT_RUN = ["--preset", "demo", "--no-progress", "--set", "train.threads=1", "--set", "train.steps=30",
           "--set", "train.warmup_steps=0", "--set", "train.eval_batches=1", "--set", "train.eval_every=30",
           "--set", "task.max_new_tokens=16"]  # fmt: skip

# A driver that runs the CLI with one file operation turned into an abrupt exit at its k-th call.
DRIVER = """
import os, sys, importlib
target, name, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(target)
owner, attr = (module, name) if "." not in name else (getattr(module, name.split(".")[0]), name.split(".")[1])
real, calls = getattr(owner, attr), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os._exit(137)
    return real(*args, **kwargs)
setattr(owner, attr, dying)
from nanoseek.cli import main
sys.exit(main(sys.argv[4:]))
"""
KILL_POINTS = [
    ("nanoseek.train.checkpoint", "os.replace"),
    ("nanoseek.train.checkpoint", "shutil.rmtree"),
    ("nanoseek.train.checkpoint", "save_file"),
    ("nanoseek.train.checkpoint", "torch.save"),
    ("nanoseek.train.runfolder", "RunFolder.append"),
]


def cli(args, timeout=300, driver=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PY, "-c", DRIVER, *driver, *args] if driver else [PY, "-m", "nanoseek", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def weights(run: Path) -> dict:
    from nanoseek.train.checkpoint import load_checkpoint

    return load_checkpoint(run, log=lambda m: None).weights


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resume_to_end(command: str, run: Path) -> bool:
    for _ in range(3):  # a resume is itself a normal run: it finishes
        done = cli([command, "--resume", "--out", str(run), "--no-progress"])
        if done.returncode == 0:
            return True
    return False


def kill_campaign(work: Path, random_kills: int, quick: bool) -> dict:
    counts = {"tried": 0, "killed": 0, "resumed_exactly": 0, "resumed_differently": 0, "not_resumable": 0,
              "before_first_checkpoint": 0, "rerun_exactly": 0, "rerun_failed": 0}  # fmt: skip
    work.mkdir(parents=True)
    reference = work / "reference"
    assert cli(["train", *PRETRAIN_RUN, "--out", str(reference)]).returncode == 0
    ref = weights(reference)

    def judge(run: Path, command: str, expected: dict, again: list[str]) -> None:
        from nanoseek.train.checkpoint import list_checkpoints

        counts["killed"] += 1
        if not list_checkpoints(run):  # killed before its first checkpoint: nothing to resume, run it again
            counts["before_first_checkpoint"] += 1
            done = cli(again)
            ok = done.returncode == 0 and same(weights(run), expected)
            counts["rerun_exactly" if ok else "rerun_failed"] += 1
            return
        if not resume_to_end(command, run):
            counts["not_resumable"] += 1
        elif same(weights(run), expected):
            counts["resumed_exactly"] += 1
        else:
            counts["resumed_differently"] += 1

    for target, name in KILL_POINTS:
        for at in (1, 2, 3) if quick else (1, 2, 3, 4, 5, 6):
            run = work / f"kill-{name}-{at}"
            counts["tried"] += 1
            args = ["train", *PRETRAIN_RUN, "--out", str(run)]
            if cli(args, driver=[target, name, str(at)]).returncode == 137:
                judge(run, "train", ref, args)
    rng = random.Random(0)
    for i in range(random_kills):
        run = work / f"sigkill-{i}"
        counts["tried"] += 1
        proc = subprocess.Popen([PY, "-m", "nanoseek", "train", *PRETRAIN_RUN, "--out", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        time.sleep(rng.uniform(2.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == -signal.SIGKILL:
            judge(run, "train", ref, ["train", *PRETRAIN_RUN, "--out", str(run)])
    # GRPO: from a tiny SFT checkpoint, SIGKILL at random moments, then resume
    sft = work / "sft"
    assert cli(["sft", *SFT_RUN, "--out", str(sft)]).returncode == 0
    grpo_ref = work / "grpo-reference"
    assert cli(["grpo", "--init", str(sft), *GRPO_RUN, "--out", str(grpo_ref)]).returncode == 0
    gref = weights(grpo_ref)
    for i in range(max(2, random_kills // 2)):
        run = work / f"grpo-sigkill-{i}"
        counts["tried"] += 1
        proc = subprocess.Popen([PY, "-m", "nanoseek", "grpo", "--init", str(sft), *GRPO_RUN, "--out", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        time.sleep(rng.uniform(3.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == -signal.SIGKILL:
            judge(run, "grpo", gref, ["grpo", "--init", str(sft), *GRPO_RUN, "--out", str(run)])
    return counts


# ---------------------------------------------------------------------------------------------------------------------


def rehash(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    names = ("model.safetensors", "config.toml", "tokenizer.json", "state.pt")
    meta["files"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}
    (folder / "meta.json").write_text(json.dumps(meta))


def corruptions() -> dict:
    def weights_edit(change):
        def apply(f):
            w = load_file(f / "model.safetensors")
            change(w)
            save_file(w, f / "model.safetensors")
            rehash(f)

        return apply

    def write(name, content, hashed=True):
        def apply(f):
            (f / name).write_bytes(content(f) if callable(content) else content)
            if hashed:
                rehash(f)

        return apply

    def truncate(name):
        return write(name, lambda f: (f / name).read_bytes()[: len((f / name).read_bytes()) // 2], hashed=False)

    cases = {
        "wrong shapes": weights_edit(lambda w: w.update({next(iter(w)): torch.zeros(3, 3)})),
        "missing key": weights_edit(lambda w: w.pop(next(iter(w)))),
        "extra key": weights_edit(lambda w: w.update({"extra": torch.zeros(1)})),
        "int weights": weights_edit(lambda w: w.update({k: v.long() for k, v in w.items()})),
        "meta []": write("meta.json", b"[]", hashed=False),
        "meta not JSON": write("meta.json", b"{", hashed=False),
        "meta files []": write("meta.json", b'{"files": []}', hashed=False),
        "state list": write("state.pt", lambda f: _torch_bytes([1, 2])),
        "state garbage": write("state.pt", b"garbage"),
        "state empty dict": write("state.pt", lambda f: _torch_bytes({})),
        "state rng float": write("state.pt", lambda f: _torch_bytes({"step": 1, "rng": torch.zeros(3)})),
        "state step str": write("state.pt", lambda f: _torch_bytes({"step": "x"})),
        "header 2^62": write(
            "model.safetensors", lambda f: struct.pack("<Q", 2**62) + (f / "model.safetensors").read_bytes()[8:]
        ),  # fmt: skip
        "header garbage": write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
        "safetensors empty": write("model.safetensors", b""),
        "config nested": write("config.toml", b"a = " + b"[" * 5000 + b"]" * 5000),
        "config not TOML": write("config.toml", b"[model\n"),
        "config not UTF-8": write("config.toml", b"\xff\xfe[model]\n"),
        "config wrong type": write("config.toml", b"[model]\nd_model = 'x'\n"),
        "config unknown section": write("config.toml", b"[hack]\nx = 1\n"),
        "tokenizer garbage": write("tokenizer.json", b'{"kind": "bpe"}'),
        "tokenizer list": write("tokenizer.json", b"[]"),
        "tokenizer not JSON": write("tokenizer.json", b"\x00\x01"),
    }
    for name in ("model.safetensors", "state.pt", "config.toml", "tokenizer.json"):
        cases[f"{name} truncated (only checkpoint)"] = truncate(name)
        cases[f"{name} deleted (only checkpoint)"] = lambda f, n=name: (f / n).unlink()
    return cases


def _torch_bytes(value) -> bytes:
    with tempfile.NamedTemporaryFile() as tmp:
        torch.save(value, tmp.name)
        return Path(tmp.name).read_bytes()


def judge_line(done, counts) -> None:
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("nanoseek ")]
    if "Traceback" in done.stderr:
        counts["tracebacks"] += 1
    elif done.returncode == 0:  # the command never read the damaged part (sample reads no optimizer state)
        counts["ran_fine"] += 1
        print(f"  exit 0 (damage not read): {done.args[-6:]!r}")
    elif done.returncode != 0 and len(errors) == 1 and errors[0] == lines[-1] and ": error: " in errors[0]:
        counts["one_line_errors"] += 1
    else:
        counts["other"] += 1
        print(f"  not one line: rc={done.returncode} {done.stderr.strip()[-300:]!r}")


def bad_input_campaign(work: Path) -> dict:
    counts = {"tried": 0, "one_line_errors": 0, "ran_fine": 0, "tracebacks": 0, "hangs": 0, "other": 0}
    base = work / "base"
    assert (
        cli(["train", *TRAIN, "--set", "train.steps=3", "--set", "train.eval_every=3", "--out", str(base)]).returncode
        == 0
    )

    def attempt(args):
        counts["tried"] += 1
        try:
            judge_line(cli(args, timeout=120), counts)
        except subprocess.TimeoutExpired:
            counts["hangs"] += 1

    for corrupt in corruptions().values():
        for command in ("sample", "resume", "eval", "export", "init"):
            run = work / f"corrupt-{len(list(work.iterdir()))}"
            shutil.copytree(base, run)
            corrupt(sorted(run.glob("ckpt-*"))[-1])
            args = {
                "sample": ["sample", "--ckpt", str(run), "--max-new-tokens", "2"],
                "resume": ["train", "--resume", "--out", str(run), "--set", "train.steps=5"],
                "eval": ["eval", "--ckpt", str(run), "--task", "arithmetic", "--n", "2"],
                "export": ["export", "--ckpt", str(run), "--out", str(run / "hf")],
                "init": ["sft", "--init", str(run), "--task", "arithmetic", "--out", str(run / "sft")],
            }[command]
            attempt(args)
    new = str(work / "new")
    (work / "a-file").write_text("x")
    for args in (
        ["train", *TRAIN, "--out", str(work / "a-file")],
        ["train", *TRAIN, "--out", new, "--set", "train.steps=" + "[" * 5000],
        ["train", *TRAIN, "--out", new, "--set", "train.steps=3\nmodel.d_model=8"],
        ["train", *TRAIN, "--out", new, "--set", 'data.source=""'],
        ["train", *TRAIN, "--out", new, "--set", "train.batch_size=100000000"],
        ["train", *TRAIN, "--out", new, "--set", "train.batch_size=1000000", "--set", "model.seq_len=2048"],
        ["train", *TRAIN, "--out", new, "--set", "model.n_layers=10000000"],
        ["train", *TRAIN, "--out", new, "--set", f"model.d_model={2**62}"],
        ["train", *TRAIN, "--out", new, "--set", "train.eval_batches=1000000"],
        ["train", *TRAIN, "--out", new, "--set", "train.steps=1000000000000"],
        ["train", *TRAIN, "--out", new, "--set", "train.lr=inf"],
        ["train", *TRAIN, "--out", new, "--set", "train.lr=1e39"],
        ["train", *TRAIN, "--out", new, "--set", "model.vocab_size=-1"],
        ["train", *TRAIN, "--out", new, "--data", str(work / "missing.txt")],
        ["train", "--resume", "--out", str(base), "--set", "model.d_model=64"],
        ["train", "--resume", "--out", new],
        ["sample", "--ckpt", str(base), "--max-new-tokens", "2", "--num-samples", "1000000000"],
        ["sample", "--ckpt", str(base), "--max-new-tokens", "2", "--num-samples", "0"],
        ["sample", "--ckpt", str(base), "--prompt", "caf\udce9"],
        ["sample", "--ckpt", str(work / "nothing")],
        ["eval", "--ckpt", str(base), "--task", "arithmetic", "--n", "1000000000"],
        ["eval", "--ckpt", str(base), "--task", "arithmetic", "--samples", "1000000000"],
        ["config", "--config", str(work / "a-file")],
    ):
        attempt(args)
    return counts


# ---------------------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``command``."""

    def __init__(self, how, command):
        self.how, self.command = how, command

    def __reduce__(self):
        if self.how == "system":
            return os.system, (self.command,)
        if self.how == "eval":
            return eval, (f"__import__('os').system({self.command!r})",)
        if self.how == "exec":
            return exec, (f"import os; os.system({self.command!r})",)
        return subprocess.call, (["sh", "-c", self.command],)


def payload_campaign(work: Path) -> dict:
    import numpy as np

    from nanoseek.data.corpus import cache_dir

    counts = {"payloads": 0, "loads": 0, "executed": 0}
    base = work / "base"
    marker = work / "PWNED"
    for how in ("system", "eval", "exec", "subprocess"):
        for wrap in ("bare", "in dict", "torch.save"):
            counts["payloads"] += 1
            run = work / f"payload-{how}-{wrap.replace(' ', '')}"
            shutil.copytree(base, run)
            folder = sorted(run.glob("ckpt-*"))[-1]
            payload = Payload(how, f"touch {marker}")
            if wrap == "torch.save":
                (folder / "state.pt").write_bytes(_torch_bytes({"step": 3, "x": payload}))
            else:
                (folder / "state.pt").write_bytes(
                    pickle.dumps(payload if wrap == "bare" else {"step": 3, "x": payload})
                )
            rehash(folder)
            for args in (["sample", "--ckpt", str(run), "--max-new-tokens", "2"],
                         ["train", "--resume", "--out", str(run), "--set", "train.steps=5"]):  # fmt: skip
                counts["loads"] += 1
                cli(args)
                if marker.exists():
                    counts["executed"] += 1
                    marker.unlink()
    # the token cache: an object array whose pickle runs a command, in place of train.npy
    counts["payloads"] += 1
    os.environ.setdefault("NANOSEEK_CACHE", str(work / "cache"))
    cli(["train", *TRAIN, "--set", "train.steps=1", "--set", "train.warmup_steps=0", "--out", str(work / "cache-run")])
    for cached in Path(cache_dir()).glob("tokens-*/train.npy"):
        np.save(cached, np.array([Payload("system", f"touch {marker}")], dtype=object), allow_pickle=True)
    counts["loads"] += 1
    cli(["train", *TRAIN, "--set", "train.steps=1", "--set", "train.warmup_steps=0", "--out", str(work / "cache-2")])
    if marker.exists():
        counts["executed"] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--random-kills", type=int, default=8, help="SIGKILLs at random moments (default 8)")
    p.add_argument("--quick", action="store_true", help="fewer kill points per file operation")
    p.add_argument("--no-kills", action="store_true", help="only the bad inputs and the pickle payloads")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanoseek-faults-") as tmp:
        work = Path(tmp)
        os.environ["NANOSEEK_CACHE"] = str(work / "cache")
        t0 = time.perf_counter()
        kills = None if args.no_kills else kill_campaign(work / "kills", args.random_kills, args.quick)
        if kills:
            print(f"kill points: {kills['tried']} tried, {kills['killed']} killed mid-run; of those, "
                  f"{kills['killed'] - kills['before_first_checkpoint']} had a checkpoint: {kills['resumed_exactly']} "
                  f"resumed bit-identically, {kills['resumed_differently']} resumed differently, "
                  f"{kills['not_resumable']} not resumable; {kills['before_first_checkpoint']} died before their first "
                  f"checkpoint: {kills['rerun_exactly']} reran bit-identically, {kills['rerun_failed']} failed",
                  flush=True)  # fmt: skip
        (work / "inputs").mkdir()
        bad = bad_input_campaign(work / "inputs")
        print(f"bad inputs: {bad['tried']} tried, {bad['one_line_errors']} one-line errors, {bad['ran_fine']} ran "
              f"fine (exit 0: the command does not read the damaged part), {bad['tracebacks']} "
              f"tracebacks, {bad['hangs']} hangs, {bad['other']} other", flush=True)  # fmt: skip
        payloads = payload_campaign(work / "inputs")
        print(f"pickle payloads: {payloads['payloads']} payloads, {payloads['loads']} loads, "
              f"{payloads['executed']} executed")  # fmt: skip
        print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
