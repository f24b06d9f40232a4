"""A compiled decode step under bf16 autocast: a float32 model against ``generate.autocast_copy`` of it.

Under ``train.dtype = "bfloat16"`` GRPO samples with a copy of the policy whose matmul weights are stored in bf16
(``nanoseek.model.generate.autocast_copy``): the same tokens, but the compiled decode step reads those weights at
half the bytes instead of casting the float32 ones again for every token. This measures what that saves: the
GRPO benchmark's model (``grpo_vs_trl.py``: width 256, 4 layers, ≈ 3.2M parameters), ``--rows`` sequences (4 prompts
× 8 completions there) decoded for ``--steps`` tokens after a 24-token prompt, with the compiled prefill and decode
steps of each side (compiled before the clock starts), the two sides alternating ``--pairs`` times; medians of the
milliseconds per decode step and their ratio. The copy's tokens are checked to be the model's.

Only meaningful on a CPU with bf16 instructions (elsewhere torch emulates bf16; the script says which it is).

    python benchmarks/autocast_copy.py [--rows 32] [--steps 32] [--pairs 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import add_json_argument, load_average, require_at_least_one, row, setting_line, write_json
from grpo_vs_trl import model_config

from nanoseek import Transformer
from nanoseek.model.attention import KVCache
from nanoseek.model.generate import autocast_copy, decode_next, prefill

PROMPT = 24


def decode_ms(model: torch.nn.Module, rows: int, steps: int) -> tuple[float, torch.Tensor]:
    """Milliseconds per compiled decode step (after a compiled prefill) and the greedy tokens it produced."""
    cache = KVCache(model.cfg, rows, PROMPT + steps + 1, "cpu", torch.float32)
    prompts = torch.randint(0, model.cfg.vocab_size, (rows, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prefill(model, cache, prompts, torch.ones(rows, PROMPT, dtype=torch.bool), compile=True)
        tokens = []
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens.append(logits.argmax(-1))
            logits = decode_next(model, cache, tokens[-1], compile=True)
        elapsed = time.perf_counter() - t0
    return elapsed / steps * 1e3, torch.stack(tokens, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement (default 32)")
    p.add_argument("--pairs", type=int, default=15, help="alternating measurements per side (default 15)")
    p.add_argument("--threads", type=int, default=2)
    add_json_argument(p)
    a = p.parse_args()
    require_at_least_one(p, a, "rows", "steps", "pairs", "threads")
    torch.set_num_threads(a.threads)
    load = load_average()
    print(setting_line(a.threads, load))
    torch.manual_seed(0)
    model = Transformer(model_config()).eval()
    copy = autocast_copy(model, torch.bfloat16)
    sides = {"float32 weights": model, "bf16 copy": copy}
    t0 = time.perf_counter()
    tokens = {name: decode_ms(m, a.rows, a.steps)[1] for name, m in sides.items()}  # compiles both
    print(f"compiled both sides in {time.perf_counter() - t0:.0f} s")
    if not torch.equal(tokens["float32 weights"], tokens["bf16 copy"]):
        raise SystemExit("the bf16 copy decoded other tokens than the model: autocast_copy is broken")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(a.pairs):
        for name, m in sides.items():
            times[name].append(decode_ms(m, a.rows, a.steps)[0])
    medians = {name: statistics.median(v) for name, v in times.items()}
    for name, v in times.items():
        print(f"{name:16} {medians[name]:6.2f} ms per decode step (median of {a.pairs}; min {min(v):.2f})")
    ratio = medians["bf16 copy"] / medians["float32 weights"]
    print(f"bf16 copy / float32 weights: {ratio:.2f}× ({a.rows} rows, the same tokens); load average at the end "
          f"{load_average():.2f}")  # fmt: skip
    rows = [
        row(f"compiled decode step, {a.rows} rows, bf16 autocast: bf16 weight copy / float32 weights", ratio, "×"),
        row("compiled decode step with the bf16 copy", medians["bf16 copy"], "ms"),
    ]
    write_json(a.json, "autocast_copy", rows, load, a.threads)


if __name__ == "__main__":
    main()
