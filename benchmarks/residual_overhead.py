"""What a stream-mixing residual costs: forward+backward time and saved activations of plain / HC / mHC.

F (the block function inside every residual site) is the real thing: the attention and SwiGLU sublayers of
``nanoseek.Transformer`` with sites/2 layers, run as a full LM step (embedding, blocks, final norm, tied head,
cross-entropy, backward). Only the residual connection differs between arms; the embedding, head and loss are the
same small constant in every arm (≈ 2 % of plain's FLOPs at the default shape).

    python benchmarks/residual_overhead.py            # B=8, T=256, C=256, n=4, 8 sites: eager, compiled (+ bf16)
    python benchmarks/residual_overhead.py --quick    # a smoke run at tiny shapes

Arms: plain (the baseline), hc, mhc, mhc-recompute (mHC with ``stream_recompute``: the n-stream state kept only
at the start of every --block sites, rebuilt in backward), package (see below). Runs: eager and compile in fp32,
eager-bf16 and compile-bf16 under bf16 autocast (as training with dtype=bfloat16 does); by default eager, compile,
and compile-bf16 only on a CPU with AMX (with AVX512-BF16 alone a bf16 matmul ran at 0.6× float32's, docs/LOG.md, so
the bf16 ratio would describe the CPU's slow bf16, not mHC). After the tables the
goals are printed with whether each mHC arm meets them: compiled fp32 time ≤ 1.10× plain (stretch 1.067×, the
paper's), saved activations ≤ 1.2× plain in eager and compiled, compiled bf16 time ≤ 1.15× plain.

Every arm is timed in the same run, arms interleaved (in a rotating order) within each repeat, and reported as the
median wall time over repeats and as a ratio to plain; the ratio of median process CPU times is printed too (steadier
than wall time when other processes share the cores, with --threads 1). Saved activations are the bytes autograd
keeps for backward, caught by ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once and parameters
excluded. Compile time is the time of the warm-up steps under ``torch.compile`` minus as many median steps
(compilation of forward and backward from scratch, inductor's on-disk caches disabled unless --compile-cache, and any
recompilation a guard triggers on the second call), reported on its own.

When ``hyper-connections==0.4.11`` is installed (``pip install -e .[bench]``) its mHC runs as a fourth arm around the
same F; the differences that make it not the same computation are printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure the checkout this file is in
from common import add_json_argument, cpu_has_amx, load_average, require_at_least_one, row, write_json  # noqa: E402

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.model.attention import rotary_tables  # noqa: E402

PACKAGE = "hyper-connections"
PACKAGE_NOTES = """\
hyper-connections 0.4.11 mHC differs from nanoseek's (paper Eq. 7-9) in what it computes, so its time is a
reference point, not the same algorithm:
  * per-stream coefficients: each stream is RMS-normalised on its own (learned gain, L2-normalise × √C) and a shared
    C -> 1+n map gives that stream's H_pre entry and the n weights with which it is mixed into every stream, a C -> 1
    map its H_post entry; the paper maps the flattened n·C vector once to n²+2n numbers, so every coefficient sees
    all streams; the paper's map has n·C·(n²+2n) weights and multiply-adds per token, the package's C·(n+2)
    weights applied to each of the n streams (16× fewer weights and 4× fewer multiply-adds at n=4);
  * Sinkhorn through plain autograd: all 20 iterations are kept for backward (nanoseek recomputes them);
  * fp32 upcast with .float() of the normalised streams, the streams and the branch output (no-ops at fp32, copies
    under bf16);
  * streams folded into the batch, ((B·n), T, C); expansion by a repeat (a copy), collapse by sum (nanoseek: mean,
    equal after the final RMSNorm up to its epsilon);
  * initialisation: H_pre = σ(one-hot) (0.73 on one stream, 0.5 on the others), H_res = Sinkhorn(I) (diagonal
    ≈ 0.475 at n=4), H_post = 2σ(1) ≈ 1.46; nanoseek: 1/n each, diagonal 0.95, 1;
  * it does not normalise the branch input; here F is wrapped with the same RMSNorm nanoseek applies, so F's work is
    identical in every arm."""


class PreNorm(nn.Module):
    """fn(norm(x)): the pre-norm F every nanoseek site applies, for the package, which calls branch(x, **kwargs)."""

    def __init__(self, norm: nn.Module, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = norm, fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class PackageMHCModel(nn.Module):
    """The nanoseek LM of a plain-residual model, with every residual site replaced by hyper-connections' mHC.

    Embedding, attention / FFN weights, norms and head are those of ``plain``; streams live as ((B·n), T, C)."""

    def __init__(self, plain: Transformer, n: int):
        super().__init__()
        from hyper_connections import mc_get_init_and_expand_reduce_stream_functions as init_mhc

        make_site, self.expand, self.reduce = init_mhc(n, dim=plain.cfg.d_model)
        self.cfg, self.embed, self.norm = plain.cfg, plain.embed, plain.norm
        self.sites = nn.ModuleList(
            make_site(branch=PreNorm(site.norm, site.fn), layer_index=i)
            for i, site in enumerate(plain.residual_sites())
        )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = rotary_tables(self.cfg.head_dim, 0, idx.shape[1], self.cfg.rope_base, idx.device)
        x = self.expand(self.embed(idx))  # ((B·n), T, C)
        for i, site in enumerate(self.sites):  # even sites are attention, odd ones FFN
            x = site(x, rope=rope) if i % 2 == 0 else site(x)
        logits = F.linear(self.norm(self.reduce(x)), self.embed.weight)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def package_available() -> bool:
    try:
        import hyper_connections  # noqa: F401
    except ImportError:
        return False
    return True


ARMS = ("plain", "hc", "mhc", "mhc-recompute", "package")
RUNS = {"eager": ("eager", None), "compile": ("compile", None)}
RUNS |= {f"{mode}-bf16": (mode, torch.bfloat16) for mode in ("eager", "compile")}
AUTO_RUNS = ["eager", "compile"]  # --runs auto, plus compile-bf16 where the CPU has AMX
GOALS = [  # (what, run, measure, bound): measure is "time" (median wall time) or "saved" (saved activations)
    ("compiled fp32 time ≤ 1.10× plain (stretch 1.067×)", "compile", "time", 1.10),
    ("saved activations, eager ≤ 1.2× plain", "eager", "saved", 1.2),
    ("saved activations, compiled ≤ 1.2× plain", "compile", "saved", 1.2),
    ("compiled bf16 time ≤ 1.15× plain", "compile-bf16", "time", 1.15),
]


def build(arm: str, args: argparse.Namespace) -> nn.Module:
    """The model of one arm, seeded so that F's weights are the same in every arm."""
    residual = {PACKAGE: "plain", "mhc-recompute": "mhc"}.get(arm, arm)
    cfg = ModelConfig(
        vocab_size=256,
        d_model=args.dim,
        n_layers=args.sites // 2,
        n_heads=args.heads or max(1, args.dim // 64),
        seq_len=args.seq,
        residual=residual,
        n_streams=args.streams,
        stream_recompute=args.block if arm == "mhc-recompute" else 0,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    return PackageMHCModel(model, args.streams) if arm == PACKAGE else model


def step(model: nn.Module, idx: torch.Tensor, dtype: torch.dtype | None) -> None:
    """One training step's forward and backward (no optimiser: it is the same in every arm); with a dtype, the
    forward runs under autocast to it."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        _, loss = model(idx, idx)
    loss.backward()


def saved_activation_bytes(model: nn.Module, idx: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bytes autograd saves for backward during one forward, each storage once, parameters (and views of them)
    excluded. Under torch.compile this sees what the compiled graph saves."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, idx, dtype)
    return sum(storages.values())


def measure(arms: list[str], run: str, idx: torch.Tensor, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    mode, dtype = RUNS[run]
    models = {arm: build(arm, args) for arm in arms}
    if mode == "compile":
        if not args.compile_cache:  # compile time from scratch, not from a cache on disk
            torch._inductor.config.force_disable_caches = True
            warnings.filterwarnings("ignore", message=".*force_disable_caches")  # says caches are off: we know
        models = {arm: torch.compile(m) for arm, m in models.items()}
    out: dict[str, dict] = {}
    for arm, model in models.items():
        start = time.perf_counter()
        for _ in range(1 + args.warmup):  # the first step compiles; a guard may recompile on the second
            step(model, idx, dtype)
        warm = time.perf_counter() - start
        out[arm] = {"warm": warm, "saved": saved_activation_bytes(model, idx, dtype), "wall": [], "cpu": []}
    for r in range(args.repeats):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:  # rotate who goes first
            wall, cpu = time.perf_counter(), time.process_time()
            step(models[arm], idx, dtype)
            out[arm]["wall"].append(time.perf_counter() - wall)
            out[arm]["cpu"].append(time.process_time() - cpu)
    for res in out.values():
        res["median"], res["cpu_median"] = statistics.median(res["wall"]), statistics.median(res["cpu"])
        res["compile"] = res["warm"] - (1 + args.warmup) * res["median"]
    return out


def table(results: dict[str, dict[str, dict]]) -> str:
    head = (
        f"{'run':12} {'arm':22} {'fwd+bwd ms':>11} {'× plain':>8} {'cpu × plain':>12} {'saved MB':>9} {'× plain':>8} "
        f"{'compile s':>10}"
    )
    lines = [head, "-" * len(head)]
    for run, res in results.items():
        base = res["plain"]
        for arm, r in res.items():
            name = f"{PACKAGE} mHC" if arm == PACKAGE else arm
            compile_s = f"{r['compile']:10.1f}" if RUNS[run][0] == "compile" else f"{'-':>10}"
            lines.append(
                f"{run:12} {name:22} {1e3 * r['median']:11.1f} {r['median'] / base['median']:8.2f} "
                f"{r['cpu_median'] / base['cpu_median']:12.2f} {r['saved'] / 2**20:9.1f} "
                f"{r['saved'] / base['saved']:8.2f} {compile_s}"
            )
    return "\n".join(lines)


def left_out(run: str, results: dict) -> str:
    """Why ``run`` is not in ``results`` when ``--runs auto`` leaves it out on this CPU ("" otherwise)."""
    if run == "compile-bf16" and run not in results and not cpu_has_amx():
        return "no AMX on this CPU, where a bf16 matmul is slower than float32's (--runs ...,compile-bf16 runs it)"
    return ""


def goals(results: dict[str, dict[str, dict]]) -> str:
    """Each goal, and for each mHC arm measured in its run the ratio to plain and whether it is met."""
    lines = ["goals (ratio to plain in the same run):"]
    for what, run, measure_, bound in GOALS:
        res = results.get(run)
        arms = [a for a in ("mhc", "mhc-recompute") if res and a in res]
        if not arms:
            why = left_out(run, results)
            lines.append(f"  {what}: not measured (needs run {run} and an mhc arm{'; ' + why if why else ''})")
            continue
        key = "median" if measure_ == "time" else "saved"
        verdicts = []
        for arm in arms:
            ratio = res[arm][key] / res["plain"][key]
            verdicts.append(f"{arm} {ratio:.3f}× {'met' if ratio <= bound else 'NOT met'}")
        lines.append(f"  {what}: " + "; ".join(verdicts))
    return "\n".join(lines)


def goal_rows(results: dict[str, dict[str, dict]]) -> list[dict]:
    """The goals as result rows, one per mHC arm measured, then each run's mHC time ratio without a goal."""
    rows = []
    for what, run, measure_, bound in GOALS:
        res = results.get(run, {})
        if why := left_out(run, results):  # the goal stays in the table, with the reason
            rows.append(row(f"mhc: {what.split(' ≤')[0]} / plain", f"not measured: {why}", "", f"<= {bound}"))
        key = "median" if measure_ == "time" else "saved"
        for arm in (a for a in ("mhc", "mhc-recompute") if a in res):
            rows.append(row(f"{arm}: {what.split(' ≤')[0]} / plain", res[arm][key] / res["plain"][key], "×",
                            f"<= {bound}"))  # fmt: skip
    for run, res in results.items():
        if run != "compile" and "mhc" in res:
            rows.append(row(f"mhc: {run} time / plain", res["mhc"]["median"] / res["plain"]["median"], "×"))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="batch size B (default 8)")
    p.add_argument("--seq", type=int, default=256, help="sequence length T (default 256)")
    p.add_argument("--dim", type=int, default=256, help="model width C (default 256)")
    p.add_argument("--streams", type=int, default=4, help="number of residual streams n for hc and mhc (default 4)")
    p.add_argument("--sites", type=int, default=8, help="residual sites, an even number: 2 per layer (default 8)")
    p.add_argument("--heads", type=int, default=0, help="attention heads; 0 = dim/64 (default 0)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per arm; the median is reported (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm after the first (default 2)")
    p.add_argument(
        "--runs",
        default="auto",
        help=f"comma-separated subset of {','.join(RUNS)}; compile uses torch.compile's default mode, -bf16 runs the "
        "forward under bf16 autocast. auto (default): eager,compile, and compile-bf16 too on a CPU with AMX (without "
        "AMX a bf16 matmul is slower than float32's and the bf16 ratio describes that, not mHC)",
    )
    p.add_argument(
        "--arms",
        default="plain,mhc,mhc-recompute",
        help=f"comma-separated subset of {','.join(ARMS)}; 'package' is hyper-connections' mHC and is skipped "
        "with a note when it is not installed; plain is always measured, as the baseline (default "
        "plain,mhc,mhc-recompute)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=4,
        help="sites per recompute block of the mhc-recompute arm (default 4; the paper's √(n·L/(n+2)) would be 2 "
        "at 8 sites, which keeps twice as many states)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    p.add_argument(
        "--compile-cache",
        action="store_true",
        help="let torch.compile use its on-disk caches (the compile column then shows what a warm cache costs, "
        "and a rerun takes minutes less); by default they are off and it shows compiling from scratch",
    )
    add_json_argument(p)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: B=2, T=32, C=64, 2 sites, 3 repeats, 1 warm-up (overrides those flags); nearly all of its "
        "time is compilation",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.dim, args.sites, args.repeats, args.warmup = 2, 32, 64, 2, 3, 1
    require_at_least_one(p, args, "batch", "seq", "dim", "streams", "sites", "repeats")
    if args.threads < 0:
        p.error(f"--threads={args.threads} is invalid: expected 0 (torch's default) or a positive integer")
    if args.sites % 2:
        p.error(f"--sites={args.sites} is invalid: expected an even number (each layer has 2 sites)")
    args.runs = AUTO_RUNS + (["compile-bf16"] if cpu_has_amx() else []) if args.runs == "auto" else args.runs.split(",")
    if not set(args.runs) <= set(RUNS):
        p.error(f"--runs={','.join(args.runs)} is invalid: expected a subset of {','.join(RUNS)}")
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS):
        p.error(f"--arms={args.arms} is invalid: expected a subset of {','.join(ARMS)}")
    if args.block < 2:
        p.error(f"--block={args.block} is invalid: expected an integer >= 2")
    args.arms = ["plain"] + [PACKAGE if a == "package" else a for a in arms if a != "plain"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = args.arms
    if PACKAGE in arms and not package_available():
        print(f"note: {PACKAGE} is not installed (pip install -e .[bench]); its arm is skipped")
        arms = [a for a in arms if a != PACKAGE]
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (args.batch, args.seq))
    print(
        f"B={args.batch} T={args.seq} C={args.dim} n={args.streams} sites={args.sites} (F = attention + SwiGLU "
        f"sublayers), recompute block {args.block} sites, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, median of {args.repeats} steps per arm",
        flush=True,
    )
    load = load_average()
    if load > (os.cpu_count() or 1) - 1 and torch.get_num_threads() > 1:
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores; multi-threaded timings are unreliable when "
            "other processes compete for the cores (--threads 1 gives steadier ratios)",
            flush=True,
        )
    results = {}
    for run in args.runs:
        results[run] = measure(arms, run, idx, args)
        print(f"{run}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(table(results))
    print(goals(results))
    print(f"1-minute load average: {load:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the machine)")
    if PACKAGE in arms:
        print(PACKAGE_NOTES)
    write_json(args.json, "residual_overhead", goal_rows(results), load, torch.get_num_threads())


if __name__ == "__main__":
    main()
