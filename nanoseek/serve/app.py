"""The HTTP server: OpenAI-compatible routes on FastAPI, the web page at ``/``, health and Prometheus metrics.

``create_app(load, options, meter)`` returns the ASGI app; ``load()`` (normally ``load_model(ckpt)``) runs on a
thread at start-up, and ``/health`` answers 503 until it is done. Generation happens on the batcher's worker
thread (batcher.py), or in a child process of its own with ``generation="process"`` (worker.py); a route only
renders the prompt, queues one job per choice and relays the job's events, as SSE chunks or as one JSON answer. A
client that goes away cancels its jobs (the worker drops them before its next step). Access control, the body size
limit and per-path request counts sit in one ASGI middleware (``Guard``).
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from nanoseek.serve.answers import (
    Answer,
    Choice,
    RequestRun,
    completion_prompts,
    encode_prompt,
    event_stream,
    make_sampling,
    seeded,
)
from nanoseek.serve.batcher import Batcher, compile_steps
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, Prices, stop_list, validation_message
from nanoseek.serve.template import ChatFormat, PromptError
from nanoseek.serve.worker import ProcessBatcher

OPEN_PATHS = ("/", "/health")  # the page holds no data and asks for the key itself
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class ServeOptions:
    """What ``nanoseek serve`` sets besides the checkpoint."""

    model_name: str | None = None
    """The id clients send as ``model`` (default: the run folder's name)."""
    api_key: str | None = None
    """Required as ``Authorization: Bearer KEY`` on every path but / and /health when set."""
    prices: Prices = Prices()
    max_batch: int = 16
    """Sequences decoded together."""
    max_queue: int = 64
    """Sequences waiting for a batch slot; more get 429."""
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call the API from a browser page of theirs (none by default)."""
    compile: bool = False
    """Decode with the torch.compile'd step (compiled while /health says 503; ``nanoseek serve`` turns it on)."""
    generation: str = "thread"
    """Where the batcher runs: "thread" (a thread of this process) or "process" (a child process that loads the
    model again, worker.py; ``load`` must then be picklable; ``nanoseek serve``'s default)."""

    def __post_init__(self) -> None:
        if self.generation not in ("thread", "process"):
            raise ValueError(f"generation={self.generation!r}: expected 'thread' or 'process'")


class Server:
    """The loaded model, its chat format, the batcher and the metrics, shared by the routes."""

    def __init__(self, load: Callable, options: ServeOptions, meter, log: Callable[[str], None]):
        from nanoseek.serve.metrics import Metrics

        self.load, self.options, self.meter, self.log = load, options, meter, log
        self.energy = meter.describe() if meter is not None else {"method": "none", "source": "no energy meter"}
        self.metrics = Metrics(self.energy["method"])
        self.loaded = self.batcher = self.format = None
        self.model_id, self.created, self.error = options.model_name or "nanoseek", int(time.time()), None

    def start(self) -> None:
        threading.Thread(target=self._load, name="nanoseek-load", daemon=True).start()

    def _load(self) -> None:
        try:
            loaded = self.load()
            self.format = ChatFormat.from_config(loaded.config)
            self.model_id = self.options.model_name or loaded.folder.parent.name
            o = self.options
            if o.generation == "process":
                batcher = ProcessBatcher(self.load, loaded.model.cfg.seq_len, max_batch=o.max_batch,
                                         max_queue=o.max_queue, compile=o.compile, meter=self.meter,
                                         log=self.log)  # fmt: skip
            else:
                batcher = Batcher(loaded.model, loaded.tokenizer.decode, max_batch=o.max_batch, max_queue=o.max_queue,
                                  compile=o.compile, meter=self.meter, log=self.log)  # fmt: skip
                if o.compile:
                    compile_steps(batcher, self.log)
            self.batcher, self.loaded = batcher.start(), loaded
            self.log(f"nanoseek serve: model {self.model_id!r} ready ({self.format.name} prompts)")
        except Exception as err:  # reported by /health and every route; the process keeps answering
            self.error = f"{type(err).__name__}: {err}"
            self.log(f"nanoseek serve: error: could not load the model: {self.error}")

    def require_model(self, name: str | None) -> None:
        if self.loaded is None:
            raise APIError(503, self.error or "the model is still loading", code="model_not_ready")
        if name and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist: this server has {self.model_id!r}", "model",
                           "model_not_found")  # fmt: skip

    def card(self) -> dict:
        lm = self.loaded
        cfg, m = lm.model.cfg, lm.model
        experts = {"routed": cfg.n_routed_experts, "shared": cfg.n_shared_experts, "top_k": cfg.top_k}
        return {
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "nanoseek",
            "max_model_len": cfg.seq_len,
            "meta": {
                "n_params": m.num_params(), "n_params_active": m.num_params(active=True), "n_ctx_train": cfg.seq_len,
                "n_vocab": cfg.vocab_size, "tokenizer": lm.tokenizer.name, "d_model": cfg.d_model,
                "n_layers": cfg.n_layers, "residual": cfg.residual,
                "n_streams": cfg.n_streams if cfg.residual != "plain" else 1,
                "experts": experts if cfg.ffn == "moe" else None, "template": self.format.name,
                "reasoning": self.format.reasoning, "stage": lm.stage, "step": lm.step,
                "energy": self.energy,
            },
        }  # fmt: skip


