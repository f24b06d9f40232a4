"""Batched sampling from the language model with the KV cache.

Prompts of different lengths are left-padded into one batch (``pad_mask`` hides the padding; rotary embeddings are
relative, so this is exact), prefilled in one forward pass, then decoded one token per step for every row at once.
A row ends at the end-of-text token or when its text contains a stop string; generation ends when every row has
ended or after ``max_new_tokens``. Randomness comes only from the ``torch.Generator`` passed in, and each step
draws the same amount of it whatever the logits, so cached and uncached decoding give the same tokens.

Sampling follows the usual order: divide logits by the temperature, keep the top-k, keep the top-p nucleus,
renormalise, draw (by the exponential-race form of the Gumbel-max trick). Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanoseek.inductor import prepare_in_background
from nanoseek.model.ahead import ahead_of_time_step
from nanoseek.model.attention import KVCache
from nanoseek.schema import require


@dataclass
class Generation:
    """Output of ``generate`` for B prompts and T ≤ max_new_tokens decoding steps."""

    tokens: torch.Tensor
    """(B, T) sampled token ids; ``pad_id`` after a row has ended."""
    mask: torch.Tensor
    """(B, T) bool: True for tokens of the completion, including the end-of-text token or the token that completed a
    stop string."""
    logprobs: torch.Tensor
    """(B, T) float32: log-probability of each token under the distribution it was drawn from — the temperature,
    top-k and top-p are applied (renormalised). For greedy decoding, where that distribution is a point mass, it is
    the untempered model log-probability log_softmax(logits). 0 where ``mask`` is False."""
    finished: torch.Tensor
    """(B,) bool: the row ended by end-of-text or a stop string (False: it ran out of max_new_tokens)."""

    def completions(self) -> list[list[int]]:
        """Each row's completion tokens, without padding."""
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask, strict=True)]


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (B, V) -> (tokens (B,), log-probabilities (B,)) as described in Generation.logprobs. ``generator``
    may be one generator per row (a server's requests, each seeded): row i then draws from generator[i] exactly
    what it would draw sampled alone."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    # shifted so that the largest logit is 0 before dividing: a tiny temperature then sends the others to -inf (a
    # greedy choice) instead of overflowing the largest to inf (and the softmax to NaN)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False  # the most probable token always stays (a top_p that rounds to 0 would drop them all)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    logp = torch.log_softmax(logits, -1)  # (B, V)
    # argmax of p / E with E ~ Exp(1) i.i.d. is a sample from p; one draw per vocabulary entry and row, always
    if isinstance(generator, Sequence) and len(generator) > 1:
        race = torch.stack([torch.empty_like(logp[0]).exponential_(generator=g) for g in generator])
    else:  # one generator for every row (a list of one draws the same as the stack would)
        g = generator[0] if isinstance(generator, Sequence) else generator
        race = torch.empty_like(logp).exponential_(generator=g)
    tokens = (logp.exp() / race).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def autocast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module | None:
    """A frozen eval-mode copy of ``model`` whose matmul weights (``autocast_weight_names``) are stored in ``dtype``:
    under autocast to ``dtype`` it computes what the model computes (tested), and a compiled decode step over it
    reads those weights at half the bytes instead of casting them for every token. Its values follow the model's
    with ``copy.load_state_dict(model.state_dict())`` (cast on the way). None for a model that does not say which
    of its weights are matmul-only."""
    if not hasattr(model, "autocast_weight_names"):
        return None
    clone = copy.deepcopy(model).requires_grad_(False).eval()
    for name in model.autocast_weight_names():
        weight = clone.get_parameter(name)
        weight.data = weight.data.to(dtype)
    return clone


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# on CPU a compiled decode runs the step compiled ahead of time (nanoseek/model/ahead.py: the same generated C++ called
# without torch.compile's per-call Python, ≈ 0.6 of the step's time); torch.compile's for MoE models and elsewhere
AHEAD_OF_TIME = True


def compiled_decode_step(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``model.decode_step`` under torch.compile, compiled on first use and kept for the model's lifetime. A new
    batch size compiles once more (then the batch dimension is symbolic); positions never do. Its kernels are called
    from inductor's generated C++ instead of Python, which spent ≈ 0.2 ms of a ≈ 1.2 ms batch-1 step making tensor
    views and checking sizes between them (docs/LOG.md)."""
    return _compiled(model, "decode_step", cpp_wrapper=True)


def compiled_prefill_step(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``model.prefill_step`` under torch.compile, kept like ``compiled_decode_step``."""
    return _compiled(model, "prefill_step")


def _guard_filter(entries: list) -> list[bool]:
    """Which of dynamo's guards to keep: none on the attributes of torch's own modules (Linear, RMSNorm, ...), whose
    re-checking before every step cost a third of the step, but every check on a tensor (dtype, shape, device):
    a model of the same shape with its weights in another dtype must compile its own graph, not reuse this one."""
    keep = torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe(entries)
    return [k or e.guard_type == "TENSOR_MATCH" for k, e in zip(keep, entries, strict=True)]


def _compiled(model: torch.nn.Module, method: str, cpp_wrapper: bool = False) -> Callable[..., torch.Tensor]:
    steps = _COMPILED.setdefault(model, {})
    if method not in steps:
        # parameters stay graph inputs, so updated weights are still seen
        options: dict = {"guard_filter_fn": _guard_filter}
        device = next(model.parameters()).device.type
        if device == "cpu" and cpp_wrapper:
            # the kernels built and cached on their own, as for the Python caller: built into one library with the
            # caller, a cold compile took ≈ 10 % longer; the speed is the same either way (docs/LOG.md)
            options.update(cpp_wrapper=True, cpp_wrapper_build_separate=True)
        steps[method] = torch.compile(getattr(model, method), options=options)
        prepare_in_background(device)  # inductor's once-per-process CPU probes, overlapping the first trace
    return steps[method]


def prefill(
    model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor, pad_mask: torch.Tensor, compile: bool = False
) -> torch.Tensor:
    """Left-padded prompts tokens, pad_mask (B, T) into ``cache`` -> the last column's logits (B, V); ``cache.pos``
    advances by T. Eager: the model's forward with the cache. ``compile``: the compiled ``prefill_step`` (the cache
    must be empty), whose keys and values are written here."""
    if not compile:
        return model(tokens, cache=cache, pad_mask=pad_mask)[:, -1]
    c, t = cache, tokens.shape[1]
    if c.pos != 0 or t > c.max_len:
        raise ValueError(f"a compiled prefill needs an empty cache of >= {t} slots (pos={c.pos}, max_len={c.max_len})")
    for x in (tokens, pad_mask):
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(x, 1)
    position = torch.tensor(c.offset, device=tokens.device)
    logits, k, v = compiled_prefill_step(model)(tokens, pad_mask, position)
    c.k[:, :, :, :t], c.v[:, :, :, :t], c.valid[:, :t] = k, v, pad_mask
    c.pos = t
    return logits


def decode_next(model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """One decode step: tokens (B,) follow the cached positions -> the next logits (B, V); ``cache.pos`` advances by
    one. Eager: the model's forward with the cache. ``compile``: the compiled step over the filled slots, which
    reads the cache and returns the new keys and values, written here — on CPU the step compiled ahead of time
    (``ahead.ahead_of_time_step``, under the caller's autocast if any), else torch.compile's."""
    if not compile:
        return model(tokens[:, None], cache=cache)[:, -1]
    c = cache
    if c.pos >= c.max_len:
        raise ValueError(f"KV cache is full: {c.pos + 1} positions needed, max_len={c.max_len}")
    position = torch.tensor(c.pos + c.offset, device=c.k.device)
    ahead = ahead_of_time_step(model) if AHEAD_OF_TIME else None
    if ahead is not None:
        logits = ahead(tokens, c, position)  # writes the new keys and values itself
    else:
        window = (c.k[:, :, :, : c.pos], c.v[:, :, :, : c.pos], c.valid[:, : c.pos])  # the filled slots only
        for t in window:
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2 if t.dim() > 2 else 1)
        tokens = tokens.contiguous()
        torch._dynamo.maybe_mark_dynamic(tokens, 0)
        slot = torch.tensor(c.pos, device=c.k.device)
        logits, k, v = compiled_decode_step(model)(tokens, *window, slot, position)
        c.k[:, :, :, c.pos : c.pos + 1] = k
        c.v[:, :, :, c.pos : c.pos + 1] = v
    c.pos += 1
    return logits


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    stop: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    share_prompts: bool = True,
    compile: bool = False,
    compile_prefill: bool | None = None,
    pad_id: int = 0,
) -> Generation:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    ``stop`` strings need ``decode`` (token ids -> text); a row ends with the token whose decoded text completes a
    stop string (the tail of the last len(stop) tokens is checked, which assumes every token decodes to at least one
    byte, true of byte and byte-level BPE tokenizers). ``top_k=0`` and ``top_p=1`` disable those filters.
    A prompt plus ``max_new_tokens`` longer than the model's ``seq_len`` is an error (positions beyond it were never
    trained). ``use_cache=False`` recomputes the whole sequence every step: slow, kept as the reference the cached
    path is tested against. With ``share_prompts`` (and the cache), identical prompts — a GRPO group's G copies —
    are prefilled once and their cache rows copied to every row that repeats them; the tokens are the same as
    without it (tested). ``compile`` decodes with the compiled step (``Transformer.decode_step``; on CPU compiled
    ahead of time, nanoseek/model/ahead.py, else by torch.compile): the first call compiles (tens of seconds; once
    built, under a second ahead of time and seconds with torch.compile), later ones — any prompt length, budget or
    batch size — reuse it and decode two to three times as fast as eager PyTorch, whose per-operation overhead
    dominates a small model's step.
    ``compile_prefill`` (default: ``compile``) says whether the prompts' prefill runs compiled too: a caller that
    prefills a few short prompts once per batch (GRPO) passes False, since that graph takes tens of seconds to
    compile on a cold cache (27 s for GRPO's benchmark model) and would save milliseconds per batch."""
    require(len(prompts) > 0 and all(len(p) > 0 for p in prompts), "prompts", "…", "expected non-empty token lists")
    require(isinstance(max_new_tokens, int) and max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "expected >= 1")
    require(temperature >= 0, "temperature", temperature, "expected >= 0 (0 is greedy)")
    require(isinstance(top_k, int) and top_k >= 0, "top_k", top_k, "expected an integer >= 0 (0 disables it)")
    require(0 < top_p <= 1, "top_p", top_p, "expected a number in (0, 1] (1 disables it)")
    require(not stop or decode is not None, "stop", stop, "stop strings need a decode function")
    longest, seq_len = max(len(p) for p in prompts), model.cfg.seq_len
    require(
        longest + max_new_tokens <= seq_len,
        "max_new_tokens",
        max_new_tokens,
        f"a prompt of {longest} tokens plus max_new_tokens must fit the model's seq_len={seq_len}",
    )
    device = next(model.parameters()).device
    b = len(prompts)
    seq = torch.full((b, longest), pad_id, dtype=torch.long, device=device)  # left-padded prompts
    pad_mask = torch.zeros(b, longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        pad_mask[i, longest - len(p) :] = True

    dtype = next(model.parameters()).dtype
    cache = None
    compile_prefill = compile if compile_prefill is None else compile_prefill
    if use_cache:
        distinct: dict[tuple[int, ...], int] = {}  # each distinct prompt -> its index among the distinct ones
        rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts] if share_prompts else []
        if share_prompts and len(distinct) < b:  # prefill every distinct prompt once, then copy its cache rows
            first = torch.tensor([rows.index(i) for i in range(len(distinct))], device=device)
            cache = KVCache(model.cfg, len(distinct), longest + max_new_tokens, device, dtype)
            logits = prefill(model, cache, seq[first], pad_mask[first], compile_prefill)
            expand = torch.tensor(rows, device=device)
            logits = logits[expand]  # (B, V)
            cache.k, cache.v, cache.valid = cache.k[:, expand], cache.v[:, expand], cache.valid[expand]
        else:
            cache = KVCache(model.cfg, b, longest + max_new_tokens, device, dtype)
            logits = prefill(model, cache, seq, pad_mask, compile_prefill)  # (B, V)
    else:
        logits = model(seq, pad_mask=pad_mask)[:, -1]
    # each step's (B,) tokens, log-probabilities and live rows, stacked once at the end; rows are padded only after one
    # has ended, and endings checked only when there is something to end on: writing into (B, T) tensors step by step
    # and padding and checking regardless were a dozen small operations a token, ≈ 10 % of batch-1 decoding (LOG.md)
    picked: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    alive: list[torch.Tensor | None] = []  # None: every row was live at that step
    done = torch.zeros(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    window = max((len(s.encode()) for s in stop), default=0)
    any_done = False  # no row has ended yet, so no token needs padding
    for t in range(max_new_tokens):
        nxt, lp = sample_next(logits, temperature, top_k, top_p, generator)
        live = None
        if any_done:
            live = ~done
            nxt, lp = torch.where(live, nxt, pad_id), torch.where(live, lp, 0.0)
        picked.append(nxt)
        scores.append(lp)
        alive.append(live)
        if eos_id is not None or window:
            ended = nxt == eos_id if eos_id is not None else torch.zeros_like(done)
            if live is not None:
                ended &= live
            if window:
                recent = torch.stack(picked[-window:], 1)
                for i in live.nonzero().flatten().tolist() if live is not None else range(b):
                    ended[i] |= any(s in decode(recent[i].tolist()) for s in stop)
            if bool(ended.any()):
                any_done = True
                finished |= ended
                done |= ended
                if bool(done.all()):
                    break
        if t + 1 == max_new_tokens:
            break
        if cache is not None:
            logits = decode_next(model, cache, nxt, compile)
        else:
            full = torch.cat([seq, torch.stack(picked, 1)], dim=1)
            full_mask = torch.cat([pad_mask, torch.ones(b, t + 1, dtype=torch.bool, device=device)], dim=1)
            logits = model(full, pad_mask=full_mask)[:, -1]
    every = torch.ones(b, dtype=torch.bool, device=device)
    mask = torch.stack([every if live is None else live for live in alive], 1)
    logprobs = torch.stack(scores, 1).to(torch.get_default_dtype())
    return Generation(torch.stack(picked, 1), mask, logprobs, finished)
