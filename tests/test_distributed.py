"""Data parallelism with torchrun on CPU (gloo): DDP and FSDP2 give the losses of one process with the same global
batch, FSDP checkpoints are full state dicts a one-process run reads, and a resume under FSDP is exact."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanoseek.train.checkpoint import load_checkpoint
from nanoseek.train.load import load_model

# constant lr after one warm-up step, so a run stopped at step 2 and resumed to 4 follows the same schedule
COMMON = ["--preset", "tiny", "--no-progress", "--set", "train.warmup_steps=1", "--set", "train.eval_every=2",
          "--set", "train.schedule='constant'"]  # fmt: skip


def train(out, *args, processes=1, steps=4, resume=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    config = ["--resume"] if resume else [*COMMON, *args]
    command = [sys.executable, *launcher, "-m", "nanoseek", "train", *config, "--set", f"train.steps={steps}"]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a, b, tol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b] and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=tol)
        assert ra.get("val_loss", 0.0) == pytest.approx(rb.get("val_loss", 0.0), abs=tol)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    return out, train(out, "--set", "train.batch_size=4")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process, parallel):
    one_out, one = one_process
    two = train(tmp_path / "two", "--set", "train.batch_size=2", "--set", f"train.parallel='{parallel}'", processes=2)
    assert_same_losses(one, two)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    # the checkpoint holds full (unsharded) tensors: a one-process load gives the one-process model's weights
    mine, theirs = load_model(one_out).model.state_dict(), load_model(tmp_path / "two").model.state_dict()
    for name, weight in mine.items():
        torch.testing.assert_close(theirs[name], weight, rtol=1e-4, atol=1e-5)
    if parallel == "fsdp":  # and the optimizer state too, keyed by parameter name like a one-process run's
        state = load_checkpoint(tmp_path / "two").state["optimizers"]["state"]
        assert set(state) == set(load_checkpoint(one_out).state["optimizers"]["state"])


@pytest.mark.slow
def test_a_resume_under_fsdp_is_exact(tmp_path):
    fsdp = ["--set", "train.batch_size=2", "--set", "train.parallel='fsdp'"]
    straight = train(tmp_path / "straight", *fsdp, processes=2)
    train(tmp_path / "split", *fsdp, processes=2, steps=2)
    split = train(tmp_path / "split", processes=2, resume=True)
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in straight]  # bitwise
    assert [r.get("val_loss") for r in split] == [r.get("val_loss") for r in straight]


def test_a_command_that_returns_leaves_the_process_group_and_one_that_failed_does_not(tmp_path, capsys):
    """A group never destroyed lets gloo's threads outlive the interpreter's teardown, which now and then aborts a
    finished torchrun process; after a failure the other processes may be inside a collective, so it is kept."""
    import torch.distributed as dist

    import nanoseek.train.distributed  # noqa: F401 - imported by every command that can join a group
    from nanoseek.cli import main

    def join(name):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / name), 1), rank=0, world_size=1)

    join("first")
    try:
        assert main(["info"]) == 0
        assert not dist.is_initialized()
        join("second")
        assert main(["sample", "--ckpt", str(tmp_path / "missing"), "--prompt", "x"]) != 0
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_torchrun_worker_whose_command_returned_exits_at_once_after_flushing(tmp_path, monkeypatch, capsys):
    """A worker skips the interpreter's teardown (where gloo's threads abort a finished run now and then): it
    leaves the group, flushes its output and calls os._exit with the command's code; one process returns as usual."""
    import torch.distributed as dist

    import nanoseek.cli
    import nanoseek.train.distributed  # noqa: F401 - imported by every command that can join a group

    class Exited(BaseException):  # as os._exit, nothing on the way out may catch it
        pass

    def fake_exit(code):
        raise Exited(code)

    def join():
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)

    monkeypatch.setattr(nanoseek.cli.os, "_exit", fake_exit)
    real_teardown = nanoseek.train.distributed.teardown
    join()
    try:
        assert nanoseek.cli.main(["info"]) == 0  # a group of one process: main returns
        assert not dist.is_initialized() and real_teardown() == 0  # and it was left; none left to leave now
        join()
        # one process cannot join a group of two: the teardown leaves this one and reports two processes
        monkeypatch.setattr(nanoseek.train.distributed, "teardown", lambda: real_teardown() + 1)
        with pytest.raises(Exited) as exited:
            nanoseek.cli.main(["info"])
        assert exited.value.args == (0,) and not dist.is_initialized()
        assert "torch" in capsys.readouterr().out  # what the command printed was written before the exit
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
