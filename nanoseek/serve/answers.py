"""One request's way through the server: its prompts as token ids, its jobs on the batcher, and the answer built
from the jobs' events — a JSON body or a stream of SSE chunks in OpenAI's format."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from nanoseek.serve.batcher import Job, NeverFits, QueueFull, Sampling, ShuttingDown
from nanoseek.serve.protocol import APIError, sse, usage
from nanoseek.serve.reasoning import ReasoningSplitter

MAX_PROMPTS = 16


def encode_prompt(server, text: str, param: str = "messages") -> list[int]:
    """Prompt text -> ids; 400 when empty or not valid Unicode, 413 when no answer token would fit the context."""
    return check_length(server, encode_text(server, text, param), param)


def encode_text(server, text: str, param: str) -> list[int]:
    try:
        return server.loaded.tokenizer.encode(text)
    except UnicodeEncodeError as err:  # JSON can carry a lone surrogate ("\ud800"), which UTF-8 cannot
        raise APIError(400, f"{param} is not valid Unicode: {err.reason} at character {err.start}", param) from None


def check_length(server, ids: list[int], param: str) -> list[int]:
    seq_len = server.loaded.model.cfg.seq_len
    if not ids:
        raise APIError(400, "the prompt is empty", param)
    if len(ids) >= seq_len:
        message = f"the prompt has {len(ids)} tokens; the model's context is {seq_len} tokens including the answer"
        raise APIError(413, message, param, "context_length_exceeded")
    return ids


def completion_prompts(server, prompt) -> list[list[int]]:
    """The legacy ``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        prompts = [encode_text(server, prompt, "prompt")]
    elif prompt and isinstance(prompt[0], str):
        prompts = [encode_text(server, p, "prompt") for p in prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise APIError(400, f"prompt must hold 1 to {MAX_PROMPTS} prompts", "prompt")
    vocab = server.loaded.model.cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise APIError(400, f"token ids must be in [0, {vocab})", "prompt")
    return [check_length(server, p, "prompt") for p in prompts]


def make_sampling(server, body, ids: list[int], limit: int | None, stop: tuple[str, ...]) -> Sampling:
    """Sampling settings of a request; max_tokens is cut to what fits the context (finish_reason "length")."""
    room = server.loaded.model.cfg.seq_len - len(ids)
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return Sampling(min(limit or room, room), temperature, top_k, top_p, body.seed, stop)


def seeded(sampling: Sampling, i: int) -> Sampling:
    """Choice i of n: seed + i, so n choices differ and a seed still fixes all of them."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**63)


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


class Mailbox:
    """Hands events from the worker thread to the event loop's queues, waking the loop once for everything posted
    since it last ran rather than once per event: with 16 answers streaming, one wake-up per decode step instead of
    16 (each wake-up is a system call and a turn of the loop, competing with the worker for the interpreter)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # a delivery is already scheduled and will take this one too
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    if loop not in _MAILBOXES:
        _MAILBOXES[loop] = Mailbox(loop)
    return _MAILBOXES[loop]


class RequestRun:
    """The jobs of one request and the queue their events arrive on (from the worker thread)."""

    def __init__(self, server, prompts: list[list[int]], samplings: list[Sampling]):
        self.loop = asyncio.get_running_loop()
        self.mailbox = mailbox(self.loop)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs = [Job(p, s, self._emitter(i)) for i, (p, s) in enumerate(zip(prompts, samplings, strict=True))]
        self.open = len(self.jobs)
        try:
            server.batcher.submit(self.jobs)
        except NeverFits as err:
            raise APIError(400, str(err), "n", "too_many_sequences") from None
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later", code="queue_full") from None
        except ShuttingDown as err:
            raise APIError(503, str(err), code="shutting_down") from None

    def _emitter(self, i: int):
        def emit(kind: str, value) -> None:  # called on the worker thread
            self.mailbox.post(self.queue, (i, kind, value, self.jobs[i].stats.completion_tokens))

        return emit

    async def events(self, request: Request):
        """Lists of (choice, kind, value, tokens so far) until every job has ended: each list is everything that
        arrived since the last one, so a busy server sends fewer, larger chunks instead of falling behind. A
        disconnect cancels the jobs."""
        watcher = asyncio.create_task(self._watch(request))
        try:
            while self.open:
                batch = [await self.queue.get()]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                self.open -= sum(kind in ("done", "error") for _, kind, _, _ in batch)
                yield batch
        finally:
            watcher.cancel()
            self.cancel()

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.cancelled.is_set():
                job.cancel()


class Choice:
    """One choice's text as it arrives; split into reasoning and content when ``thinking`` is not None (True: the
    prompt opened the think block)."""

    def __init__(self, thinking: bool | None):
        self.splitter = ReasoningSplitter(thinking) if thinking is not None else None
        self.reasoning, self.content, self.reasoning_tokens, self.finish_reason = "", "", 0, None

    def add(self, text: str, tokens: int, final: bool = False) -> tuple[str, str]:
        """New text (and ``tokens`` generated so far) -> (reasoning delta, content delta)."""
        if self.splitter is None:
            self.content += text
            return "", text
        was_open = not self.splitter.closed_think
        r, c = self.splitter.feed(text)
        if final:
            r2, c2 = self.splitter.finish()
            r, c = r + r2, c + c2
        if was_open and (self.splitter.state == "think" or self.splitter.closed_think):
            self.reasoning_tokens = tokens  # the tokens up to the one that closed the think block
        self.reasoning, self.content = self.reasoning + r, self.content + c
        return r, c


class Answer:
    """Relays a RequestRun's events as OpenAI's chat or legacy completion objects."""

    def __init__(self, server, run: RequestRun, request: Request, kind: str, prompts: list[int], choices: list):
        self.server, self.run, self.request, self.kind, self.choices = server, run, request, kind, choices
        self.prompt_tokens = sum(prompts)
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created, self.t0 = int(time.time()), time.perf_counter()
        self.base = {"id": self.id, "created": self.created, "model": server.model_id}

    def usage(self, cancelled: bool = False) -> dict:
        stats = [job.stats for job in self.run.jobs]
        reasoning = sum(c.reasoning_tokens for c in self.choices)
        u = usage(stats, self.prompt_tokens, reasoning, self.server.options.prices, self.server.energy)
        self.server.metrics.answered(u, time.perf_counter() - self.t0, cancelled)
        return u

    async def _events(self):
        """(choice index, reasoning delta, content delta, finish reason or None) per choice and batch of events."""
        async for batch in self.run.events(self.request):
            deltas: dict[int, list[str]] = {}
            for i, kind, value, tokens in batch:
                choice = self.choices[i]
                if kind == "error":
                    status = 503 if "shut down" in value else 500
                    raise APIError(status, value, code="generation_failed")
                r, c = choice.add(value if kind == "text" else "", tokens, final=kind == "done")
                if kind == "done":
                    choice.finish_reason = value
                d = deltas.setdefault(i, ["", ""])
                d[0], d[1] = d[0] + r, d[1] + c
            for i, (r, c) in deltas.items():
                yield i, r, c, self.choices[i].finish_reason

    async def _finish(self) -> dict:
        """Run to the end; the usage (a client that left meanwhile counts as cancelled)."""
        async for _ in self._events():
            pass
        return self.usage(cancelled=any(c.finish_reason == "cancelled" for c in self.choices))

    async def chat_json(self) -> dict:
        u = await self._finish()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.content, **self._reasoning(c.reasoning, c)},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(self.choices)
        ]
        return {**self.base, "object": "chat.completion", "choices": choices, "usage": u, "timings": u["timings"]}

    async def text_json(self, echo: list[str]) -> dict:
        u = await self._finish()
        choices = [
            {"index": i, "text": echo[i] + c.content, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(self.choices)
        ]
        return {**self.base, "object": "text_completion", "choices": choices, "usage": u, "timings": u["timings"]}

    def _reasoning(self, text: str, choice: Choice) -> dict:
        """Both names clients read: DeepSeek's and llama.cpp's ``reasoning_content``, vLLM's ``reasoning``."""
        if choice.splitter is None:
            return {}
        return {"reasoning_content": text, "reasoning": text}

    async def chat_chunks(self, include_usage: bool) -> AsyncIterator[str]:
        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse({**self.base, "object": "chat.completion.chunk", "choices": [choice], "usage": None})

        async def body():
            for i in range(len(self.choices)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, r, c, finish in self._events():
                delta = {**(self._reasoning(r, self.choices[i]) if r else {}), **({"content": c} if c else {})}
                if delta:
                    yield chunk(i, delta)
                if finish:
                    yield chunk(i, {}, finish)

        async for event in self._stream(body(), "chat.completion.chunk", include_usage):
            yield event

    async def text_chunks(self, include_usage: bool, echo: list[str]) -> AsyncIterator[str]:
        def chunk(i: int, text: str, finish: str | None = None) -> str:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            return sse({**self.base, "object": "text_completion", "choices": [choice], "usage": None})

        async def body():
            for i, text in enumerate(echo):
                if text:
                    yield chunk(i, text)
            async for i, _, c, finish in self._events():
                if c or finish:
                    yield chunk(i, c, finish)

        async for event in self._stream(body(), "text_completion", include_usage):
            yield event

    async def _stream(self, chunks: AsyncIterator[str], kind: str, include_usage: bool) -> AsyncIterator[str]:
        """The chunks, then the usage chunk (``choices: []``) when asked, then ``[DONE]``; an error mid-stream is
        one ``data: {"error": …}`` event. A client that goes away ends here with the jobs cancelled."""
        finished = False
        try:
            async for event in chunks:
                yield event
            finished = True
            u = self.usage()
            if include_usage:
                yield sse({**self.base, "object": kind, "choices": [], "usage": u, "timings": u["timings"]})
        except APIError as err:
            finished = True
            yield sse(err.body())
        finally:
            if not finished:
                self.run.cancel()
                self.usage(cancelled=True)
        yield sse("[DONE]")
