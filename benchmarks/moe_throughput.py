"""Dense FFN vs DeepSeekMoE at equal *active* parameters, on this machine: training throughput and quality.

1. Throughput: tokens/s of a full training step (forward + backward + AdamW step + MoE bias update) for a dense
   model, the MoE model with grouped_mm dispatch and the same MoE with the per-expert loop. The arms take turns
   within every repeat, so a slow moment of the machine hits them alike; the median over repeats is reported, and
   against the dense model the median of each repeat's ratio (MoE and dense measured back to back) with their
   range (the goal: MoE >= 0.9x dense), with the time per step split into forward, backward and optimizer.
2. Quality: validation loss after the same token budget (hence about the same FLOPs: active parameters are equal),
   dense vs MoE (grouped; the loop computes the same function, tests/test_moe.py checks it), 3 seeds by default
   (below ~1M tokens the seed-to-seed spread is tenths of a nat, docs/LOG.md), trained with a minimal loop on the
   bytes of ``pydoc_data.topics`` (the running CPython's documentation topics, concatenated in sorted topic order;
   the last 10 % of bytes are validation). The MoE runs also print their max expert-load violation every 10 % of
   the steps, e.g. to compare balancing rates: --skip-speed --arms moe-grouped --gamma 0.01

The MoE model's expert width is automatic (ModelConfig.expert_hidden = 0): the dense hidden width divided by
shared + top_k experts, so both models do about the same work per token. Run with --help for the flags.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import statistics
import time
from pydoc_data.topics import topics

import torch
from common import add_json_argument, load_average, require_at_least, require_at_least_one, row, write_json

from nanoseek import ModelConfig, Transformer
from nanoseek.model.moe import moe_stats
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256, help="residual width of both models (default 256)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (default 16)")
    p.add_argument("--top-k", type=int, default=2, help="routed experts per token (default 2)")
    p.add_argument("--shared", type=int, default=1, help="shared experts per MoE layer (default 1)")
    p.add_argument("--first-k-dense", type=int, default=0, help="leading blocks kept dense in the MoE model")
    p.add_argument("--gamma", type=float, default=0.001, help="bias update rate γ (default 0.001, DeepSeek-V3's)")
    p.add_argument("--alpha", type=float, default=0.0001, help="sequence-wise balance loss α (default 0.0001)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per arm and repeat (default 5)")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm before timing (default 2)")
    p.add_argument("--budget", type=int, default=1_000_000, help="training tokens per quality run (default 1M)")
    p.add_argument("--seeds", type=int, default=3, help="quality runs per arm, seeds 0.. (default 3)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate of the quality runs")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--arms", default="dense,moe-grouped,moe-loop", help="comma-separated subset of the arms")
    p.add_argument("--skip-speed", action="store_true", help="only the quality runs")
    p.add_argument("--skip-quality", action="store_true", help="only the throughput measurement")
    p.add_argument(
        "--plain-adamw",
        action="store_true",
        help="also time each arm with AdamW's per-parameter loop instead of the engine's fused AdamW",
    )
    add_json_argument(p)
    a = p.parse_args()
    require_at_least_one(p, a, "d_model", "layers", "heads", "seq_len", "batch", "experts", "top_k", "steps",
                         "repeats", "budget", "seeds", "threads")  # fmt: skip
    require_at_least(p, a, 0, "shared", "first_k_dense", "warmup")
    return a


def configs(a: argparse.Namespace) -> dict[str, ModelConfig]:
    base = dict(vocab_size=256, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, seq_len=a.seq_len)
    moe = dict(
        base,
        ffn="moe",
        n_routed_experts=a.experts,
        top_k=a.top_k,
        n_shared_experts=a.shared,
        first_k_dense=a.first_k_dense,
        bias_update_rate=a.gamma,
        seq_aux_loss=a.alpha,
    )
    return {
        "dense": ModelConfig(**base),
        "moe-grouped": ModelConfig(**moe, moe_dispatch="grouped"),
        "moe-loop": ModelConfig(**moe, moe_dispatch="loop"),
    }


def chosen_arms(cfgs: dict[str, ModelConfig], arms: str) -> dict[str, ModelConfig]:
    names = arms.split(",")
    unknown = [name for name in names if name not in cfgs]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; expected a subset of {', '.join(cfgs)}")
    return {name: cfgs[name] for name in names}


def corpus() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Byte tokens (train, val) of pydoc_data.topics and the SHA-256 of the text."""
    data = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * 0.9)
    return tokens[:cut], tokens[cut:], hashlib.sha256(data).hexdigest()


def batch(tokens: torch.Tensor, b: int, t: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(tokens) - t - 1, (b,), generator=g)
    windows = torch.stack([tokens[s : s + t + 1] for s in starts.tolist()])  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


PHASES = ("forward", "backward", "optimizer")


