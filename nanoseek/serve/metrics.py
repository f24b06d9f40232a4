"""Prometheus text exposition of the server's counters (written by hand: a few counters need no dependency)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, x: float) -> None:
        i = bisect.bisect_left(self.buckets, x)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum, self.n = self.sum + x, self.n + 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, c in zip(self.buckets, self.counts, strict=True):
            total += c
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    """What /metrics reports. Updated from the event loop and read there; a lock keeps it simple."""

    def __init__(self, energy_method: str):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = self.completion_tokens = self.cancelled = 0
        self.joules = 0.0
        self.energy_method = energy_method
        self.latency, self.ttft = Histogram(), Histogram()
        self.tokens_per_second = 0.0

    def count_request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] += 1

    def answered(self, usage: dict, seconds: float, cancelled: bool) -> None:
        with self.lock:
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]
            self.joules += usage["energy"]["joules"]
            self.cancelled += int(cancelled)
            self.latency.observe(seconds)
            timings = usage["timings"]
            if timings["time_to_first_token_ms"] is not None:
                self.ttft.observe(timings["time_to_first_token_ms"] / 1e3)
            if timings["predicted_per_second"]:
                self.tokens_per_second = timings["predicted_per_second"]

    def render(self, waiting: int, running: int, steps: int, generated: int) -> str:
        with self.lock:
            lines = [
                "# HELP nanoseek_requests_total HTTP requests by path and status.",
                "# TYPE nanoseek_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'nanoseek_requests_total{{path="{path}",status="{status}"}} {n}')
            scalars = [
                ("prompt_tokens_total", "counter", "Prompt tokens of answered requests.", self.prompt_tokens),
                ("completion_tokens_total", "counter", "Completion tokens answered.", self.completion_tokens),
                ("requests_cancelled_total", "counter", "Requests whose client went away.", self.cancelled),
                ("generated_tokens_total", "counter", "Tokens sampled by the generation worker.", generated),
                ("decode_steps_total", "counter", "Batched decode steps.", steps),
                ("decode_tokens_per_second", "gauge", "Decode speed of the last answered request.",
                 self.tokens_per_second),
                ("queue_waiting", "gauge", "Sequences waiting for a batch slot.", waiting),
                ("batch_running", "gauge", "Sequences being decoded.", running),
            ]  # fmt: skip
            for name, kind, doc, value in scalars:
                lines += [f"# HELP nanoseek_{name} {doc}", f"# TYPE nanoseek_{name} {kind}", f"nanoseek_{name} {value}"]
            lines += [
                f"# HELP nanoseek_energy_joules_total Joules of answered requests ({self.energy_method}).",
                "# TYPE nanoseek_energy_joules_total counter",
                f'nanoseek_energy_joules_total{{method="{self.energy_method}"}} {self.joules:.6f}',
                "# HELP nanoseek_request_duration_seconds Time from request to last token.",
                "# TYPE nanoseek_request_duration_seconds histogram",
                *self.latency.lines("nanoseek_request_duration_seconds"),
                "# HELP nanoseek_time_to_first_token_seconds Time from request to the first text.",
                "# TYPE nanoseek_time_to_first_token_seconds histogram",
                *self.ttft.lines("nanoseek_time_to_first_token_seconds"),
            ]
        return "\n".join(lines) + "\n"