def create_app(load: Callable, options: ServeOptions = ServeOptions(), meter=None, log=print) -> FastAPI:
    server = Server(load, options, meter, log)

    async def lifespan(app: FastAPI):
        server.start()
        yield
        if server.batcher is not None:
            await asyncio.to_thread(server.batcher.stop)

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, param = validation_message(err.errors(), request.headers.get("content-type", ""))
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):  # never for bad input: those are 4xx above
        log(f"nanoseek serve: error: {request.url.path}: {type(err).__name__}: {err}")
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}").body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = resources.files("nanoseek.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        csp = "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src 'self' data:"
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/health")
    async def health():
        failed = server.batcher.failed if server.batcher is not None else None
        if server.loaded is None or failed:
            status = "error" if server.error or failed else "loading"
            return JSONResponse({"status": status, "message": server.error or failed}, status_code=503)
        return {"status": "ok", "model": server.model_id}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        b = server.batcher
        waiting, running = b.load() if b else (0, 0)
        text = server.metrics.render(waiting, running, b.steps if b else 0, b.tokens if b else 0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        server.require_model(None)
        return {"object": "list", "data": [server.card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        server.require_model(name)
        return server.card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        server.require_model(body.model)
        if len(body.messages) > options.max_messages:
            raise APIError(400, f"at most {options.max_messages} messages are accepted", "messages")
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
        try:
            text = server.format.render([{"role": m.role, "content": m.text()} for m in body.messages])
        except PromptError as err:
            raise APIError(400, str(err), err.param) from None
        ids = encode_prompt(server, text)
        limit = body.max_completion_tokens or body.max_tokens or server.format.max_new_tokens
        sampling = make_sampling(server, body, ids, limit, server.format.stop + stop_list(body.stop))
        n = body.n or 1
        run = RequestRun(server, [ids] * n, [seeded(sampling, i) for i in range(n)])
        thinking = server.format.thinking_at_start(text) if server.format.reasoning else None
        answer = Answer(server, run, request, "chat.completion", [len(ids)], [Choice(thinking) for _ in range(n)])
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(answer.chat_chunks(include))
        return await answer.chat_json()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.require_model(body.model)
        if body.logprobs is not None:
            raise APIError(400, "logprobs are not supported by this server", "logprobs")
        prompts = completion_prompts(server, body.prompt)
        n = body.n or 1
        stops = stop_list(body.stop)
        samplings, ids_list = [], []
        for ids in prompts:
            sampling = make_sampling(server, body, ids, body.max_tokens or 16, stops)
            ids_list += [ids] * n
            samplings += [seeded(sampling, i) for i in range(n)]
        run = RequestRun(server, ids_list, samplings)
        echo = [server.loaded.tokenizer.decode(ids) if body.echo else "" for ids in ids_list]
        choices = [Choice(None) for _ in ids_list]
        answer = Answer(server, run, request, "text_completion", [len(p) for p in prompts], choices)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(answer.text_chunks(include, echo))
        return await answer.text_json(echo)

    return app


class Guard:
    """ASGI middleware: API key, body size limit, request counts per path and status."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        key = server.options.api_key
        self.expected = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status = [500]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            if self.expected and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
                scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
                # the scheme is case-insensitive (RFC 9110 §11.1); the key is compared in constant time
                if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
                    error = APIError(401, "a valid API key is required: send Authorization: Bearer KEY",
                                     code="invalid_api_key")  # fmt: skip
                    return await JSONResponse(error.body(), 401)(scope, receive, counted_send)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive, headers)
                if body is None:
                    limit = self.server.options.max_body_bytes
                    error = APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
                    return await JSONResponse(error.body(), 413)(scope, receive, counted_send)
                receive = _replay(body, receive)
            await self.app(scope, receive, counted_send)
        finally:
            self.server.metrics.count_request(path, status[0])

    async def _read_body(self, receive, headers: dict) -> bytes | None:
        """The whole body, or None when it exceeds the limit (by Content-Length or by what arrives)."""
        limit = self.server.options.max_body_bytes
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body read already, then the real channel (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
