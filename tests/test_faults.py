"""Fault injection: kills at the worst moments, a full disk, torn files, two writers, signals, NaN at the last step
of every stage, and a table of corrupt checkpoints and bad inputs — each must end in a loadable run folder or in
one line on stderr and a non-zero exit, with nothing written."""

import errno
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek.cli import main
from nanoseek.config import checkpoint_config, load_run_config
from nanoseek.data.tokenizer import BPETokenizer, ByteTokenizer
from nanoseek.errors import run_command
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.loop import run_stage
from nanoseek.train.pretrain import pretrain
from nanoseek.train.runfolder import RunFolder

TINY = ["--preset", "tiny", "--no-progress"]


def quiet(message):
    pass


def tiny(text_file, *overrides):
    base = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32", "train.batch_size=4"]
    base += ["train.steps=6", "train.warmup_steps=0", "train.eval_every=3", "train.eval_batches=2", "train.seed=1"]
    return load_run_config([], [*base, f"data.source={json.dumps(str(text_file))}", *overrides])


def resume(out, *overrides, log=quiet, **kwargs):
    return pretrain(checkpoint_config(out, list(overrides)), out, resume=True, progress=False, log=log, **kwargs)


def final_weights(out):
    return ckpt.load_checkpoint(out, log=quiet).weights


class Killed(BaseException):
    """What a kill -9 at this point leaves: nothing after it runs (not even except / finally in the saver)."""


