"""nanoseek vs transformers on the same weights, for every class `nanoseek export` maps to.

For each class a random nanoseek model of the same shape (d_model 256, 4 layers, byte vocabulary, GQA 4/2 heads,
init_std 0.05 so the logits are far from uniform) is exported with ``nanoseek.interop.hf_export.export`` and loaded
with ``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code=True`` for nanoseek's own modelling code). Then,
in fp32 on CPU:

* max |Δ logits| over a random (4, 256) batch, next to the largest |logit| for scale;
* greedy agreement: 8 random 16-token prompts decoded 64 tokens greedily by each library, in one batch: how many
  continuations are identical, and the longest common prefix averaged over prompts;
* forward speed: one no-grad forward of the (4, 256) batch, median of --repeats, the two libraries taking turns;
* generation speed: batch-1 greedy decoding of 64 tokens after a 16-token prompt (KV cache in both), tokens/s,
  median of --repeats, taking turns;
with 1 and 2 torch threads. Ratios are measured in the same run: "HF/ns" > 1 means transformers takes longer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from common import add_json_argument, load_average, package_versions, require_at_least_one, row, write_json  # noqa: E402

from nanoseek.config import RunConfig  # noqa: E402
from nanoseek.data.config import DataConfig  # noqa: E402
from nanoseek.data.tokenizer import ByteTokenizer  # noqa: E402
from nanoseek.interop.hf_export import export  # noqa: E402
from nanoseek.model import ModelConfig, Transformer  # noqa: E402
from nanoseek.model.generate import generate  # noqa: E402
from nanoseek.train.checkpoint import save_checkpoint  # noqa: E402
from nanoseek.train.config import TrainConfig  # noqa: E402

BASE = {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "seq_len": 512, "init_std": 0.05}
CLASSES = {
    "llama": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True, "head_size": 128},
    "glm4_moe": {"ffn": "moe", "n_routed_experts": 16, "top_k": 2, "first_k_dense": 1, "route_scale": 2.5},
    "nanoseek-mhc": {"residual": "mhc"},
    "nanoseek-mhc-moe": {"residual": "mhc", "ffn": "moe", "n_routed_experts": 16, "top_k": 2},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default=",".join(CLASSES), help="comma-separated subset of " + ", ".join(CLASSES))
    p.add_argument("--threads", default="1,2", help="torch thread counts to time (default 1,2)")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats; medians are reported (default 5)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    add_json_argument(p)
    a = p.parse_args()
    try:
        a.thread_counts = [int(t) for t in a.threads.split(",")]
    except ValueError:
        a.thread_counts = []
    if not a.thread_counts or min(a.thread_counts) < 1:
        p.error(f"--threads={a.threads!r} is invalid: expected comma-separated integers >= 1, e.g. 1,2")
    require_at_least_one(p, a, "repeats", "new_tokens")
    return a


def build(name: str, folder: Path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **CLASSES[name])).eval()
    with torch.no_grad():  # move gains and biases off their initial values, as training would
        for p in model.parameters():
            if p.dim() <= 1 and p.numel() > 1:
                p.add_(0.05 * torch.randn_like(p))
        for moe in model.moe_layers():
            moe.expert_bias.normal_(0, 0.05)
    run = RunConfig(model=model.cfg, data=DataConfig(), train=TrainConfig())
    ckpt = save_checkpoint(folder / "run", 0, model.state_dict(), run.to_dict(), ByteTokenizer(), {"step": 0})
    done = export(ckpt, folder / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(done.folder, trust_remote_code=True).eval()
    return model, hf, done.architecture


def hf_greedy(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[:, ids.shape[1] :]


def ns_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return generate(model, ids.tolist(), n, temperature=0).tokens


def agreement(model, hf, n: int) -> tuple[int, float]:
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    ours, theirs = ns_greedy(model, ids, n), hf_greedy(hf, ids, n)
    same = ours == theirs
    prefix = [int(row.cumprod(0).sum()) for row in same.int()]
    return int(same.all(dim=1).sum()), statistics.mean(prefix)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speeds(model, hf, repeats: int, n: int) -> dict[str, float]:
    batch = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(2))
    prompt = batch[:1, :16]
    arms = {
        "fwd_ns": lambda: model(batch),
        "fwd_hf": lambda: hf(batch),
        "gen_ns": lambda: ns_greedy(model, prompt, n),
        "gen_hf": lambda: hf_greedy(hf, prompt, n),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    with torch.no_grad():
        for fn in arms.values():  # warm-up: allocator, kernels, transformers' lazy setup
            fn()
        for r in range(repeats):
            for k in list(arms)[:: 1 if r % 2 == 0 else -1]:  # alternate the order so drifts hit both alike
                times[k].append(timed(arms[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return med | {"gen_ns": n / med["gen_ns"], "gen_hf": n / med["gen_hf"]}  # generation in tokens/s


def main() -> None:
    args = parse_args()
    names = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = [c for c in names if c not in CLASSES]
    if unknown:
        raise SystemExit(f"--classes: unknown {unknown[0]!r}; choose from {', '.join(CLASSES)}")
    threads = args.thread_counts
    load, rows = load_average(), []
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} cores")  # fmt: skip
    print("| class | params | max abs Δlogits (max abs logit) | greedy identical (mean common prefix) | threads | "
          "forward ms ns / HF | HF/ns | generate tok/s ns / HF | ns/HF |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            torch.set_num_threads(2)
            model, hf, architecture = build(name, Path(tmp) / name)
            ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                ours, theirs = model(ids), hf(ids).logits
            delta, scale = float((ours - theirs).abs().max()), float(ours.abs().max())
            same, prefix = agreement(model, hf, args.new_tokens)
            for t in threads:
                torch.set_num_threads(t)
                s = speeds(model, hf, args.repeats, args.new_tokens)
                print(f"| {architecture} ({name}) | {model.num_params() / 1e6:.2f}M | {delta:.2e} ({scale:.1f}) | "
                      f"{same}/8 ({prefix:.1f}/{args.new_tokens}) | {t} | {1e3 * s['fwd_ns']:.1f} / "
                      f"{1e3 * s['fwd_hf']:.1f} | {s['fwd_hf'] / s['fwd_ns']:.2f} | {s['gen_ns']:.0f} / "
                      f"{s['gen_hf']:.0f} | {s['gen_ns'] / s['gen_hf']:.2f} |", flush=True)  # fmt: skip
                rows.append(row(f"{name}: forward time HF / nanoseek, {t} thread(s)", s["fwd_hf"] / s["fwd_ns"], "×"))
                rows.append(row(f"{name}: decode tok/s nanoseek / HF, {t} thread(s)", s["gen_ns"] / s["gen_hf"], "×"))
            rows.append(row(f"{name} ({architecture}): max abs Δ logits, fp32", delta, "", "<= 1e-5"))
            rows.append(row(f"{name}: greedy continuations identical", same, "of 8", ">= 8"))
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    write_json(args.json, "hf_parity", rows, load, max(threads), versions=package_versions("transformers"))


if __name__ == "__main__":
    main()
