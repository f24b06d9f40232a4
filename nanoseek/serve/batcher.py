"""Continuous batching: one worker thread owns the model and decodes every running sequence together.

Requests never run on the event loop. ``Batcher.submit`` puts jobs (one per choice of a request) on a bounded
queue (``QueueFull`` past ``max_queue`` waiting jobs: the server answers 429). Between two decode steps the worker

1. drops cancelled jobs (a client that went away stops costing anything within one step),
2. admits waiting jobs up to ``max_batch`` running ones: their prompts are prefilled together into slots at the
   right end of the running batch's KV cache, so every row's last token sits in the same slot,
3. samples one token per row (each job with its own settings and its own seeded ``torch.Generator``, so a seed
   gives the same text whoever else is in the batch, up to float rounding of batched matmuls),
4. hands each job its new text (``reasoning.TextStream``: whole characters, never a stop string) and finishes
   the jobs that met a stop string or their token budget,
5. runs one forward pass of one token for all remaining rows.

Rows join and leave a running batch, so the cache (preallocated for ``max_batch`` rows, see ``RunningBatch``) is
left-padded per row (``KVCache.valid``) and its slots are moved when needed: a prompt longer than the filled part
shifts every row right, and columns that no row uses any more are trimmed from the left. Rotary embeddings are
relative, so moving slots is exact as long as each key keeps its position: ``KVCache.offset`` (the position of
slot 0) moves with them. With ``compile``, prefills and decode steps run the torch.compile'd
``Transformer.prefill_step`` and ``decode_step`` (``warm_up`` compiles them before serving).

Each job's energy and machine time are its share of every forward pass it was part of (a pass's joules and seconds
divided equally among its rows); prefill and decode wall times are what the job waited for.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoseek.model.attention import KVCache
from nanoseek.model.generate import decode_next, prefill, sample_next
from nanoseek.serve.reasoning import TextStream


class QueueFull(Exception):
    """More jobs are waiting than the queue holds."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new jobs."""


class NeverFits(Exception):
    """A request has more jobs than the batcher ever holds at once (the server answers 400: retrying cannot help)."""


@dataclass(frozen=True)
class Sampling:
    """How one sequence is sampled (validated by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class JobStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    """Submitted -> prefill started."""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    """Wall time of the decode steps this job took part in."""
    first_token_s: float | None = None
    """Submitted -> first non-empty text."""
    joules: float = 0.0
    machine_s: float = 0.0
    """This job's share of the forward passes' wall time (what the machine spent on it)."""


@dataclass(eq=False)
class Job:
    """One sequence to generate. ``emit(kind, value)`` is called from the worker thread with ("text", str),
    then ("done", finish_reason) — "stop" or "length" — or ("error", message); after it, ``stats`` is final."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[str, object], None]
    stats: JobStats = field(default_factory=JobStats)
    tokens_after_cancel: int | None = None
    """Tokens generated between ``cancel()`` and the worker dropping the job (the tests check it is ≤ 1)."""
    on_cancel: Callable[[], None] | None = None
    """Called by ``cancel()`` (a job relayed to another process passes the cancel on)."""

    def __post_init__(self) -> None:
        seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.stats.prompt_tokens = len(self.prompt)
        self._tokens_at_cancel = 0
        self.text: TextStream | None = None

    def cancel(self) -> None:
        self._tokens_at_cancel = self.stats.completion_tokens
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()


def check_capacity(jobs: list[Job], capacity: int, why: str) -> None:
    if len(jobs) > capacity:
        raise NeverFits(f"this request needs {len(jobs)} sequences at once (prompts × n) and this server takes at "
                        f"most {capacity} ({why}); send fewer prompts or a smaller n")  # fmt: skip


def check_fits(jobs: list[Job], seq_len: int) -> None:
    for job in jobs:
        if len(job.prompt) + job.sampling.max_tokens > seq_len:
            raise ValueError(f"prompt + max_tokens exceed the context of {seq_len} tokens")