def kill_at(monkeypatch, module, name, at):
    """Make the ``at``-th call (1-based) of ``module.name`` die right before it runs."""
    real, calls = getattr(module, name), []

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) == at:
            raise Killed(f"{name} #{at}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: kills between renames and during pruning, stale temporaries, a corrupt newest checkpoint


def saved(tmp_path, step=3, keep_last=1):
    state = {"stage": "pretrain", "step": step, "optimizers": {}, "rng": torch.get_rng_state()}
    return ckpt.save_checkpoint(tmp_path, step, {"w": torch.ones(2)}, {"model": {}}, ByteTokenizer(), state, keep_last)


@pytest.mark.parametrize("at", [1, 2])
def test_a_kill_between_the_renames_of_a_re_save_never_leaves_zero_checkpoints(tmp_path, monkeypatch, at):
    """Re-saving step 3 with keep_last=1 moves the old ckpt-0000003 aside, then renames the new one in: a kill
    before either rename still leaves a checkpoint that is listed and loads; the writer's next start repairs it."""
    saved(tmp_path)
    kill_at(monkeypatch, ckpt.os, "replace", at)
    with pytest.raises(Killed):
        saved(tmp_path)
    monkeypatch.undo()
    found = ckpt.list_checkpoints(tmp_path)
    assert len(found) == 1
    assert ckpt.load_checkpoint(tmp_path, log=quiet).state["step"] == 3
    ckpt.repair_run_folder(tmp_path, quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000003"]
    ckpt.verify_checkpoint(tmp_path / "ckpt-0000003")


def test_a_kill_while_pruning_never_lists_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    saved(tmp_path, step=1, keep_last=2)
    saved(tmp_path, step=2, keep_last=2)
    real = shutil.rmtree

    def half(path, *args, **kwargs):  # delete one file of the oldest checkpoint, then die
        if "0000001" in str(path):
            os.remove(sorted(p.path for p in os.scandir(path))[0])
            raise Killed("rmtree")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", half)
    with pytest.raises(Killed):
        saved(tmp_path, step=3, keep_last=2)
    monkeypatch.undo()
    for folder in ckpt.list_checkpoints(tmp_path):
        ckpt.verify_checkpoint(folder)  # every listed checkpoint is whole
    ckpt.repair_run_folder(tmp_path, quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000002", "ckpt-0000003"]


def test_stale_temporaries_are_removed_when_a_run_starts(text_file, tmp_path):
    pretrain(tiny(text_file, "train.steps=3"), tmp_path, progress=False, log=quiet)
    (tmp_path / ".tmp-ckpt-0000009-12345").mkdir()
    (tmp_path / ".tmp-ckpt-0000009-12345" / "model.safetensors").write_bytes(b"half")
    messages = []
    resume(tmp_path, "train.steps=4", log=messages.append)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert any("removed .tmp-ckpt-0000009-12345" in m for m in messages)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_good_one_loudly_and_resumes_exactly(text_file, tmp_path):
    torch.set_num_threads(1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(tiny(text_file), straight, progress=False, log=quiet)
    pretrain(tiny(text_file, "train.ckpt_every=2", "train.keep_last=3"), split, progress=False, log=quiet, until=5)
    assert [p.name for p in ckpt.list_checkpoints(split)] == ["ckpt-0000002", "ckpt-0000004", "ckpt-0000005"]
    weights = split / "ckpt-0000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a torn write
    messages = []
    summary = resume(split, log=messages.append)
    assert any("ckpt-0000005" in m and "corrupt" in m and "ckpt-0000004" in m for m in messages)
    assert (split / "corrupt-ckpt-0000005").is_dir()  # kept aside for inspection, never pruned in place of a good one
    assert summary["step"] == 6
    a, b = final_weights(straight), final_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# A full disk, a torn metrics line, two writers, signals


def test_a_full_disk_is_one_line_and_the_run_resumes_after_space_is_freed(tmp_path, monkeypatch, capsys):
    real = RunFolder.append

    def full(self, record):
        if record["step"] == 5:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record)[:40])  # the disk filled mid-record
            raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics))
        real(self, record)

    monkeypatch.setattr(RunFolder, "append", full)
    args = ["train", *TINY, "--out", str(tmp_path), "--set", "train.ckpt_every=2"]
    assert main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress lines
    assert "Traceback" not in err and last.startswith("nanoseek train: error: the disk is full") and "metrics" in last
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "dropped an incomplete last record" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_torn_metrics_line_is_dropped_on_resume_with_a_warning(text_file, tmp_path):
    pretrain(tiny(text_file, "train.steps=4"), tmp_path, progress=False, log=quiet)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')
    messages = []
    resume(tmp_path, "train.steps=6", log=messages.append)
    assert any("dropped an incomplete last record" in m for m in messages)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    holder = RunFolder(tmp_path / "run")
    holder.lock()  # another open file description: flock conflicts as with another process
    try:
        assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {os.getpid()}" in err[0]
        assert main(["compare", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        assert "in use by" in capsys.readouterr().err
    finally:
        holder.unlock()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tmp_path):
    (tmp_path / "run.lock").write_text("pid 999999 on elsewhere\n")
    messages = []
    folder = RunFolder(tmp_path, log=messages.append)
    folder.lock()
    folder.unlock()
    assert messages == [f"{tmp_path}: taking over the lock left by pid 999999 on elsewhere, which is no longer running"]
    assert (tmp_path / "run.lock").read_text() == ""  # a clean exit leaves no holder's name


def test_sigterm_outside_the_step_loop_stops_with_one_line_and_143(capsys):
    def start_up():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # never reached: the signal stops the command
        return 0

    assert run_command(start_up, "nanoseek train") == 143
    assert capsys.readouterr().err == "nanoseek train: terminated (SIGTERM)\n"


def test_any_unexpected_error_is_one_line_and_debug_shows_the_traceback(capsys):
    def bug():
        raise KeyError("x")

    assert run_command(bug, "nanoseek sample") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        run_command(bug, "nanoseek sample", debug=True)


@pytest.mark.slow
def test_a_second_signal_aborts_at_once_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoseek", "train", *TINY, "--out", str(tmp_path), "--set", "train.steps=100000",
         "--set", "train.eval_every=100000", "--set", "train.eval_batches=20000", "--set", "model.seq_len=4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # the first: finish the step, then a long final evaluation ...
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # ... which the second cuts short
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("nanoseek train: interrupted: second")


# ---------------------------------------------------------------------------------------------------------------------
# NaN at the last step of every stage


def poison_last_step(engine, last):
    """After the optimizer step of the stage's last step, a weight becomes infinite (what a too-large lr does)."""

    def hook(opt, args, kwargs):
        if engine._label == f"step {last}":
            engine.model.embed.weight.data.fill_(math.inf)

    engine.optimizers[0].register_step_post_hook(hook)


def weight_sum(model):
    """An evaluation that is finite exactly when every weight is."""
    return {"weight_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}


def stage_parts(kind, on_nan, text_file):
    from nanoseek.data.examples import TaskExamples
    from nanoseek.data.loader import load_token_data
    from nanoseek.data.tasks import make_task
    from nanoseek.model import ModelConfig, Transformer
    from nanoseek.rl.distill import DistillConfig, OnPolicyDistill
    from nanoseek.rl.grpo import GRPO, GRPOConfig
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.engine import Engine
    from nanoseek.train.pretrain import Pretraining
    from nanoseek.train.sft import SFT

    def model(seed=0):
        torch.manual_seed(seed)
        return Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=64))

    train = TrainConfig(lr=1e-3, warmup_steps=0, schedule="constant", batch_size=2, steps=2, eval_every=1,
                        eval_batches=1, on_nan=on_nan)  # fmt: skip
    e = Engine(model(), train, log=quiet)
    task = make_task("arithmetic", digits=1)
    task.max_new_tokens = 8
    tok = ByteTokenizer()
    if kind == "pretrain":
        cfg = load_run_config([], [f"data.source={json.dumps(str(text_file))}"])
        return e, Pretraining(e, load_token_data(cfg.data, 64), 64), "val_loss"
    if kind == "sft":
        return e, SFT(e, tok, TaskExamples(task), 64), "val_loss"
    if kind == "grpo":
        lengths = {"len": (lambda p, c, **_: [len(x) for x in c], 1.0)}  # rewards that differ: every group trains
        return e, GRPO(e, tok, task, GRPOConfig(group_size=4), rewards=lengths, evaluator=weight_sum), "weight_sum"
    distill = DistillConfig(mode="on-policy", group_size=2)
    return e, OnPolicyDistill(e, tok, task, model(seed=1), distill, evaluator=weight_sum), "weight_sum"


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
@pytest.mark.parametrize("kind", ["pretrain", "sft", "grpo", "distill"])
def test_nan_at_the_last_step_is_caught_in_every_stage_before_evaluation_and_checkpoint(
    text_file, tmp_path, kind, on_nan
):
    from nanoseek.train.engine import TrainingError

    e, stage, evaluation = stage_parts(kind, on_nan, text_file)
    poison_last_step(e, 2)
    folder = RunFolder(tmp_path, log=quiet)
    run = lambda: run_stage(stage, e, folder, {"model": {}}, ByteTokenizer(), progress=False, log=quiet)  # noqa: E731
    if on_nan == "stop":
        with pytest.raises(TrainingError, match="non-finite weights after the update .* at step 2"):
            run()
        assert ckpt.list_checkpoints(tmp_path) == []  # nothing saved from the poisoned weights
        return
    summary = run()
    assert summary["skipped_steps"] == 1 and summary["step"] == 2
    weights = ckpt.load_checkpoint(tmp_path, log=quiet).weights
    assert all(w.isfinite().all() for w in weights.values())
    assert math.isfinite(summary["final"][evaluation])  # the final evaluation saw the restored weights


