"""Training throughput and model FLOP utilisation (MFU) against the matmul peak measured in the same run.

    python benchmarks/train_throughput.py                 # d_model 384, plain and mhc, eager and compiled
    python benchmarks/train_throughput.py --quick         # a smoke run

For each (residual, mode, dtype): the median seconds of a full optimizer step (forward, backward, AdamW) on random
tokens, tokens/s, and MFU = tokens/s × analytic training FLOPs per token / peak, where the peak is the best
FLOP/s of a large square matmul in the same dtype on this machine, measured before and again after the runs (a peak
measured while the cores were briefly slower once gave an MFU above 100 %: docs/LOG.md, 2026-12-04). Compile time is
excluded (warm-up steps) and printed separately. bf16 is measured only where the CPU has AMX (``--dtypes fp32,bf16``
forces it): without bf16 instructions torch emulates it, and with AVX512-BF16 alone a 2048³ bf16 matmul ran at 139
GFLOP/s against float32's 239 (docs/LOG.md, 2026-12-03) — either way slower than fp32, and the figure would say
nothing about bf16 training.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import add_json_argument, cpu_has_amx, load_average, row, write_json

from nanoseek import ModelConfig, Transformer
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an n×n @ n×n matmul (2n³ FLOPs) over ``repeats`` tries."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def step_times(cfg: ModelConfig, dtype: str, compiled: bool, batch: int, warmup: int, steps: int):
    torch.manual_seed(0)
    model = Transformer(cfg)
    forward = torch.compile(model) if compiled else model
    optimizers = build_optimizers(model, TrainConfig())
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    autocast = torch.autocast("cpu", dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def step():
        with autocast:
            loss = forward(x, x)[1]
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warm, model.flops_per_token()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--residuals", default="plain,mhc")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--dtypes", default="auto", help="comma-separated fp32, bf16; auto (default): fp32, and bf16 "
                   "too when the CPU has AMX (emulated bf16, or AVX512-BF16 alone, is slower than fp32 here: the "
                   "figure would describe that, not bf16 training)")  # fmt: skip
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one configuration each: checks that it runs")
    add_json_argument(p)
    args = p.parse_args()
    load, rows = load_average(), []
    if args.quick:
        args.d_model, args.layers, args.heads, args.seq_len, args.batch, args.steps = 64, 2, 2, 64, 2, 2
        args.modes, args.matmul_size = "eager", 256
    torch.manual_seed(0)
    dtypes = (["fp32", "bf16"] if cpu_has_amx() else ["fp32"]) if args.dtypes == "auto" else args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)} (or auto)")
    peaks = {d: matmul_peak(DTYPES[d], args.matmul_size, 5) for d in dtypes}
    print(f"threads={torch.get_num_threads()}  torch {torch.__version__}")
    for d, peak in peaks.items():
        print(f"matmul peak {d}: {peak / 1e9:.1f} GFLOP/s ({args.matmul_size}^3), measured again after the runs")
    print(f"model: d_model={args.d_model} layers={args.layers} heads={args.heads} T={args.seq_len} B={args.batch}")
    columns = ("step s", "tokens/s", "vs plain", "warm-up s")  # MFU after the runs, against the peak measured twice
    header = f"{'residual':8} {'mode':9} {'dtype':5} " + " ".join(f"{c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    base, results = {}, []
    for dtype in dtypes:
        for mode in args.modes.split(","):
            for residual in args.residuals.split(","):
                cfg = ModelConfig(
                    d_model=args.d_model,
                    n_layers=args.layers,
                    n_heads=args.heads,
                    seq_len=args.seq_len,
                    residual=residual,
                )
                sec, warm, fpt = step_times(cfg, dtype, mode == "compiled", args.batch, args.warmup, args.steps)
                tps = args.batch * args.seq_len / sec
                base.setdefault((mode, dtype), sec)
                ratio = sec / base[(mode, dtype)]
                print(f"{residual:8} {mode:9} {dtype:5} {sec:9.3f} {tps:9.0f} {ratio:8.2f}x {warm:9.1f}")
                results.append((f"{residual} {mode} {dtype}", dtype, tps, fpt))
    for d in dtypes:  # the peak again: the best of both is the machine's, a single low one would inflate the MFU
        again = matmul_peak(DTYPES[d], args.matmul_size, 5)
        print(f"matmul peak {d} after the runs: {again / 1e9:.1f} GFLOP/s; the MFU uses the best of both")
        peaks[d] = max(peaks[d], again)
        rows.append(row(f"{d} matmul peak ({args.matmul_size}^3, best of before and after)", peaks[d] / 1e9, "GFLOP/s"))
    for name, dtype, tps, fpt in results:
        mfu = tps * fpt / peaks[dtype]
        print(f"{name}: MFU {mfu:.1%}")
        rows.append(row(f"{name}: training tokens/s", tps, "tokens/s"))
        rows.append(row(f"{name}: MFU (vs measured {dtype} matmul peak)", 100 * mfu, "%"))
    write_json(args.json, "train_throughput", rows, load, torch.get_num_threads())


if __name__ == "__main__":
    main()
