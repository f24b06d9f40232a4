"""Generation in a child process (``nanoseek serve --generation process``, the default): the same answers as a
generation thread (a disconnect stopping it within one step is tested both ways in test_serve_api.py), the queue
bound, and a child that dies turning into 503s rather than requests that hang."""

import multiprocessing
import os
import signal
import threading
import time
from functools import partial

import httpx
import openai
import pytest
from serving import (
    ANSWER,
    REASONING,
    random_checkpoint,
    running_server,
    shared_memorised,
    single_thread,  # noqa: F401 (autouse fixture)
    slow_loader,
)

from nanoseek.train.load import load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_memorised(tmp_path_factory)


@pytest.fixture(scope="module")
def servers(ckpt):
    """The same checkpoint served with a generation thread and with a generation process."""
    load = partial(load_model, ckpt)
    with running_server(load, generation="thread") as thread, running_server(load, generation="process") as process:
        yield thread, process


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(c, **kw):
    return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Q"}], **kw)


def test_a_generation_process_answers_as_a_generation_thread_does(servers):
    thread, process = servers
    assert process.state.batcher.process.is_alive() and process.state.batcher.process.pid != os.getpid()
    r = ask(client(process), temperature=0)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    assert r.usage.completion_tokens_details.reasoning_tokens == len((REASONING + "</think>").encode())
    timings, energy = r.usage.model_extra["timings"], r.usage.model_extra["energy"]
    assert timings["predicted_ms"] > 0 and timings["prompt_ms"] > 0 and energy["joules"] >= 0
    stream = ask(client(process), temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ANSWER and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    def sample(server, seed, n=1):
        r = client(server).completions.create(model="tiny", prompt="zz", max_tokens=24, seed=seed, n=n)
        return [c.text for c in r.choices]

    assert sample(process, 3, n=2) == sample(thread, 3, n=2)  # a seed's text does not depend on where it runs
    assert sample(process, 3) != sample(process, 4)
    metrics = httpx.get(process.url + "/metrics").text
    counts = dict(
        line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("nanoseek_") and "{" not in line
    )
    assert int(counts["nanoseek_decode_steps_total"]) > 0 and int(counts["nanoseek_generated_tokens_total"]) > 0


def test_the_queue_bound_holds_and_a_dead_generation_process_gives_503_not_a_hang(tmp_path):
    ckpt = random_checkpoint(tmp_path / "random", seq_len=256)
    with running_server(slow_loader(ckpt, 0.05), generation="process", max_batch=1, max_queue=1) as s:
        c = client(s)
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 150}
        outcomes = []

        def long_request():
            try:
                outcomes.append(c.chat.completions.create(model="tiny", **body))
            except openai.APIError as err:
                outcomes.append(err)

        running = [threading.Thread(target=long_request) for _ in range(2)]  # one runs, one waits
        for t in running:
            t.start()
            time.sleep(0.3)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="tiny", **body)
        os.kill(s.state.batcher.process.pid, signal.SIGKILL)
        for t in running:
            t.join(30)
        assert len(outcomes) == 2 and all(isinstance(o, openai.APIError) for o in outcomes)  # ended, not hung
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="tiny", **body)
        assert err.value.status_code == 503 and "generation process exited" in err.value.message
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "generation process exited" in health.json()["message"]


@pytest.mark.parametrize("generation", ["thread", "process"])
def test_clients_that_leave_while_queued_free_their_places(tmp_path, generation):
    ckpt = random_checkpoint(tmp_path / "random", seq_len=256)
    with running_server(slow_loader(ckpt, 0.05), generation=generation, max_batch=1, max_queue=2) as s:
        url, messages = s.url + "/v1/chat/completions", [{"role": "user", "content": "go"}]
        first = []
        t = threading.Thread(target=lambda: first.append(httpx.post(url, json={"messages": messages, "max_tokens": 40},
                                                                    timeout=60)))  # fmt: skip
        t.start()
        time.sleep(0.5)
        for _ in range(2):  # queued behind the first request, then the client gives up
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json={"messages": messages, "max_tokens": 5}, timeout=0.5)
        t.join(60)
        assert first[0].status_code == 200
        # the idle server takes a request needing both queue places (it answered 429 for good before)
        r = httpx.post(url, json={"messages": messages, "max_tokens": 2, "n": 2}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert "nanoseek_requests_cancelled_total 2" in httpx.get(s.url + "/metrics").text
        too_many = httpx.post(url, json={"messages": messages, "max_tokens": 2, "n": 8}, timeout=30)
        capacity = 2 if generation == "thread" else 3  # a generation process counts running and queued together
        assert too_many.status_code == 400, too_many.text
        error = too_many.json()["error"]
        assert error["param"] == "n" and f"at most {capacity}" in error["message"]


def load_in_the_server_only(folder):
    """Loads in the server's process and fails in the generation process (a broken disk, a missing device)."""
    if multiprocessing.parent_process() is not None:
        raise RuntimeError("no weights here")
    return load_model(folder)


def test_a_generation_process_that_cannot_load_is_reported_by_health(ckpt):
    with running_server(partial(load_in_the_server_only, ckpt), healthy=False, generation="process") as s:
        deadline = time.monotonic() + 60
        while s.state.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(s.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert health.json()["message"].endswith("the generation process could not start: RuntimeError: no weights here")


def test_what_a_generation_process_cannot_take_is_refused_naming_the_way_out(ckpt):
    from nanoseek.serve.app import ServeOptions
    from nanoseek.serve.worker import ProcessBatcher

    with pytest.raises(ValueError, match="picklable load .*--generation thread"):
        ProcessBatcher(lambda: load_model(ckpt), 128)
    with pytest.raises(ValueError, match="expected 'thread' or 'process'"):
        ServeOptions(generation="fork")
