"""Continuous batching: rows joining and leaving a running batch decode exactly what they would alone."""

import dataclasses
import time

import pytest
import torch
from serving import single_thread  # noqa: F401 (autouse fixture)

from nanoseek import ModelConfig, Transformer
from nanoseek.model import generate as generate_module
from nanoseek.model.generate import generate
from nanoseek.serve.batcher import Batcher, Job, NeverFits, QueueFull, Sampling

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=40)


def letters(ids):
    return "".join(chr(65 + i % 26) for i in ids)


MHC_MOE = dict(residual="mhc", ffn="moe", n_routed_experts=4, top_k=2, moe_dispatch="loop")


@pytest.fixture(scope="module", params=[{}, MHC_MOE], ids=["plain", "mhc-moe"])
def model(request):
    torch.manual_seed(0)
    # float64: batched and single rows agree to the last bit of the argmax
    return Transformer(dataclasses.replace(CFG, **request.param)).double().eval()


def job(prompt, max_tokens, events, **kw):
    return Job(prompt, Sampling(max_tokens, temperature=0.0, **kw), lambda kind, v: events.append((kind, v)))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
@torch.no_grad()
def test_rows_joining_at_different_steps_decode_as_they_would_alone(model, compile, monkeypatch):
    """Prompts of different lengths join a running batch over 100+ steps: shorter ones (aligned right), a longer
    one (every row shifts right) and enough steps that unused columns are trimmed from the left. Compiled, the
    batch decodes with the compiled step (its batch size and cache length changing as rows come and go)."""
    if compile and model.cfg.residual != "plain":
        pytest.skip("the compiled step of mhc-moe is checked in test_generate.py; one compile here is enough")
    compiled_steps = []  # one per decode step run compiled, ahead of time (on CPU) or by torch.compile
    compiled_step, ahead_step = generate_module.compiled_decode_step, generate_module.ahead_of_time_step
    monkeypatch.setattr(generate_module, "compiled_decode_step", lambda m: compiled_steps.append(1) or compiled_step(m))

    def ahead(m):
        step = ahead_step(m)
        if step is not None:
            compiled_steps.append(1)
        return step

    monkeypatch.setattr(generate_module, "ahead_of_time_step", ahead)
    b = Batcher(model, letters, max_batch=4, compile=compile)
    moves = []  # (slots trimmed from the left, shift right) of every rebuild of the cache
    original = b.batch._move

    def move(pos, shift):
        used = b.batch.cache.valid[:, :pos].any(dim=0).nonzero()
        moves.append((int(used[0]) if len(used) else pos, shift))
        original(pos, shift)

    b.batch._move = move
    plan = {0: [2], 1: [20, 3], 15: [3], 30: [4, 12], 45: [5], 60: [6], 75: [3, 8], 90: [2]}  # step -> prompt lengths
    prompts, jobs = [], []
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        for n in plan.get(step, []):
            p = torch.randint(0, 64, (n,), generator=g).tolist()
            prompts.append(p)
            jobs.append(job(p, 40 - n if n > 9 else 25, []))
            b.submit([jobs[-1]])
        b._step()
        if not b.running and not b.waiting and step > max(plan):
            break
    assert any(shift > 0 for _, shift in moves) and any(trim > 0 for trim, _ in moves)
    assert bool(compiled_steps) == compile and len(compiled_steps) in (0, b.steps)
    for p, j in zip(prompts, jobs, strict=True):
        alone = generate(model, [p], j.sampling.max_tokens, temperature=0)
        assert j.text.ids == alone.tokens[0].tolist(), f"prompt of {len(p)} tokens"
        assert j.stats.completion_tokens == j.sampling.max_tokens


@torch.no_grad()
def test_a_long_prompt_joins_after_the_row_that_began_the_cache_left(model):
    """The row whose prompt filled slot 0 has left, so the filled part starts at a later slot, when a prompt longer
    than the filled part joins: the rows move right by the slots the prompt lacks after the trim (computed once
    from the position alone, which put the prompt at a negative slot and failed the batch)."""
    g = torch.Generator().manual_seed(1)
    first, short, longer = (torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 2, 10))
    b = Batcher(model, letters, max_batch=4)
    jobs = [job(first, 2, []), job(short, 20, [])]
    b.submit(jobs)
    for _ in range(3):
        b._step()
    assert len(b.running) == 1 and min(b.batch.starts) > 0 and b.batch.cache.pos < len(longer)
    jobs.append(job(longer, 15, []))
    b.submit([jobs[-1]])
    while b.running or b.waiting:
        b._step()
    for j in jobs:
        alone = generate(model, [j.prompt], j.sampling.max_tokens, temperature=0)
        assert j.text.ids == alone.tokens[0].tolist(), f"prompt of {len(j.prompt)} tokens"