@pytest.mark.parametrize("lr", ["inf", "nan", "-1", "1e39"])
def test_non_finite_or_absurd_learning_rates_are_rejected_by_config_validation(lr):
    with pytest.raises(ValueError, match="lr=.* is invalid"):
        load_run_config([], [f"train.lr={lr}"])


# ---------------------------------------------------------------------------------------------------------------------
# Resume checks its inputs


def test_resume_refuses_a_changed_corpus_naming_both_hashes_unless_told(text_file, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(text_file.read_text())
    pretrain(tiny(data, "train.steps=3", "data.tokenizer='bpe'", "data.bpe_vocab_size=300"), tmp_path / "run",
             progress=False, log=quiet)  # fmt: skip
    before = ckpt.load_checkpoint(tmp_path / "run").state["inputs"]["corpus"]
    data.write_text(text_file.read_text()[::-1])
    with pytest.raises(ValueError, match=f"corpus differs .* {before} then, [0-9a-f]{{64}} now.*--allow-data-change"):
        resume(tmp_path / "run", "train.steps=4")
    summary = resume(tmp_path / "run", "train.steps=4", allow_changed_inputs=True)
    assert summary["step"] == 4
    a = (ckpt.list_checkpoints(tmp_path / "run")[0] / "tokenizer.json").read_text()
    assert a == (ckpt.list_checkpoints(tmp_path / "run")[-1] / "tokenizer.json").read_text()  # the same tokenizer


def test_bpe_training_is_bounded_on_long_runs_of_one_character():
    start = time.process_time()
    tok = BPETokenizer.train(["a" * 2_000_000, "the quick brown fox " * 50], 300)
    assert time.process_time() - start < 10  # unbounded, this run alone takes tens of minutes
    assert tok.decode(tok.encode("a" * 1000 + " the fox")) == "a" * 1000 + " the fox"


# ---------------------------------------------------------------------------------------------------------------------
# A table of corrupt checkpoints and bad inputs: one line on stderr, a non-zero exit, nothing written


def rehash(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {name: ckpt._sha256(folder / name) for name in ckpt.FILES}
    (folder / "meta.json").write_text(json.dumps(meta))


def edit_weights(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors")
    rehash(folder)


def edit(folder, name, content):
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    rehash(folder)


CORRUPT = {
    "wrong shapes": lambda f: edit_weights(f, lambda w: w.update({next(iter(w)): torch.zeros(3, 3)})),
    "missing key": lambda f: edit_weights(f, lambda w: w.pop(next(iter(w)))),
    "meta.json of []": lambda f: (f / "meta.json").write_text("[]"),
    "state.pt not a checkpoint": lambda f: (torch.save([1, 2, 3], f / "state.pt"), rehash(f)),
    "state.pt garbage": lambda f: edit(f, "state.pt", b"not a pickle"),
    "state.pt without optimizers": lambda f: (torch.save({"step": 3}, f / "state.pt"), rehash(f)),
    "header length 2^62": lambda f: edit(
        f, "model.safetensors", struct.pack("<Q", 2**62) + (f / "model.safetensors").read_bytes()[8:]
    ),
    "deeply nested config.toml": lambda f: edit(f, "config.toml", "a = " + "[" * 5000 + "]" * 5000),
    "config.toml not TOML": lambda f: edit(f, "config.toml", "[model\n"),
    "tokenizer.json garbage": lambda f: edit(f, "tokenizer.json", '{"kind": "bpe"}'),
}


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", *TINY, "--out", str(out), "--set", "train.steps=3", "--set", "train.eval_every=3"]) == 0
    return out


def snapshot(path):
    """Every file under ``path`` (but the lock) with its content."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "run.lock")
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def one_line_error(capsys, argv, created=None):
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"nanoseek {argv[0]}: error: ") and "Traceback" not in captured.err
    assert created is None or not created.exists()
    return lines[0]


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.parametrize("command", ["sample", "resume"])
def test_a_corrupt_or_foreign_checkpoint_is_one_line_naming_the_file(one_checkpoint, tmp_path, capsys, case, command):
    run = tmp_path / "run"
    shutil.copytree(one_checkpoint, run)
    folder = ckpt.list_checkpoints(run)[-1]
    CORRUPT[case](folder)
    before = snapshot(run)
    if command == "sample" and case == "state.pt without optimizers":
        assert main(["sample", "--ckpt", str(folder), "--max-new-tokens", "2"]) == 0  # sampling needs none
        return
    if command == "sample":
        line = one_line_error(capsys, ["sample", "--ckpt", str(folder), "--max-new-tokens", "2"])
    else:
        line = one_line_error(capsys, ["train", "--resume", "--out", str(run), "--set", "train.steps=5"])
    assert str(folder) in line
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("bpe") / "run"
    args = [
        "--set",
        "train.steps=1",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "data.tokenizer='bpe'",
        "--set",
        "data.bpe_vocab_size=300",
    ]
    assert main(["train", *TINY, "--data", str(text_file), "--out", str(out), *args]) == 0
    return out


BAD_INPUTS = {
    "--out an existing file": (["train", *TINY, "--out", "{file}"], "is a file, not a folder"),
    "5000-deep --set": (["train", *TINY, "--out", "{new}", "--set", "train.steps=" + "[" * 5000], "nested"),
    "--set with a newline": (["train", *TINY, "--out", "{new}", "--set", "train.steps=3\nmodel.d_model=8"], "line"),
    "empty data.source": (["train", *TINY, "--out", "{new}", "--set", 'data.source=""'], "source"),
    "batch_size=1e8": (["train", *TINY, "--out", "{new}", "--set", "train.batch_size=100000000"], "batch_size"),
    "batch beyond memory": (
        ["train", *TINY, "--out", "{new}", "--set", "train.batch_size=1000000", "--set", "model.seq_len=2048"],
        "of memory (estimated)",
    ),
    "n_layers=1e7": (["train", *TINY, "--out", "{new}", "--set", "model.n_layers=10000000"], "of memory (estimated)"),
    "d_model=2**62": (["train", *TINY, "--out", "{new}", "--set", f"model.d_model={2**62}"], "of memory (estimated)"),
    "eval_batches beyond the data": (
        ["train", *TINY, "--out", "{new}", "--set", "train.eval_batches=1000000"],
        "validation windows",
    ),  # fmt: skip
    "steps=1e12": (["train", *TINY, "--out", "{new}", "--set", "train.steps=1000000000000"], "steps"),
    "--resume --set model.d_model=64": (
        ["train", "--resume", "--out", "{ckpt}", "--set", "model.d_model=64"],
        "cannot change the model's shape",
    ),  # fmt: skip
    "--num-samples 1e9": (
        ["sample", "--ckpt", "{ckpt}", "--max-new-tokens", "2", "--num-samples", "1000000000"],
        "of memory (estimated)",
    ),  # fmt: skip
    "--num-samples 0": (["sample", "--ckpt", "{ckpt}", "--max-new-tokens", "2", "--num-samples", "0"], "num-samples"),
    "eval --n 1e9": (["eval", "--ckpt", "{ckpt}", "--task", "arithmetic", "--n", "1000000000"], "--n=1000000000"),
    "eval --samples 1e9": (
        ["eval", "--ckpt", "{ckpt}", "--task", "arithmetic", "--samples", "1000000000"],
        "--samples",
    ),
    "non-UTF-8 prompt to a BPE model": (["sample", "--ckpt", "{bpe}", "--prompt", "caf\udce9"], "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_input_is_one_line_a_non_zero_exit_and_nothing_written(
    one_checkpoint, bpe_checkpoint, tmp_path, capsys, case
):
    argv, message = BAD_INPUTS[case]
    (tmp_path / "file").write_text("keep me")
    names = {"file": tmp_path / "file", "new": tmp_path / "new", "ckpt": one_checkpoint, "bpe": bpe_checkpoint}
    argv = [str(names[a[1:-1]]) if a[1:-1] in names and a[0] == "{" else a for a in argv]
    before = snapshot(one_checkpoint)
    line = one_line_error(capsys, argv, created=tmp_path / "new")
    assert message in line
    assert (tmp_path / "file").read_text() == "keep me" and snapshot(one_checkpoint) == before
