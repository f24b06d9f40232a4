"""The OpenAI-compatible API, checked with the official openai client and with the raw bytes on the wire."""

import json
import threading
import time

import httpx
import openai
import pytest
from serving import (
    ANSWER,
    COMPLETION,
    REASONING,
    random_checkpoint,
    running_server,
    shared_memorised,
    single_thread,  # noqa: F401 (autouse fixture)
    slow_loader,
)

from nanoseek.train.load import load_model

PROMPT = "Q\n<think>"  # "Q" in the compact template
SEQ_LEN = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_memorised(tmp_path_factory)


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(lambda: load_model(ckpt), model_name="tiny") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, content="Q", **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_models_lists_the_checkpoint_with_its_facts(client):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.owned_by == "nanoseek" and card.max_model_len == SEQ_LEN
    meta = card.meta
    assert meta["template"] == "compact" and meta["reasoning"] and meta["residual"] == "plain"
    assert meta["n_params"] == meta["n_params_active"] > 0 and meta["experts"] is None and meta["stage"] == "sft"


def test_chat_answer_splits_reasoning_from_content_with_usage_energy_and_cost(client):
    r = ask(client, temperature=0)
    message, usage = r.choices[0].message, r.usage
    assert message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert message.reasoning_content == REASONING and message.reasoning == REASONING
    completion_bytes = len(COMPLETION.encode())  # the stop string's tokens were generated, then cut from the text
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), completion_bytes)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == len((REASONING + "</think>").encode())
    extra = usage.model_extra
    cost = extra["cost"]
    assert cost["usd_at_list_price"] == pytest.approx((len(PROMPT) * 0.55 + completion_bytes * 2.19) / 1e6)
    assert cost["usd_machine_time"] == pytest.approx(cost["machine_seconds"] / 3600 * 0.10)
    assert extra["energy"]["method"] == "estimated" and extra["energy"]["joules"] >= 0
    t = extra["timings"]
    assert t["predicted_n"] == completion_bytes and t["prompt_n"] == len(PROMPT) and t["predicted_ms"] > 0


def test_streamed_deltas_add_up_to_the_answer(client):
    stream = ask(client, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (REASONING, ANSWER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(COMPLETION.encode())
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_raw_sse_bytes(server):
    body = {"messages": [{"role": "user", "content": "Q"}], "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n") and b"\r" not in raw
    events = raw.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events)
    payloads = [json.loads(e[6:].decode("utf-8")) for e in events[:-1]]  # strict UTF-8: no half character
    deltas = [p["choices"][0]["delta"] for p in payloads]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert not any("\ufffd" in d.get("reasoning_content", "") + d.get("content", "") for d in deltas)
    assert not any("<" in d.get("content", "") or "think" in d.get("reasoning_content", "") for d in deltas)
    assert all(p["object"] == "chat.completion.chunk" and p["usage"] is None for p in payloads)


def test_same_seed_same_text_and_n_choices(client):
    def sample(seed, n=1):
        r = client.completions.create(model="tiny", prompt="zz", max_tokens=24, temperature=1.0, seed=seed, n=n)
        return [c.text for c in r.choices]

    assert sample(3) == sample(3) and sample(3) != sample(4)
    two = sample(3, n=2)
    assert two[0] == sample(3)[0] and two[0] != two[1]


def test_legacy_completions_echo_stop_and_default_length(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 16  # OpenAI's default max_tokens
    assert r.choices[0].text == COMPLETION[:15] and r.choices[0].finish_reason == "length"  # é is 2 bytes
    r = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=60, stop=["é"], echo=True)
    assert r.choices[0].text == PROMPT + "x " and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=[81, 10], temperature=0, max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "<th"


def test_max_tokens_is_cut_to_the_context(client):
    r = ask(client, "a" * 100, max_completion_tokens=500, temperature=0, stop=["\x00"])
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= SEQ_LEN


def test_errors_have_openai_shape_and_status(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Q"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "x" * SEQ_LEN)
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="at most 256 messages"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Q"}] * 257)
    # unknown fields are accepted and ignored
    assert ask(client, temperature=0, extra_body={"frequency_penalty_v9": 1, "user": "u"}).choices[0].message.content
    lone_surrogate = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'  # valid JSON, not valid UTF-8
    huge_seed = b'{"messages": [{"role": "user", "content": "Q"}], "seed": 100000000000000000000}'
    bad = [(b"{not json", 400), (b"[]", 400), (b'{"messages": "hi"}', 400), (b"x" * 1_100_000, 413),
           (lone_surrogate, 400), (huge_seed, 400)]  # fmt: skip
    for body, status in bad:
        r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # known fields keep their JSON types: nothing is quietly converted (an integer is still a number)
    for field, value in (("seed", "42"), ("seed", 1.0), ("temperature", "0.5"), ("max_tokens", True), ("n", True),
                         ("stream", "yes"), ("stop", 7)):  # fmt: skip
        body = {"messages": [{"role": "user", "content": "Q"}], field: value}
        r = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
    assert ask(client, temperature=0, max_tokens=2, extra_body={"top_p": 1}).usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="at most 256 characters"):
        ask(client, stop=["x" * 257])
    plain_text = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": []}',
                            headers={"Content-Type": "text/plain"})  # fmt: skip
    assert plain_text.status_code == 400 and "Content-Type: application/json" in plain_text.json()["error"]["message"]
    assert httpx.get(server.url + "/nowhere").json()["error"]["message"] == "Not Found"


