"""The load benchmark's own HTTP client (benchmarks/serve_load.py): events cut anywhere by the chunked encoding
come out whole and in order, a kept-alive connection serves the next request, and an answer that is not an event
stream stops the benchmark with the status it got."""

import asyncio
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")  # serve_load imports it for the soak
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import StreamClient  # noqa: E402

EVENTS = [b'data: {"id": 1, "text": "a"}', b'data: {"id": 2, "text": "b\\n"}', b"data: [DONE]"]


def chunked(body: bytes, cuts: list[int]) -> bytes:
    """``body`` in the chunked transfer encoding, cut at ``cuts``."""
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def serve(answers: list[bytes], requests: list[bytes]) -> asyncio.Server:
    """A server that reads one request at a time on a connection and writes the next canned answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            requests.append(head + await reader.readexactly(length))
            writer.write(answers.pop(0))
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_events_split_across_chunks_arrive_whole_on_one_connection():
    body = b"\n\n".join(EVENTS) + b"\n\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    answers = [head + chunked(body, [5, 40, 41]), head + chunked(body, [len(EVENTS[0]) + 2])]
    requests: list[bytes] = []

    async def run() -> list[list[bytes]]:
        server = await serve(answers, requests)
        client = StreamClient(server.sockets[0].getsockname()[1])
        try:
            answered = []
            for i in range(2):
                answered.append([e async for _, e in client.post_events("/v1/completions", {"n": i})])
            return answered
        finally:
            client.close()
            server.close()

    assert asyncio.run(run()) == [EVENTS, EVENTS]
    assert len(requests) == 2 and all(r.startswith(b"POST /v1/completions HTTP/1.1\r\n") for r in requests)
    assert requests[1].endswith(b'{"n": 1}')


def test_an_error_answer_stops_with_its_status():
    answers = [b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}"]

    async def run() -> None:
        server = await serve(answers, [])
        client = StreamClient(server.sockets[0].getsockname()[1])
        try:
            [e async for _, e in client.post_events("/v1/completions", {})]
        finally:
            client.close()
            server.close()

    with pytest.raises(RuntimeError, match="429 Too Many Requests"):
        asyncio.run(run())