class RunningBatch:
    """The rows being decoded: a KV cache preallocated for ``rows`` rows of ``capacity`` slots, of which the first
    ``len(self)`` are in use (``cache`` views them), and the logits of their next token (B, V).

    Nothing the size of the whole cache is allocated or copied when rows come and go: a joining prompt is
    prefilled into a cache of its own length and copied into the next free rows, and a row that leaves is replaced
    by the last row (one row's filled slots copied). A decode step reads every filled slot, and its time grows with
    them (16 rows of the demo model: 2.0 ms at 20 slots, 3.5 ms at 80, 5.2 ms at 250), so once the oldest rows have
    left ``trim`` unused slots at the left, the rest are moved left: the window stays close to the longest row."""

    def __init__(self, model: torch.nn.Module, capacity: int, rows: int, compile: bool = False):
        self.model, self.compile = model, compile
        self.trim = max(1, capacity // 8)
        self.starts: list[int] = []  # each row's first slot (its prompt's first token)
        param = next(model.parameters())
        self.cache = KVCache(model.cfg, rows, capacity, param.device, param.dtype)
        self._k, self._v, self._valid = self.cache.k, self.cache.v, self.cache.valid  # the whole buffers
        self.logits: torch.Tensor | None = None
        self._use(0)

    def __len__(self) -> int:
        return self.cache.k.shape[1]

    def _use(self, n: int) -> None:
        """The cache shows the first n rows."""
        c = self.cache
        c.k, c.v, c.valid = self._k[:, :n], self._v[:, :n], self._valid[:n]

    def add(self, prompts: list[list[int]]) -> None:
        """Prefill new rows so that their last prompt token lands in the running rows' last slot."""
        n, m, p, c = len(self), len(prompts), max(len(x) for x in prompts), self.cache
        if self.compile:
            p = max(p, 2)  # a padding column rather than a graph of its own: torch.compile specialises length 1
        if n + m > self._k.shape[1]:
            raise ValueError(f"{n + m} rows do not fit a batch of {self._k.shape[1]}")
        if n == 0:
            c.pos, c.offset = p, 0
        elif p > c.pos:  # the new prompt needs p slots left of pos: trim, then shift every row right by the lack
            self._move(c.pos, p - (c.pos - min(self.starts)))
        start = c.pos - p
        self.starts = (self.starts if n else []) + [c.pos - len(x) for x in prompts]
        new = KVCache(self.model.cfg, m, p, self._k.device, self._k.dtype)
        new.offset = c.offset + start  # each key's rotary position is the one its slot in the batch has
        seq = torch.zeros(m, p, dtype=torch.long)
        pad = torch.zeros(m, p, dtype=torch.bool)
        for i, x in enumerate(prompts):
            seq[i, p - len(x) :], pad[i, p - len(x) :] = torch.tensor(x), True
        logits = prefill(self.model, new, seq.to(new.k.device), pad.to(new.k.device), self.compile).float()
        rows = slice(n, n + m)
        for buf, part in ((self._k, new.k), (self._v, new.v)):
            buf[:, rows, :, :start] = 0
            buf[:, rows, :, start : c.pos] = part
        self._valid[rows, :start] = False
        self._valid[rows, start : c.pos] = new.valid
        self._valid[rows, c.pos :] = True
        self._use(n + m)
        self.logits = logits if n == 0 else torch.cat((self.logits, logits), dim=0)

    def leave(self, rows: set[int]) -> list[int]:
        """These rows leave (finished or cancelled); the rows after them fill their places, last first, so a row
        leaving costs one row's copy. Returns the old index of each row in the new order."""
        n = len(self)
        m = n - len(rows)
        holes = [i for i in sorted(rows) if i < m]
        movers = [i for i in range(m, n) if i not in rows][::-1]
        order = list(range(m))
        pos = self.cache.pos
        for hole, row in zip(holes, movers, strict=True):
            self._k[:, hole, :, :pos] = self._k[:, row, :, :pos]
            self._v[:, hole, :, :pos] = self._v[:, row, :, :pos]
            self._valid[hole] = self._valid[row]
            order[hole] = row
        self.starts = [self.starts[i] for i in order]
        self._use(m)
        self.logits = self.logits[order] if m else None
        return order

    def step(self, tokens: torch.Tensor) -> None:
        """One token per row, tokens (B,) -> the next logits."""
        c = self.cache
        if c.pos + 1 > c.max_len or min(self.starts) >= self.trim:
            self._move(c.pos, 0)
        self.logits = decode_next(self.model, c, tokens.to(c.k.device), self.compile).float()

    def _move(self, pos: int, shift: int) -> None:
        """Trim columns no row uses from the left, then shift every row ``shift`` slots right; keys keep their
        rotary positions through ``offset``."""
        c = self.cache
        start = min(self.starts)
        length = pos - start
        if length + shift > c.max_len:
            raise RuntimeError(f"KV cache of {c.max_len} slots cannot hold {length + shift}")
        for t in (c.k, c.v):
            t[:, :, :, shift : shift + length] = t[:, :, :, start:pos].clone()  # source and target may overlap
            t[:, :, :, :shift] = 0
        c.valid[:, shift : shift + length] = c.valid[:, start:pos].clone()
        c.valid[:, :shift] = False
        c.valid[:, shift + length :] = True
        c.pos, c.offset = shift + length, c.offset + start - shift
        self.starts = [s - start + shift for s in self.starts]


class Batcher:
    """The generation worker. ``meter`` is an energy meter (``read()`` -> cumulative joules) or None."""

    def __init__(
        self,
        model: torch.nn.Module,
        decode: Callable[[list[int]], str],
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        compile: bool = False,
        meter=None,
        log: Callable[[str], None] = print,
    ):
        self.model, self.decode, self.meter, self.log = model, decode, meter, log
        self.max_batch, self.max_queue, self.compile = max_batch, max_queue, compile
        self.seq_len = model.cfg.seq_len
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.batch = RunningBatch(model, 2 * self.seq_len, max_batch, compile)
        self.wake = threading.Condition()
        self.step_lock = threading.Lock()  # held for every step: tests hold it to freeze generation
        self.stopping = False
        self.failed: str | None = None  # a thread's worker survives its errors; a generation process may not
        self.steps = 0
        self.tokens = 0
        self.ended: collections.deque[Job] = collections.deque(maxlen=256)  # recent finished or cancelled jobs
        self.thread = threading.Thread(target=self._run, name="nanoseek-generate", daemon=True)

    def start(self) -> Batcher:
        self.thread.start()
        return self

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request together, or none of them."""
        check_fits(jobs, self.seq_len)
        check_capacity(jobs, self.max_queue, f"the queue holds {self.max_queue}")
        with self.wake:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            waiting = sum(not j.cancelled.is_set() for j in self.waiting)  # the worker ends the cancelled ones
            if waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (the queue holds {self.max_queue})")
            self.waiting.extend(jobs)
            self.wake.notify()

    def load(self) -> tuple[int, int]:
        """(waiting jobs, running jobs)."""
        return len(self.waiting), len(self.running)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; jobs still queued or running end with an error event."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)
        for job in list(self.waiting) + self.running:
            job.emit("error", "the server shut down before this request finished")
        self.waiting.clear()
        self.running = []

    # -----------------------------------------------------------------------------------------------------------------
    # The worker

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.running:
                    self.wake.wait()
                if self.stopping:
                    return
            try:
                with self.step_lock:
                    self._step()
            except Exception as err:  # a bug must not take the server down: fail the batch, keep serving
                self.log(f"nanoseek serve: generation failed: {type(err).__name__}: {err}")
                for job in self.running:
                    job.emit("error", f"generation failed: {type(err).__name__}")
                self.running, self.batch = [], RunningBatch(self.model, 2 * self.seq_len, self.max_batch, self.compile)
            self.after_step()

    def after_step(self) -> None:
        """Called on the worker thread after every step (a relay to another process sends the step's events)."""

    def _step(self) -> None:
        self._drop([j for j in self.running if j.cancelled.is_set()])
        self._end_cancelled_waiting()
        with self.wake:
            new = []
            while self.waiting and len(self.running) + len(new) < self.max_batch:
                new.append(self.waiting.popleft())
        if new:
            self._prefill(new)
        if not self.running:
            return
        tokens = self._sample()
        finished: dict[int, str] = {}
        for i, (job, token) in enumerate(zip(self.running, tokens.tolist(), strict=True)):
            job.stats.completion_tokens += 1
            text = job.text.push(token)
            if text:
                if job.stats.first_token_s is None:
                    job.stats.first_token_s = time.perf_counter() - job.submitted
                job.emit("text", text)
            if job.text.stopped:
                finished[i] = "stop"
            elif job.stats.completion_tokens >= job.sampling.max_tokens:
                finished[i] = "length"
        self.tokens += len(self.running)
        for i, reason in finished.items():
            job = self.running[i]
            rest = job.text.flush()
            if rest:
                job.emit("text", rest)
            job.emit("done", reason)
            self.ended.append(job)
        rows = self.batch.leave(set(finished))
        self.running = [self.running[i] for i in rows]
        if self.running:
            self._forward(self.running, lambda: self.batch.step(tokens[rows]), "decode_s")
            self.steps += 1

    def _sample(self) -> torch.Tensor:
        """One token per running row. Rows with the same temperature, top-k and top-p are sampled together, each
        from its own job's generator (the same draw as alone: a seed's text does not depend on the batch)."""
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, job in enumerate(self.running):
            s = job.sampling
            groups[(s.temperature, s.top_k, s.top_p)].append(i)
        if len(groups) == 1:  # the usual case: no gathering and scattering of rows
            (temperature, top_k, top_p), rows = next(iter(groups.items()))
            generators = [job.generator for job in self.running]
            return sample_next(self.batch.logits, temperature, top_k, top_p, generators)[0]
        tokens = torch.empty(len(self.running), dtype=torch.long)
        for (temperature, top_k, top_p), rows in groups.items():
            index = torch.tensor(rows)
            generators = [self.running[i].generator for i in rows]
            tokens[index] = sample_next(self.batch.logits[index], temperature, top_k, top_p, generators)[0]
        return tokens

    def warm_up(self) -> None:
        """Compile the prefill and decode steps before serving (batch 1, then any batch size: torch specialises
        sizes 0 and 1): the first requests would otherwise wait for it."""
        if not self.compile:
            return
        for rows in (1, 2, 3):  # batch sizes, prompt and cache lengths then vary without compiling again
            batch = RunningBatch(self.model, 2 * self.seq_len, self.max_batch, True)  # the serving cache's strides
            with torch.no_grad():
                batch.add([[0] * (rows + 1)] * rows)
                for _ in range(3):
                    batch.step(torch.zeros(rows, dtype=torch.long))

    def _prefill(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.stats.queue_s = now - job.submitted
            job.text = TextStream(self.decode, job.sampling.stop)
        self.running.extend(jobs)  # before the forward pass: if it fails, these jobs get the error too
        self._forward(jobs, lambda: self.batch.add([j.prompt for j in jobs]), "prefill_s")

    def _forward(self, jobs: list[Job], run: Callable[[], None], timing: str) -> None:
        """Run a forward pass and share its seconds and joules among ``jobs``."""
        j0, t0 = self._joules(), time.perf_counter()
        run()
        dt, dj = time.perf_counter() - t0, self._joules() - j0
        for job in jobs:
            setattr(job.stats, timing, getattr(job.stats, timing) + dt)
            job.stats.machine_s += dt / len(jobs)
            job.stats.joules += dj / len(jobs)

    def _drop(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        for job in jobs:
            job.tokens_after_cancel = job.stats.completion_tokens - job._tokens_at_cancel
            job.emit("done", "cancelled")
            self.ended.append(job)
        rows = self.batch.leave({i for i, j in enumerate(self.running) if j in jobs})
        self.running = [self.running[i] for i in rows]

    def _end_cancelled_waiting(self) -> None:
        """Take the cancelled jobs out of the queue and end them ("done", "cancelled") as a running job's cancel
        ends: its request then finishes and, relayed from a generation process, frees its place there too. On the
        worker thread only (a relayed job's events are collected there)."""
        with self.wake:
            cancelled = [j for j in self.waiting if j.cancelled.is_set()]
            if cancelled:
                self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
        for job in cancelled:
            job.tokens_after_cancel = 0
            job.emit("done", "cancelled")
            self.ended.append(job)

    def _joules(self) -> float:
        return self.meter.read() if self.meter is not None else 0.0


def compile_steps(batcher: Batcher, log: Callable[[str], None]) -> None:
    """``batcher.warm_up()``, or, when compiling fails (no C++ compiler, an unsupported device, ...), decode eagerly
    and say why: a server that is slower beats one that does not start."""
    t0 = time.perf_counter()
    try:
        batcher.warm_up()
    except Exception as err:  # noqa: BLE001 - any compile failure: explained, then served eagerly
        batcher.compile = batcher.batch.compile = False
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log(f"nanoseek serve: warning: could not compile the prefill and decode steps ({type(err).__name__}: "
            f"{first}); decoding eagerly (start with --no-compile to skip the attempt)")  # fmt: skip
        return
    log(f"nanoseek serve: prefill and decode steps compiled in {time.perf_counter() - t0:.0f} s")
