"""Load and soak of `nanoseek serve` on 127.0.0.1 (bounded in requests and time; loopback only).

Load: for 1, 4 and 16 concurrent streaming clients, each sends /v1/completions requests (a short prompt, 64 new
tokens, temperature 1) one after another for ``--seconds`` (in two halves: the levels in order, then backwards, so
a drift of the machine's speed does not tilt the ratios). The clients share the machine with the server, so they
are kept lean: each is one keep-alive HTTP/1.1 connection read with asyncio streams (``StreamClient``). It prints
aggregate tokens/s, time to first token and the time per token (p50 / p99: the gap between two chunks divided by
the request's mean tokens per chunk, since a busy server sends several tokens in one chunk), the ratio of
throughput to one client, and the generator's batch-1 decode speed in this process (same model, one thread, the
compiled step the server uses; ``--no-compile`` serves eagerly). The model is the demo preset's shape with random
weights (decode speed does not depend on what was learned) unless ``--ckpt`` names one.

Soak (``--soak N``): N requests from 8 concurrent workers mixing valid chat and completions (streamed or not),
malformed bodies, invalid parameters, oversized bodies and prompts, and streams the client abandons after a few
events; prints requests by kind, answers by status, whether the server process is the one started (no restart) and
its resident memory (with the processes it started) at the start, every 500 requests and at the end.

    python benchmarks/serve_load.py                 # the load table
    python benchmarks/serve_load.py --soak 2000     # the soak
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import add_json_argument, load_average, require_at_least, require_at_least_one, row, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoseek.config import load_run_config  # noqa: E402
from nanoseek.data.tokenizer import ByteTokenizer  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.model.generate import generate  # noqa: E402
from nanoseek.train.checkpoint import save_checkpoint  # noqa: E402

PROMPT = "The with statement"
NEW_TOKENS = 64


def demo_checkpoint(folder: Path) -> Path:
    cfg = load_run_config([ROOT / "nanoseek/presets/demo.toml"], [])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    save_checkpoint(folder, 1, model.state_dict(), cfg.to_dict(), ByteTokenizer(), {"step": 1, "stage": "pretrain"})
    return folder


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now: a server left over from another run cannot answer for ours."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, threads: int, compile: bool = True, generation: str = "process"):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "nanoseek", "serve", "--ckpt", str(ckpt), "--port", str(port),
               "--log-level", "warning", "--max-queue", "256", "--generation", generation]  # fmt: skip
    command += [] if compile else ["--no-compile"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


class StreamClient:
    """One load-generating client: a keep-alive HTTP/1.1 connection written and read with asyncio streams.

    The clients share the server's two cores, so every cycle they spend is taken from the server being measured:
    16 httpx clients used ≈ 0.45 of a core at 16 clients, this one ≈ 0.13 (docs/LOG.md). It speaks only what the
    load needs: a JSON POST, and a chunked response read event by event (``data: ...`` blocks)."""

    def __init__(self, port: int):
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post_events(self, path: str, body: dict):
        """Yield (arrival time, event bytes) for each server-sent event of the answer to ``body``."""
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        data = json.dumps(body).encode()
        writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))  # fmt: skip
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        if status != 200 or "transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"the server answered {path} with {head.splitlines()[0]!r}, not a 200 event stream")
        pending = b""
        while True:
            size = int(await reader.readuntil(b"\r\n"), 16)
            chunk = (await reader.readexactly(size + 2))[:-2]
            if not size:
                return
            now = time.perf_counter()
            *events, pending = (pending + chunk).split(b"\n\n")
            for event in events:
                yield now, event

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def stream_once(client: StreamClient, seed: int) -> dict:
    body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    arrivals, tokens = [], 0
    async for now, event in client.post_events("/v1/completions", body):
        if event.startswith(b'data: {"id"'):
            arrivals.append(now)
            if b'"choices": []' in event:
                tokens = int(event.split(b'"completion_tokens": ')[1].split(b",")[0])
    arrivals = arrivals[:-1]  # the usage chunk
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    per_chunk = tokens / max(len(arrivals), 1)  # a busy server coalesces tokens into fewer chunks
    return {"ttft": arrivals[0] - t0, "gaps": gaps, "per_token": [g / per_chunk for g in gaps], "tokens": tokens,
            "chunks": len(arrivals)}  # fmt: skip


async def load_level(port: int, clients: int, seconds: float) -> tuple[list[dict], float]:
    """The requests of ``clients`` concurrent clients over ``seconds``, and the wall time they took."""
    results, stop_at = [], time.perf_counter() + seconds

    async def client_loop(k: int) -> None:
        client = StreamClient(port)
        try:
            i = 0
            while time.perf_counter() < stop_at:
                results.append(await stream_once(client, seed=k * 100_000 + i))
                i += 1
        finally:
            client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return results, time.perf_counter() - t0


def summary(clients: int, parts: list[tuple[list[dict], float]]) -> dict:
    results = [r for part, _ in parts for r in part]
    wall = sum(w for _, w in parts)
    gaps = [g for r in results for g in r["per_token"]]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "gap_p50": pct(gaps, 50), "gap_p99": pct(gaps, 99),
            "per_chunk": tokens / sum(r["chunks"] for r in results)}  # fmt: skip


def load_table(port: int, levels: list[int], seconds: float) -> list[dict]:
    """Each level twice for half the time, in the order given and then backwards (1, 4, 16, 16, 4, 1): the
    machine's speed drifts by tens of percent over minutes, and a drift that is linear in time then weighs on
    every level alike instead of on the ratio."""
    parts: dict[int, list] = collections.defaultdict(list)
    for n in levels + levels[::-1]:
        parts[n].append(asyncio.run(load_level(port, n, seconds / 2)))
    return [summary(n, parts[n]) for n in levels]


def batch1_decode(ckpt: Path) -> float:
    from nanoseek.train.load import load_model

    torch.set_num_threads(1)
    model = load_model(ckpt).model
    prompt = [list(PROMPT.encode())]
    generate(model, prompt, 8, generator=torch.Generator().manual_seed(0), compile=True)  # compiles, as serve does
    t0, n = time.perf_counter(), 0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        n += generate(model, prompt, model.cfg.seq_len - len(prompt[0]), generator=g, compile=True).tokens.shape[1]
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------------
# Soak

KINDS = ("chat", "chat_stream", "completion", "malformed_json", "bad_param", "oversized_body", "oversized_prompt",
         "cancelled_stream")  # fmt: skip


async def soak_request(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random) -> str:
    chat = {"messages": [{"role": "user", "content": rng.choice(["hello", "1+2", "The with statement"])}],
            "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7, 1.0])}  # fmt: skip
    post = url + "/v1/chat/completions"
    if kind == "chat":
        r = await client.post(post, json=chat)
    elif kind == "chat_stream":
        async with client.stream("POST", post, json={**chat, "stream": True}) as r:
            body = b"".join([chunk async for chunk in r.aiter_bytes()])
            if r.status_code == 200 and not body.endswith(b"data: [DONE]\n\n"):
                return "stream_not_closed"
    elif kind == "completion":
        r = await client.post(url + "/v1/completions", json={"prompt": "def f(", "max_tokens": rng.randint(1, 32)})
    elif kind == "malformed_json":
        r = await client.post(post, content=b'{"messages": [', headers={"Content-Type": "application/json"})
    elif kind == "bad_param":
        r = await client.post(post, json={**chat, rng.choice(["temperature", "top_p", "n"]): -3})
    elif kind == "oversized_body":
        r = await client.post(post, content=b"x" * 1_200_000, headers={"Content-Type": "application/json"})
    elif kind == "oversized_prompt":
        r = await client.post(post, json={**chat, "messages": [{"role": "user", "content": "y" * 500}]})
    else:  # a stream the client abandons after two events
        async with client.stream("POST", post, json={**chat, "max_tokens": 100, "stream": True}) as r:
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if n >= 4:
                    break
        return "abandoned"
    return str(r.status_code)


def rss_mb(pid: int) -> float:
    """Resident memory of the process and every process it started (the server's generation process, compile
    workers, multiprocessing's resource tracker); a process that ends while it is read counts 0."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    own = sum(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
    return own + sum(rss_mb(child) for child in children)


def server_errors(metrics: list[str]) -> int:
    """5xx answers counted by the server's /metrics."""
    return sum(int(line.split()[-1]) for line in metrics if 'status="5' in line)


async def soak(url: str, pid: int, total: int, workers: int = 8) -> None:
    rng = random.Random(0)
    plan = [rng.choice(KINDS) for _ in range(total)]
    kinds, statuses, memory = collections.Counter(plan), collections.Counter(), [(0, rss_mb(pid))]
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(timeout=60) as client:
            for i in range(k, total, workers):
                statuses[(plan[i], await soak_request(client, url, plan[i], rng))] += 1
                done += 1
                if done % 500 == 0:
                    memory.append((done, rss_mb(pid)))

    errors_before = server_errors(httpx.get(url + "/metrics").text.splitlines())
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(workers)))
    health = httpx.get(url + "/health").status_code
    print(f"soak: {total} requests, {workers} concurrent workers, {time.perf_counter() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("requests by kind: " + ", ".join(f"{k} {kinds[k]}" for k in KINDS))
    print("answers by kind and status: " + ", ".join(f"{k}/{s}: {n}" for (k, s), n in sorted(statuses.items())))
    metrics = httpx.get(url + "/metrics").text.splitlines()
    cancelled = next(line.split()[-1] for line in metrics if line.startswith("nanoseek_requests_cancelled_total"))
    errors = server_errors(metrics) - errors_before  # the /health 503s while the server loaded are not the soak's
    print(f"answered: {sum(statuses.values())} of {total}; /health after: {health}; 5xx answers: {errors}; "
          f"generations cancelled by the server: {cancelled}")  # fmt: skip
    if memory[-1][0] != total:
        memory.append((total, rss_mb(pid)))
    print("server RSS (MB) after N requests: " + ", ".join(f"{n}: {m:.0f}" for n, m in memory))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint to serve (default: the demo shape, random weights)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each load level")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (clients use the other core)")
    ap.add_argument("--port", type=int, default=0, help="the server's port on 127.0.0.1 (default 0: a free one)")
    ap.add_argument("--soak", type=int, default=0, metavar="N", help="run the soak with N requests instead")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="serve with eager decoding")
    ap.add_argument("--generation", choices=("process", "thread"), default="process",
                    help="where the server generates (nanoseek serve --generation): its default, a child process, "
                    "or a thread of the server's process")  # fmt: skip
    add_json_argument(ap)
    args = ap.parse_args()
    require_at_least_one(ap, args, "clients", "threads")
    require_at_least(ap, args, 0, "soak", "port")
    if args.seconds <= 0:
        ap.error(f"--seconds={args.seconds} is invalid: expected seconds > 0")
    args.port = args.port or free_port()
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else demo_checkpoint(Path(tmp) / "demo-random")
        proc = start_server(ckpt, args.port, args.threads, args.compile, args.generation)
        url = f"http://127.0.0.1:{args.port}"
        try:
            if args.soak:
                asyncio.run(soak(url, proc.pid, args.soak))
                print(f"server process {proc.pid} still running: {proc.poll() is None}")
                return
            asyncio.run(load_level(args.port, 1, 2.0))  # warm-up
            rows = load_table(args.port, args.clients, args.seconds)
        finally:
            proc.terminate()
            proc.wait(30)
        decode = batch1_decode(ckpt)
    base = rows[0]["tokens_per_s"]
    print(f"server: {args.threads} torch thread(s), generation in a {args.generation}; {NEW_TOKENS} new tokens per "
          f"request; load average at the end {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| clients | requests | aggregate tok/s | vs 1 client | TTFT p50 / p99 (ms) | per-token p50 / p99 (ms) "
          "| tokens per chunk |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}× | "
              f"{1e3 * r['ttft_p50']:.1f} / {1e3 * r['ttft_p99']:.1f} | "
              f"{1e3 * r['gap_p50']:.2f} / {1e3 * r['gap_p99']:.2f} | {r['per_chunk']:.2f} |")  # fmt: skip
    print(f"generator batch-1 decode (in process, 1 thread, compiled): {decode:.0f} tokens/s")
    results = [row(f"aggregate tok/s, {r['clients']} clients / {rows[0]['clients']}", r["tokens_per_s"] / base, "×",
                   ">= 4" if r["clients"] == 16 and rows[0]["clients"] == 1 else None) for r in rows[1:]]  # fmt: skip
    if rows[0]["clients"] == 1:
        results.append(row("time to first token p50, 1 client", 1e3 * rows[0]["ttft_p50"], "ms", "< 50"))
    results.append(row("generator batch-1 decode (in process, 1 thread, compiled)", decode, "tokens/s", ">= 500"))
    write_json(args.json, "serve_load", results, load, args.threads)


if __name__ == "__main__":
    main()
