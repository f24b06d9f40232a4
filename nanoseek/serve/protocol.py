"""The OpenAI wire format: request bodies, errors, usage with timings, energy and cost, and SSE framing.

Request fields follow OpenAI's chat and legacy completions APIs (plus ``top_k``, a common extension). Unknown fields
are accepted and ignored, as reference servers do; known ones must have their JSON type (strict: ``"seed": "42"``,
``"max_tokens": true`` or ``"stream": "yes"`` are 400s, not quietly converted; an integer is a valid number).
Every error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

R1_PRICE_INPUT = 0.55
"""US dollars per million input tokens: DeepSeek-R1's list price (cache miss) at its launch."""
R1_PRICE_OUTPUT = 2.19
"""US dollars per million output tokens: DeepSeek-R1's list price at its launch."""
MACHINE_PRICE_PER_HOUR = 0.10
"""US dollars per hour of this machine: about a 2-vCPU cloud VM (the same default as nanoseek compare on a CPU)."""
MAX_STOP = 16
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        if self.status == 429:
            kind = "rate_limit_exceeded"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int | None = Field(None, ge=1, le=8)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list (other parts are refused by the caller)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or not all(stops) or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop must be a string or at most {MAX_STOP} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", "stop")  # fmt: skip
    return tuple(stops)


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")


def validation_message(errors: list[dict], content_type: str = "application/json") -> tuple[str, str | None]:
    """pydantic's errors -> (one-line message, param) for a 400."""
    first = errors[0]
    # pydantic names the member of a union it tried ("stop.str", "prompt.list[int]"): the client sent "stop"
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _UNION_MEMBER.match(str(x))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if param is None and "json" not in content_type.lower():
        got = f"got {content_type!r}" if content_type else "none was sent"
        return f"the request body must be JSON sent with Content-Type: application/json ({got})", None
    if param is None:
        return "the request body must be a JSON object", None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


@dataclass(frozen=True)
class Prices:
    input_per_million: float = R1_PRICE_INPUT
    output_per_million: float = R1_PRICE_OUTPUT
    machine_per_hour: float = MACHINE_PRICE_PER_HOUR


def usage(stats: list, prompt: int, reasoning_tokens: int, prices: Prices, energy: dict) -> dict[str, Any]:
    """OpenAI's usage plus what no reference server reports: timings (llama.cpp's names), energy and cost, for the
    jobs (``JobStats``) of one request; ``prompt`` counts each distinct prompt once (n choices share one)."""
    completion = sum(s.completion_tokens for s in stats)
    decode_s = max((s.decode_s for s in stats), default=0.0)
    prefill_s = max((s.prefill_s for s in stats), default=0.0)
    joules = sum(s.joules for s in stats)
    machine_s = sum(s.machine_s for s in stats)
    first = [s.first_token_s for s in stats if s.first_token_s is not None]
    list_price = (prompt * prices.input_per_million + completion * prices.output_per_million) / 1e6
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "timings": {
            "queue_ms": 1e3 * max((s.queue_s for s in stats), default=0.0),
            "prompt_n": prompt,
            "prompt_ms": 1e3 * prefill_s,
            "predicted_n": completion,
            "predicted_ms": 1e3 * decode_s,
            "predicted_per_second": completion / decode_s if decode_s > 0 else None,
            "time_to_first_token_ms": 1e3 * min(first) if first else None,
        },
        "energy": {"joules": joules, "method": energy["method"], "source": energy["source"]},
        "cost": {
            "usd_at_list_price": list_price,
            "price_per_million_input": prices.input_per_million,
            "price_per_million_output": prices.output_per_million,
            "usd_machine_time": machine_s / 3600 * prices.machine_per_hour,
            "machine_seconds": machine_s,
            "machine_price_per_hour": prices.machine_per_hour,
        },
    }


def sse(obj: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line (\\n only: browsers' parsers split on \\n\\n)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
