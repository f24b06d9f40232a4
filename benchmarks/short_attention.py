"""Differentiated attention on CPU: torch's fused kernel against nanoseek's written-out operator, forward + backward.

``nanoseek.model.attention.attend`` runs torch's ``scaled_dot_product_attention`` except on CPU when gradients flow
over at most ``SHORT_KEYS`` keys (128 in bf16, 64 in float32): there it runs ``nanoseek::short_attention``, the
same maths written out with its own backward. This times one causal attention layer, forward + backward, both ways,
eager and under ``torch.compile``, at the shapes that chose those limits: GRPO's update (``grpo_vs_trl.py``: 32
completions × 4 heads × 43 tokens × 64) and the demo's pretraining (16 × 4 × 128 × 48), in bf16 and float32, the
two sides alternating ``--pairs`` times; medians and their ratio (written out / fused: below 1 is faster). Rows for
shapes above a dtype's limit show what the limit avoids. bf16 is only meaningful on a CPU with bf16 instructions.

    python benchmarks/short_attention.py [--pairs 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import add_json_argument, load_average, require_at_least_one, row, setting_line, write_json

from nanoseek.model.attention import SHORT_KEYS, _short_attention

SHAPES = {"GRPO update": (32, 4, 43, 64), "demo pretraining": (16, 4, 128, 48)}


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def written_out(q, k, v):
    return _short_attention(q, k, v, None, True)[0]


def forward_backward_ms(fn, q, k, v, grad, repeats: int = 5) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(q, k, v).backward(grad)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=15, help="alternating measurements per side (default 15)")
    p.add_argument("--threads", type=int, default=2)
    add_json_argument(p)
    a = p.parse_args()
    require_at_least_one(p, a, "pairs", "threads")
    torch.set_num_threads(a.threads)
    load = load_average()
    print(setting_line(a.threads, load))
    rows = []
    for mode in ("eager", "compiled"):
        sides = {"fused": fused, "written out": written_out}
        if mode == "compiled":
            sides = {name: torch.compile(fn, dynamic=False) for name, fn in sides.items()}
        for shape_name, shape in SHAPES.items():
            for dtype in (torch.bfloat16, torch.float32):
                gen = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))
                grad = torch.randn(shape, generator=gen, dtype=dtype)
                times: dict[str, list[float]] = {name: [] for name in sides}
                for fn in sides.values():
                    forward_backward_ms(fn, q, k, v, grad, repeats=2)  # warm-up (and compile)
                for _ in range(a.pairs):
                    for name, fn in sides.items():
                        times[name].append(forward_backward_ms(fn, q, k, v, grad))
                med = {name: statistics.median(t) for name, t in times.items()}
                ratio = med["written out"] / med["fused"]
                dt = "bf16" if dtype == torch.bfloat16 else "float32"
                used = "written out" if shape[2] <= SHORT_KEYS[dtype] else "fused"
                print(f"{mode:8} {shape_name:16} {dt:7} {shape}: fused {med['fused']:6.2f} ms, written out "
                      f"{med['written out']:6.2f} ms, ratio {ratio:.2f}  (attend uses: {used})")  # fmt: skip
                rows.append(row(f"{mode} {shape_name} {dt} {shape}: written out / fused, fwd + bwd", ratio, "×"))
    print(f"load average at the end {load_average():.2f}")
    write_json(a.json, "short_attention", rows, load, a.threads)


if __name__ == "__main__":
    main()