def make_engine(cfg: ModelConfig, train: TrainConfig) -> Engine:
    return Engine(Transformer(cfg).train(), train, log=lambda message: None)


def plain_adamw(engine: Engine) -> Engine:
    """The same engine with AdamW's per-parameter loop (fused=False, foreach=False): the kernel before the fused one."""
    for opt in engine.optimizers:
        for group in opt.param_groups:
            group["fused"], group["foreach"] = False, False
    return engine


def train_step(engine: Engine, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """One engine update (forward, backward, clipping, optimizer step, MoE bias update); returns the seconds spent
    in forward, in backward + clipping, and from the optimizer step to the end (the step, the finite check, the
    bias update), timed by the optimizer's step hooks."""
    marks = {}

    def closure() -> torch.Tensor:
        loss = engine.forward(x, y)[1]
        marks["forward"] = time.perf_counter()
        return loss

    def before_step(*_) -> None:
        marks["optimizer"] = time.perf_counter()

    hook = engine.optimizers[0].register_step_pre_hook(before_step)
    t0 = time.perf_counter()
    engine.update([closure])
    end = time.perf_counter()
    hook.remove()
    return [marks["forward"] - t0, marks["optimizer"] - marks["forward"], end - marks["optimizer"]]


def throughput(
    cfgs: dict[str, ModelConfig], train: torch.Tensor, a: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per arm: median tokens/s, then median ms per step in each phase; arms take turns within each repeat. Also,
    per arm, its tokens/s over the dense arm's in each repeat (the pairs a slow moment of the machine hits alike;
    empty without a dense arm)."""
    g = torch.Generator().manual_seed(0)
    data = [batch(train, a.batch, a.seq_len, g) for _ in range(a.steps)]
    arms = {name: (cfg, False) for name, cfg in cfgs.items()}
    if a.plain_adamw:  # the same arms with the per-parameter AdamW loop, measured in the same run
        arms |= {f"{name}/loop-adamw": (cfg, True) for name, cfg in cfgs.items() if name != "moe-loop"}
    runs = {}
    for name, (cfg, plain) in arms.items():
        torch.manual_seed(0)
        engine = make_engine(cfg, TrainConfig(lr=1e-4, threads=a.threads))
        engine = plain_adamw(engine) if plain else engine
        for x, y in data[: a.warmup]:
            train_step(engine, x, y)
        runs[name] = engine
    rates: dict[str, list[float]] = {name: [] for name in arms}
    phases: dict[str, list[list[float]]] = {name: [] for name in arms}
    for _ in range(a.repeats):
        for name, engine in runs.items():
            t0 = time.perf_counter()
            times = [train_step(engine, x, y) for x, y in data]
            rates[name].append(a.steps * a.batch * a.seq_len / (time.perf_counter() - t0))
            phases[name].append([1000 * sum(column) / a.steps for column in zip(*times, strict=True)])
    medians = {
        name: [statistics.median(rates[name])]
        + [statistics.median(column) for column in zip(*phases[name], strict=True)]
        for name in arms
    }
    dense = rates.get("dense")
    paired = {name: [r / d for r, d in zip(rs, dense, strict=True)] if dense else [] for name, rs in rates.items()}
    return medians, paired


@torch.no_grad()
def val_loss(model: Transformer, val: torch.Tensor, a: argparse.Namespace) -> float:
    """Mean loss over fixed, evenly spaced validation windows (64 of them, or fewer if the split is short)."""
    model.eval()
    n = min(64, (len(val) - 1) // a.seq_len)
    starts = torch.linspace(0, len(val) - a.seq_len - 1, n).long().tolist()
    windows = torch.stack([val[s : s + a.seq_len + 1] for s in starts])
    losses = [model(w[:, :-1], w[:, 1:])[1].item() for w in windows.split(a.batch)]
    model.train()
    return sum(losses) / len(losses)


def quality(cfg: ModelConfig, train: torch.Tensor, val: torch.Tensor, seed: int, a: argparse.Namespace) -> dict:
    """Train for the token budget (linear warm-up over 5 % of the steps, cosine decay to 10 %), then evaluate."""
    torch.manual_seed(seed)
    steps = max(1, a.budget // (a.batch * a.seq_len))
    warm = max(1, steps // 20)
    train_cfg = TrainConfig(lr=a.lr, beta2=0.95, weight_decay=0.1, steps=steps, warmup_steps=warm, schedule="cosine",
                            min_lr_ratio=0.1, threads=a.threads)  # fmt: skip
    engine = make_engine(cfg, train_cfg)
    model = engine.model
    g = torch.Generator().manual_seed(1000 + seed)
    trace, marks = [], {steps * i // 10 for i in range(1, 11)}  # max violation every 10 % of the run
    t0 = time.perf_counter()
    for step in range(steps):
        engine.set_lr(step)
        train_step(engine, *batch(train, a.batch, a.seq_len, g))
        if step + 1 in marks and model.moe_layers():
            trace.append(moe_stats(model)["moe_max_violation"])
    seconds = time.perf_counter() - t0
    return dict(loss=val_loss(model, val, a), seconds=seconds, trace=trace)


def mean_ci(xs: list[float]) -> str:
    """mean ± half-width of the 95 % t interval (just the value for one seed)."""
    if len(xs) < 2:
        return f"{xs[0]:.4f}"
    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    half = t95.get(len(xs), 2.0) * statistics.stdev(xs) / math.sqrt(len(xs))
    return f"{statistics.mean(xs):.4f} ± {half:.4f}"


def main() -> None:
    a = parse_args()
    load = load_average()
    rows: list[dict] = []
    torch.set_num_threads(a.threads)
    every = configs(a)
    cfgs = chosen_arms(every, a.arms)
    train, val, sha = corpus()
    moe_cfg = every["moe-grouped"]
    print(f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"corpus pydoc_data.topics: {len(train) + len(val):,} bytes, sha256 {sha[:16]}…, last 10 % = validation")
    print(
        f"shape: d_model={a.d_model} layers={a.layers} heads={a.heads} seq_len={a.seq_len} batch={a.batch}; "
        f"MoE: {a.shared} shared + {a.experts} routed, top-{a.top_k}, expert_hidden={moe_cfg.expert_width} "
        f"(dense hidden {moe_cfg.hidden}), first_k_dense={a.first_k_dense}, γ={a.gamma}, α={a.alpha}"
    )
    models = {name: Transformer(cfg) for name, cfg in cfgs.items()}
    print(f"\n{'arm':<12} {'params':>10} {'active':>10} {'MFLOP/token':>12}")
    for name, m in models.items():
        print(f"{name:<12} {m.num_params():>10,} {m.num_params(active=True):>10,} {m.flops_per_token() / 1e6:>12.2f}")
    if not a.skip_speed:
        results, paired = throughput(cfgs, train, a)
        print(f"\nthroughput, forward + backward + AdamW step, median of {a.repeats} repeats × {a.steps} steps; "
              "× dense: median of the repeats' paired ratios (their range)")  # fmt: skip
        for name, (rate, *ms) in results.items():
            ratios = paired[name]
            ratio = f"{statistics.median(ratios):.2f}× dense ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else ""
            split = " + ".join(f"{t:.0f}" for t in ms)
            print(f"{name:<12} {rate:>10,.0f} tokens/s   {ratio:<22}   ms per step ({', '.join(PHASES)}): {split}")
            rows.append(row(f"{name}: training tokens/s", rate, "tokens/s"))
            rows.append(row(f"{name}: optimizer ms per step", ms[2], "ms"))
            if name != "dense" and ratios:
                goal = ">= 0.9" if name == "moe-grouped" else None  # the goal, for the default dispatch
                rows.append(row(f"{name} / dense tokens/s (fwd + bwd + optimizer)", statistics.median(ratios), "×",
                                goal, spread=(min(ratios), max(ratios))))  # fmt: skip
    quality_arms = [name for name in cfgs if name != "moe-loop"] or ["moe-loop"]  # the loop = grouped's function
    if not a.skip_quality:
        print(f"\nvalidation loss after {a.budget:,} training tokens, seeds 0..{a.seeds - 1}, lr {a.lr}")
        runs = {name: [quality(cfgs[name], train, val, s, a) for s in range(a.seeds)] for name in quality_arms}
        for name, rs in runs.items():
            losses = [r["loss"] for r in rs]
            each = ", ".join(f"{x:.4f}" for x in losses)
            print(
                f"{name:<12} val loss {mean_ci(losses)}  ({each}), {statistics.median(r['seconds'] for r in rs):.0f} s"
            )
            for seed, r in enumerate(rs):
                if r["trace"]:
                    trace = " ".join(f"{v:.2f}" for v in r["trace"])
                    print(f"{'':<12} seed {seed}: max violation every 10 % of the steps: {trace}")
        moe = next((name for name in runs if name != "dense"), None)
        if "dense" in runs and moe is not None:
            diff = [m["loss"] - d["loss"] for m, d in zip(runs[moe], runs["dense"], strict=True)]
            flops = models[moe].flops_per_token() / models["dense"].flops_per_token()
            print(f"MoE - dense val loss (paired by seed): {mean_ci(diff)} at {flops:.3f}× the dense FLOPs per token")
            rows.append(row(f"{moe} - dense val loss after {a.budget:,} tokens ({a.seeds} seeds)", mean_ci(diff)))
    write_json(a.json, "moe_throughput", rows, load, torch.get_num_threads())


if __name__ == "__main__":
    main()