def test_health_metrics_and_page(server, client):
    ask(client, temperature=0)
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": "tiny"}
    metrics = httpx.get(server.url + "/metrics").text
    assert 'nanoseek_requests_total{path="/v1/chat/completions",status="200"}' in metrics
    assert 'nanoseek_energy_joules_total{method="estimated"}' in metrics
    assert "nanoseek_request_duration_seconds_count" in metrics and "nanoseek_completion_tokens_total" in metrics
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>nanoseek chat</title>" in page.text
    assert "Access-Control-Allow-Origin" not in page.headers


def test_health_is_503_while_loading(ckpt):
    gate = threading.Event()

    def load():
        gate.wait(20)
        return load_model(ckpt)

    with running_server(load, healthy=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.get(s.url + "/v1/models").status_code == 503
        gate.set()
        deadline = time.monotonic() + 20
        while httpx.get(s.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(s.url + "/health").json()["status"] == "ok"


def test_api_key_is_required_everywhere_but_health_and_page(ckpt):
    with running_server(lambda: load_model(ckpt), api_key="s3cret") as s:
        assert httpx.get(s.url + "/health").status_code == 200 and httpx.get(s.url + "/").status_code == 200
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(s.url + "/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for header, status in (("bearer s3cret", 200), ("BEARER s3cret", 200), ("Basic s3cret", 401), ("s3cret", 401),
                               ("Bearer s3cre", 401), ("Bearer s3cretX", 401)):  # fmt: skip
            assert httpx.get(s.url + "/v1/models", headers={"Authorization": header}).status_code == status, header
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == s.state.model_id


def test_full_queue_answers_429(ckpt):
    with running_server(lambda: load_model(ckpt), max_batch=1, max_queue=1) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        results = []
        with s.state.batcher.step_lock:  # generation frozen: the first request waits in the queue
            t = threading.Thread(target=lambda: results.append(ask(c, temperature=0)))
            t.start()
            while not s.state.batcher.waiting:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError):
                ask(c, temperature=0)
        t.join(30)
        assert results[0].choices[0].message.content == ANSWER


@pytest.mark.parametrize("generation", ["thread", "process"])
def test_disconnect_stops_generation_within_one_step(tmp_path, generation):
    ckpt = random_checkpoint(tmp_path / "random", seq_len=256)
    with running_server(slow_loader(ckpt, 0.01), generation=generation) as s:
        body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 200}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        deadline = time.monotonic() + 10
        while not s.state.batcher.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        (job,) = s.state.batcher.ended
        assert job.tokens_after_cancel is not None and job.tokens_after_cancel <= 1
        assert job.stats.completion_tokens < 50
        assert "nanoseek_requests_cancelled_total 1" in httpx.get(s.url + "/metrics").text
        child = getattr(s.state.batcher, "process", None)
    assert child is None or not child.is_alive()  # a generation process ends with the server


def test_cross_origin_access_only_when_allowed(ckpt):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    with running_server(lambda: load_model(ckpt), cors_origins=("http://example.test",)) as s:
        r = httpx.options(s.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"
        other = httpx.options(s.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
