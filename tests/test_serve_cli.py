"""`nanoseek chat` and `nanoseek serve` as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving import (
    ANSWER,
    REASONING,
    free_port,
    random_checkpoint,
    shared_memorised,
    single_thread,  # noqa: F401 (autouse fixture)
)

from nanoseek.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_memorised(tmp_path_factory)


def test_chat_one_shot_prints_the_answer_alone_on_stdout(ckpt, capsys):
    assert main(["chat", "--ckpt", str(ckpt), "-p", "Q", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == ANSWER + "\n"
    assert f"thinking: {REASONING}" in err and "tok/s" in err and " J estimated" in err


def test_one_shot_answer_cut_inside_the_thinking_keeps_the_statistics_on_their_own_line(ckpt, capsys):
    assert main(["chat", "--ckpt", str(ckpt), "-p", "Q", "--temperature", "0", "--max-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n"  # no answer: the budget ended inside the thinking
    thinking, stats = err.splitlines()[-2:]
    cut = REASONING.encode()[:3].decode(errors="replace")  # 3 byte tokens: "x " and half of "é", shown as U+FFFD
    assert thinking == f"thinking: {cut}" and stats.startswith("[3 tokens")


def test_interactive_chat_commands_history_and_multiline(ckpt, capsys, monkeypatch):
    lines = iter(["/set temperature 0", "/set top_p 5", "/set nothing 1", "/", "/set seed 99999999999999999999999",
                  "Q", "/show", "wh\\", "at", "/show", "/clear", "/show", "/bye"])  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--ckpt", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "temperature = 0.0" in out and "error: top_p='5': top_p must be in (0, 1]" in out
    assert out.count("commands: /set NAME VALUE") == 2  # an unknown setting and a bare "/": the help
    assert "error: seed='99999999999999999999999': seed must be in [0, 2**63)" in out
    assert f"thinking: {REASONING}\n{ANSWER}\n" in out
    shows = [line for line in out.splitlines() if line.startswith("history:")]
    assert shows == ["history: 1 turns", "history: 2 turns", "history: 0 turns"]  # "wh\nat" was one message
    assert "(conversation cleared)" in out


def test_chat_keeps_history_within_the_context(ckpt):
    from nanoseek.serve.chat import Chat
    from nanoseek.train.load import load_model

    settings = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 0, "seed": None}
    chat = Chat(load_model(ckpt), settings, out=open(os.devnull, "w"), err=open(os.devnull, "w"))  # noqa: SIM115
    try:
        for _ in range(8):
            chat.answer("Q " * 10)
        ids = chat.prompt_ids("Q")
        assert len(ids) < 128 and len(chat.history) == 16
        assert chat.loaded.tokenizer.decode(ids).endswith("Q\n<think>")
    finally:
        chat.batcher.stop()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("nanoseek serve: error:")
    assert main(["chat", "--ckpt", str(tmp_path), "-p", "x", "--temperature", "-1"]) == 2
    assert "temperature must be in [0, 2]" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_finishes_running_answers_on_sigterm(tmp_path):
    ckpt = random_checkpoint(tmp_path / "random", seq_len=512)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nanoseek", "serve", "--ckpt", str(ckpt), "--port", str(port), "--grace", "20"]
    # the server's output goes to files: a pipe nobody reads while the test waits fills up (an access-log line per
    # /health poll during the compile) and then blocks the server's event loop on its next write
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240  # the prefill and decode steps are compiled before /health says 200
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tasks = Path(f"/proc/{proc.pid}/task").iterdir()
        children = [int(c) for t in tasks for c in (t / "children").read_text().split()]  # the generation process
        assert children
        body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 500, "seed": 1}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # mid-answer
            rest = [x for x in lines if x]
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down cleanly
        deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends once the server's pipe closes
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)  # no process left behind
        assert "Finished server process" in (tmp_path / "stderr").read_text()
        assert "prefill and decode steps compiled in" in (tmp_path / "stdout").read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_warns_when_listening_beyond_this_machine_without_a_key(ckpt, capsys, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.delenv("NANOSEEK_API_KEY", raising=False)
    assert main(["serve", "--ckpt", str(ckpt), "--host", "0.0.0.0"]) == 0
    assert "warning: listening on 0.0.0.0 without --api-key" in capsys.readouterr().err
    monkeypatch.setenv("NANOSEEK_API_KEY", "k")
    assert main(["serve", "--ckpt", str(ckpt), "--host", "0.0.0.0", "--port", "9"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 9
    assert main(["serve", "--ckpt", str(ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