@torch.no_grad()
def test_a_seed_fixes_the_sample_whoever_shares_the_batch(model):
    def run(others: int) -> list[int]:
        b = Batcher(model, letters, max_batch=8)
        j = Job([1, 2, 3], Sampling(20, temperature=1.0, seed=7), lambda *a: None)
        b.submit([j] + [Job([5] * (k + 2), Sampling(20, temperature=1.0), lambda *a: None) for k in range(others)])
        while b.running or b.waiting:
            b._step()
        return j.text.ids

    alone = run(0)
    assert run(3) == alone and run(5) == alone


@torch.no_grad()
def test_stop_strings_length_and_cancel_end_rows(model):
    free = generate(model, [[4, 5, 6]], 20, temperature=0).tokens[0].tolist()
    stop = letters(free)[5:8]
    b = Batcher(model, letters)
    events_a, events_b, events_c = [], [], []
    a, c = job([4, 5, 6], 20, events_a, stop=(stop,)), job([4, 5, 6], 20, events_c)
    short = job([4, 5, 6], 3, events_b)
    b.submit([a, short, c])
    b._step()
    b._step()
    c.cancel()
    while b.running or b.waiting:
        b._step()
    text_a = "".join(v for k, v in events_a if k == "text")
    assert events_a[-1] == ("done", "stop") and text_a == letters(free)[: letters(free).index(stop)]
    assert events_b[-1] == ("done", "length") and a.stats.completion_tokens == letters(free).index(stop) + 3
    assert events_c[-1] == ("done", "cancelled") and c.tokens_after_cancel == 0
    assert c.stats.completion_tokens == 2


def test_queue_is_bounded_and_checks_the_context(model):
    b = Batcher(model, letters, max_queue=2)
    b.submit([job([1], 5, []), job([2], 5, [])])
    with pytest.raises(QueueFull):
        b.submit([job([3], 5, [])])
    with pytest.raises(ValueError, match="context"):
        Batcher(model, letters).submit([job([1] * 30, 11, [])])


def test_a_cancelled_queued_job_ends_and_gives_back_its_place(model):
    b = Batcher(model, letters, max_batch=1, max_queue=2)
    running, queued, other = [], [], []
    b.submit([job([1, 2], 6, running)])
    b._step()  # the first job runs; the next two wait behind it (max_batch=1)
    waiting = [job([3], 6, queued), job([4], 6, other)]
    b.submit(waiting)
    with pytest.raises(QueueFull):
        b.submit([job([5], 6, [])])
    waiting[0].cancel()
    b.submit([job([6], 2, [])])  # the cancelled job's place is free at once
    b._step()
    assert queued == [("done", "cancelled")] and waiting[0].tokens_after_cancel == 0
    assert waiting[0] in b.ended and waiting[0] not in b.waiting
    while b.running or b.waiting:
        b._step()
    assert running[-1] == ("done", "length") and other[-1] == ("done", "length")


def test_more_sequences_than_the_queue_ever_holds_is_refused_for_good(model):
    b = Batcher(model, letters, max_queue=2)
    with pytest.raises(NeverFits, match="needs 3 sequences at once.*at most 2.*the queue holds 2"):
        b.submit([job([1], 2, []) for _ in range(3)])
    assert not b.waiting


@torch.no_grad()
def test_a_failing_forward_fails_its_batch_and_the_worker_keeps_serving(model):
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.cfg, self.fail = model, model.cfg, True

        def forward(self, *args, **kwargs):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return self.inner(*args, **kwargs)

    logs, first, second = [], [], []
    b = Batcher(Flaky(), letters, log=logs.append).start()
    try:
        b.submit([job([1, 2], 3, first)])
        deadline = time.monotonic() + 10
        while not first and time.monotonic() < deadline:
            time.sleep(0.01)
        b.submit([job([1, 2], 3, second)])
        while (not second or second[-1][0] != "done") and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        b.stop()
    assert first == [("error", "generation failed: RuntimeError")] and "boom" in logs[0]
    assert second[-1] == ("done", "length")
