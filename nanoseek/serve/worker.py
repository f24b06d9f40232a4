"""Generation in a process of its own: the batcher (batcher.py) runs in a child process, and the server's process
keeps only the HTTP side.

With the batcher on a thread of the server's process, the generation thread and the event loop share one Python
interpreter lock: at 16 streaming clients the event loop's ≈ 180 µs of Python per streamed chunk (Starlette,
JSON, h11) sat between the worker's decode steps, and the server delivered about 55 % of the batcher's own
16-row throughput (docs/LOG.md). In a child process the decode steps hold an interpreter of their own, and the
two sides run on two cores.

``ProcessBatcher`` has the batcher's interface (``submit``, ``load``, ``stop``, ``ended``). The child loads the
model itself (``load`` is pickled: a ``functools.partial(load_model, ...)``, not a lambda), compiles its steps
when asked, and answers with one message per decode step holding every job's events and statistics. A cancel is
passed on at once, so a client that goes away still stops costing anything within one decode step. The child
ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): the server decides when generation stops,
and the child also ends when the server's process is gone (its pipe closes). Timestamps cross over unchanged:
``time.perf_counter`` is the system's monotonic clock, the same in both processes.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable

import torch

from nanoseek.serve.batcher import (
    Batcher,
    Job,
    JobStats,
    NeverFits,
    QueueFull,
    ShuttingDown,
    check_capacity,
    check_fits,
    compile_steps,
)


class ProcessBatcher:
    """The batcher in a child process. ``load()`` returns the model (``nanoseek.train.load.LoadedModel``), run in
    the child; ``meter`` (an energy meter, pickled to the child) is read there, where the work is done.

    The queue bound is the batcher's: at most ``max_batch`` jobs run and ``max_queue`` wait; the count is kept on
    this side (jobs submitted and not yet ended), so ``QueueFull`` is raised at once."""

    def __init__(
        self,
        load: Callable,
        seq_len: int,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        compile: bool = False,
        meter=None,
        log: Callable[[str], None] = print,
        start_timeout: float = 600.0,
    ):
        for what, obj in (("load", load), ("meter", meter)):
            try:
                pickle.dumps(obj)
            except Exception as err:  # noqa: BLE001 - pickling raises several types; all mean the same here
                raise ValueError(
                    f"generation in a process needs a picklable {what} (a module-level function or a "
                    f"functools.partial, not a lambda or a closure; an NVML meter's handles cannot be sent either): "
                    f"{type(err).__name__}: {err}; serve with generation='thread' (--generation thread) instead"
                ) from None
        self.seq_len, self.max_batch, self.max_queue, self.log = seq_len, max_batch, max_queue, log
        self.jobs: dict[int, Job] = {}
        self.ended: collections.deque[Job] = collections.deque(maxlen=256)  # recent finished or cancelled jobs
        self.lock = threading.Lock()  # guards jobs, the next id, the pipe's sending end and the state below
        self.next_id = 0
        self.stopping = False
        self.failed: str | None = None
        """Why generation can no longer run (the child exited); /health and new requests say so."""
        self.child_load, self.steps, self.tokens = (0, 0), 0, 0  # as the child last reported them
        ctx = multiprocessing.get_context("spawn")  # a fork would copy torch's threads' locks mid-flight
        self.conn, child_end = ctx.Pipe()
        settings = {"max_batch": max_batch, "max_queue": max_batch + max_queue, "compile": compile, "meter": meter,
                    "threads": torch.get_num_threads()}  # fmt: skip
        self.process = ctx.Process(target=_child_main, args=(child_end, load, settings), name="nanoseek-generate",
                                   daemon=True)  # fmt: skip
        self.process.start()
        child_end.close()
        self._wait_ready(start_timeout)
        self.reader = threading.Thread(target=self._read, name="nanoseek-generate-events", daemon=True)

    def _wait_ready(self, timeout: float) -> None:
        """Relay the child's log lines until it says it is ready; raise its error if loading failed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                self.process.kill()
                raise RuntimeError(f"the generation process did not start within {timeout:.0f} s")
            try:
                message = self.conn.recv()
            except EOFError:
                self.process.join(5)
                raise RuntimeError(f"the generation process exited while starting (exit code "
                                   f"{self.process.exitcode})") from None  # fmt: skip
            if message[0] == "log":
                self.log(message[1])
            elif message[0] == "failed":
                self.process.join(5)
                raise RuntimeError(f"the generation process could not start: {message[1]}")
            elif message[0] == "ready":
                return

    def start(self) -> ProcessBatcher:
        self.reader.start()
        return self

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request together, or none of them."""
        check_fits(jobs, self.seq_len)
        check_capacity(jobs, self.max_batch + self.max_queue, f"{self.max_batch} running and {self.max_queue} queued")
        with self.lock:
            if self.failed is not None:
                raise ShuttingDown(self.failed)
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.jobs) + len(jobs) > self.max_batch + self.max_queue:
                waiting = max(0, len(self.jobs) - self.max_batch)
                raise QueueFull(f"{waiting} requests are waiting (the queue holds {self.max_queue})")
            sent = []
            for job in jobs:
                key, self.next_id = self.next_id, self.next_id + 1
                self.jobs[key] = job
                job.on_cancel = self._canceller(key)
                sent.append((key, job.prompt, job.sampling, job.submitted))
            self._send(("submit", sent))

    def _canceller(self, key: int) -> Callable[[], None]:
        def cancel() -> None:
            with self.lock:
                if key in self.jobs and self.failed is None:
                    self._send(("cancel", key))

        return cancel

    def _send(self, message: tuple) -> None:
        """Send to the child (with ``self.lock`` held); a child that is gone is noticed by the reader."""
        with contextlib.suppress(OSError):  # BrokenPipeError included
            self.conn.send(message)

    def load(self) -> tuple[int, int]:
        """(waiting jobs, running jobs), as the child last reported them."""
        return self.child_load

    def _read(self) -> None:
        """Deliver the child's events to the jobs, in order, until it exits."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "events":
                _, events, (self.child_load, self.steps, self.tokens) = message
                for key, kind, value, stats, after_cancel in events:
                    with self.lock:
                        job = self.jobs.get(key) if kind == "text" else self.jobs.pop(key, None)
                    if job is None:  # ended on this side already (the server stopped)
                        continue
                    job.stats = JobStats(*stats)
                    if after_cancel is not None:
                        job.tokens_after_cancel = after_cancel
                    job.emit(kind, value)
                    if kind == "done":
                        self.ended.append(job)
            elif message[0] == "log":
                self.log(message[1])
        self.process.join(5)
        with self.lock:
            if not self.stopping:
                self.failed = f"the generation process exited (exit code {self.process.exitcode})"
                self.log(f"nanoseek serve: error: {self.failed}; requests get 503 from now on")
        self._end_all()

    def _end_all(self) -> None:
        """End every job still open on this side with an error event."""
        with self.lock:
            left, self.jobs = list(self.jobs.values()), {}
        for job in left:
            job.emit("error", self.failed or "the server shut down before this request finished")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child; jobs still queued or running end with an error event."""
        with self.lock:
            self.stopping = True
            self._send(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        if self.reader.is_alive():
            self.reader.join(timeout)
        else:  # never started: nobody else will end the jobs
            self._end_all()


# ---------------------------------------------------------------------------------------------------------------------
# The child


class _RelayBatcher(Batcher):
    """A batcher whose jobs' events are collected during a step and sent together after it."""

    def __init__(self, conn, send_lock: threading.Lock, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn, self.send_lock = conn, send_lock
        self.outbox: list[tuple] = []
        self.keyed: dict[int, Job] = {}  # the server's key of each job not yet ended

    def relay(self, key: int) -> Callable[[str, object], None]:
        def emit(kind: str, value) -> None:
            job = self.keyed[key]
            after = job.tokens_after_cancel if kind != "text" else None
            self.outbox.append((key, kind, value, tuple(vars(job.stats).values()), after))
            if kind != "text":
                del self.keyed[key]

        return emit

    def after_step(self) -> None:
        self.flush()

    def flush(self) -> None:
        with self.send_lock:
            events, self.outbox = self.outbox, []
            if events:
                self.conn.send(("events", events, (self.load(), self.steps, self.tokens)))


def _child_main(conn, load: Callable, settings: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(settings["threads"])  # the server process's setting (its environment is inherited too)
    sends = threading.Lock()

    def log(line: str) -> None:
        with sends:
            conn.send(("log", line))

    try:
        loaded = load()
        # the server counts running and queued jobs together and never sends more than both limits allow: the
        # child's own queue must take whatever arrives before its worker admits it
        queue = settings["max_queue"] + settings["max_batch"]
        batcher = _RelayBatcher(conn, sends, loaded.model, loaded.tokenizer.decode, max_batch=settings["max_batch"],
                                max_queue=queue, compile=settings["compile"], meter=settings["meter"],
                                log=log)  # fmt: skip
        if settings["compile"]:
            compile_steps(batcher, log)
    except Exception as err:  # noqa: BLE001 - the server reports it and keeps answering
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready",))
    batcher.start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server's process is gone
            message = ("stop",)
        if message[0] == "submit":
            jobs = []
            for key, prompt, sampling, submitted in message[1]:
                job = Job(prompt, sampling, batcher.relay(key))
                job.submitted = submitted
                batcher.keyed[key] = job
                jobs.append(job)
            try:
                batcher.submit(jobs)
            except (QueueFull, NeverFits, ShuttingDown, ValueError) as err:  # checked by the server; report, never hang
                for job in jobs:
                    job.emit("error", str(err))
                batcher.flush()
        elif message[0] == "cancel":
            job = batcher.keyed.get(message[1])
            if job is not None:
                job.cancel()
        elif message[0] == "stop":
            batcher.stop()
            batcher.flush()
            return
