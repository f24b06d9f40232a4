"""Text from a checkpoint: load it, encode the prompt with the checkpoint's tokenizer, generate, decode."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.model.generate import generate
from nanoseek.schema import require_int
from nanoseek.train.bounds import check_generation_memory
from nanoseek.train.load import load_model


def sample_text(
    ckpt: str | Path,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int = 0,
    num_samples: int = 1,
    use_cache: bool = True,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (the prompt included). Temperature 0 is greedy. The prompt and
    the new tokens must fit the model's context (``seq_len``); longer requests are an error naming the limit."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # bytes that are not UTF-8 reach Python's argv as lone surrogates
        raise ValueError(f"--prompt is not valid UTF-8 text (at character {err.start}); pass UTF-8") from None
    loaded = load_model(ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n")  # an empty prompt starts at a line break
    room = model.cfg.seq_len - len(ids)
    if room < 1:
        raise ValueError(f"--prompt is {len(ids)} tokens; the model's context is seq_len={model.cfg.seq_len}")
    if max_new_tokens > room:
        raise ValueError(
            f"--max-new-tokens={max_new_tokens} does not fit: the prompt takes {len(ids)} of the model's "
            f"seq_len={model.cfg.seq_len} tokens, so at most {room} new tokens are possible"
        )
    require_int("--num-samples", num_samples, 1)
    check_generation_memory(model.cfg, num_samples, len(ids) + max_new_tokens, "--num-samples")
    generator = torch.Generator().manual_seed(seed)
    out = generate(
        model,
        [ids] * num_samples,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
        use_cache=use_cache,
    )
    return [tokenizer.decode(ids + completion) for completion in out.completions()]
