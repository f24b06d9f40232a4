"""Does GRPO raise held-out accuracy of a tiny model? SFT cold start, evaluate, GRPO, evaluate again (one seed).

The library-level recipe the `make reason-demo` preset will wrap; numbers from it are in docs/LOG.md.

    OMP_NUM_THREADS=1 python benchmarks/reason_feasibility.py --seed 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from nanoseek.rl.sft import sft_batch, sft_step, task_examples

from nanoseek import ModelConfig, Transformer
from nanoseek.data.tasks import make_task
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.rl.evaluate import evaluate
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
from nanoseek.rl.rewards import default_rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default='{"name": "arithmetic", "digits": 1, "operators": "+-", "n_operands": 3}')
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--grpo-steps", type=int, default=200)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--format-weight", type=float, default=0.0, help="0: accuracy is the only reward")
    parser.add_argument("--loss-type", default="dapo")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    options = json.loads(args.task)
    tok, task = ByteTokenizer(), make_task(options.pop("name"), **options)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=64)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    t0 = time.time()
    for i in range(args.sft_steps):
        metrics = sft_step(model, opt, *sft_batch(tok, task_examples(task, 32, start=32 * i, seed=args.seed), 64))
    print(f"SFT: {args.sft_steps} steps, final loss {metrics['loss']:.3f}, {time.time() - t0:.0f} s")
    evaluation = dict(n=200, samples=4, max_new_tokens=48, n_examples=0)
    print("before GRPO:", evaluate(model, tok, task, **evaluation).report(), sep="\n")

    rewards = default_rewards(task)
    rewards["format"] = (rewards["format"][0], args.format_weight)
    grpo = GRPOConfig(
        group_size=8, prompts_per_step=8, max_new_tokens=48, loss_type=args.loss_type, seed=args.seed + 100
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.grpo_lr, weight_decay=0.0)
    trainer = GRPOTrainer(model, opt, tok, task, grpo, rewards)
    t0 = time.time()
    for step in range(args.grpo_steps):
        m = trainer.step()
        if step % 50 == 0 or step == args.grpo_steps - 1:
            shown = ("reward_accuracy", "zero_variance_frac", "entropy", "completion_len")
            print(step, {k: round(m[k], 3) for k in shown}, f"{time.time() - t0:.0f} s")
    print("after GRPO:", evaluate(model, tok, task, **evaluation).report(), sep="\n")


if __name__ == "__main__":
    main()
