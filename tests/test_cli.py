"""The `nanoseek` command end to end: help, bad input, Ctrl-C, torchrun data parallelism."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanoseek.cli import main

TINY = ["--preset", "tiny", "--no-progress"]


def run_cli(*args, timeout=120, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kwargs)  # fmt: skip


def test_help_explains_every_subcommand(capsys):
    for command in ("train", "sample", "info", "config", "reason-demo"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--set SECTION.KEY=VALUE" in out and "--resume" in out and "--max-new-tokens" in out and "--data" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.d_modle=64"], "unknown key model.d_modle (did you mean model.d_model?)"),
        (["--set", "train.steps=many"], "train.steps='many' has the wrong type: expected int"),
        (["--set", "train.warmup_steps=99"], "[train] warmup_steps=99 is invalid: must be <= steps=8"),
        (["--set", "model.residual=highway"], "[model] residual='highway' is invalid: expected one of plain, hc, mhc"),
        (["--set", "optim.lr=1"], "unknown section [optim]"),
        (["--set", "lr"], "expected section.key=value"),
        (["--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    ],
)
def test_bad_config_fails_before_training_naming_the_problem(tmp_path, capsys, args, message):
    assert main(["train", *TINY, "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    assert (
        main(["train", *TINY, "--out", str(tmp_path), "--set", "train.steps=2", "--set", "train.warmup_steps=1"]) == 0
    )
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 2
    assert "already holds checkpoints; continue it with --resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_as_shells_expect(tmp_path, sig, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoseek", "train", *TINY, "--out", str(tmp_path), "--set", "train.steps=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and 3 <= summary["step"] < 100000
    assert summary["signal"] == sig.name
    assert (tmp_path / f"ckpt-{summary['step']:07d}" / "meta.json").is_file()
    assert "continue with --resume" in err


def test_every_preset_is_a_valid_config():
    from nanoseek.config import load_run_config, preset_names, preset_path

    assert set(preset_names()) >= {"tiny", "demo", "gpu-small"}
    for kind in ("", "sft", "grpo"):
        for name in preset_names(kind):
            load_run_config([preset_path(name, kind)])


def test_sample_greedy_with_and_without_cache_gives_the_same_text(tmp_path, capsys):
    from nanoseek.train.sampling import sample_text

    assert (
        main(["train", *TINY, "--out", str(tmp_path), "--set", "train.steps=2", "--set", "train.warmup_steps=1"]) == 0
    )
    cached = sample_text(tmp_path, "The ", max_new_tokens=20, temperature=0)
    uncached = sample_text(tmp_path, "The ", max_new_tokens=20, temperature=0, use_cache=False)
    assert cached == uncached and cached[0].startswith("The ") and len(cached[0].encode()) >= 20
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path), "--prompt", "The ", "--max-new-tokens", "10", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    assert main(["sample", "--ckpt", str(tmp_path), "--max-new-tokens", "500"]) == 2
    assert "at most 31 new tokens" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
