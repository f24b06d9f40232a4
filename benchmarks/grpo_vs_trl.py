"""Seconds per GRPO step: nanoseek's GRPO stage vs TRL's GRPOTrainer, same model shape, prompts and settings.

Setup (DESIGN.md §5 peer numbers): a random Llama-shaped model — width 256, FFN 688, 4 layers, 4 heads, tied
embeddings, a 49-token character vocabulary (≈ 3.2M parameters) — 4 prompts × 8 completions per step, at most
32 new tokens, loss "dapo", β = 0 (no reference model), one update per batch, temperature 1, plain fp32 on CPU.
Prompts are arithmetic problems in the compact R1-Zero template, rewards are accuracy + 0.1 × format. Both stop a
completion at the end-of-text token only. The TRL model is saved to a local folder first and the hub is switched
off (HF_HUB_OFFLINE=1), so nothing is downloaded.

Reported: median seconds per step after warm-up steps, for each, and the ratio nanoseek / TRL (goal ≤ 0.2).
Needs the ``bench`` extra, installed with torch pinned so pip keeps the CPU build:
    .venv/bin/pip install -e ".[bench]" torch==2.13.0

    python benchmarks/grpo_vs_trl.py [--steps 12] [--warmup 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from common import add_json_argument, load_average, row, write_json

from nanoseek import ModelConfig, Transformer
from nanoseek.data.tasks import make_task
from nanoseek.data.templates import render_prompt
from nanoseek.rl.grpo import GRPO, GRPOConfig
from nanoseek.rl.rewards import accuracy_reward, format_reward
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine

CHARS = "0123456789+-*/=()<>\n abcdefghijklmnopqrstuvwxyz"  # 47 characters, then <pad> and <eos>: 49 tokens
PAD, EOS = len(CHARS), len(CHARS) + 1
WIDTH, FFN, LAYERS, HEADS, SEQ = 256, 688, 4, 4, 128
PROMPTS, GROUP, NEW_TOKENS, LR = 4, 8, 32, 1e-5


class CharTokenizer:
    """One token per character of CHARS; unknown characters are an error (the prompts use CHARS only)."""

    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return [CHARS.index(ch) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(CHARS[i] if i < len(CHARS) else "" for i in ids)


def problems(n: int):
    task = make_task("arithmetic", digits=2, operators="+-")
    return task, [task.problem("train", 0, i) for i in range(n)]


def median_step(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def matmul_flops_per_second() -> float:
    """This machine's fp32 matmul rate at this model's shapes (median of repeats), for the compute floor."""
    a, b = torch.randn(1280, WIDTH), torch.randn(WIDTH, FFN)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * a.shape[0] * WIDTH * FFN / statistics.median(times)


def run_nanoseek(steps: int) -> tuple[list[float], list[float], float]:
    """Seconds per step, the seconds of each spent sampling and scoring, and the mean training FLOPs of a step
    (forward + backward over every prompt and completion token, Transformer.flops_per_token)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=EOS + 1, d_model=WIDTH, n_layers=LAYERS, n_heads=HEADS, ffn_hidden=FFN, seq_len=SEQ, norm_eps=1e-6
    )
    train = TrainConfig(lr=LR, weight_decay=0.0, warmup_steps=0, schedule="constant", batch_size=PROMPTS)
    engine = Engine(Transformer(cfg), train, log=lambda message: None)
    model = engine.model
    task, _ = problems(1)
    task.template, task.max_new_tokens, task.stop = "compact", NEW_TOKENS, ()
    rewards = {"accuracy": (accuracy_reward(task), 1.0), "format": (format_reward, 0.1)}
    trainer = GRPO(engine, CharTokenizer(), task, GRPOConfig(group_size=GROUP, loss_type="dapo", beta=0.0), rewards)
    prompt_len = statistics.mean(len(render_prompt("compact", p.question)) for p in problems(PROMPTS * steps)[1])
    times, generation, tokens = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        metrics = trainer.step()
        times.append(time.perf_counter() - t0)
        generation.append(PROMPTS * GROUP * metrics["completion_len"] / metrics["gen_tokens_per_s"])
        tokens.append(PROMPTS * GROUP * (prompt_len + metrics["completion_len"]))
    print(f"nanoseek: {model.num_params() / 1e6:.2f}M parameters")
    return times, generation, statistics.mean(tokens) * model.flops_per_token(int(prompt_len) + NEW_TOKENS)


def run_trl(steps: int) -> tuple[list[float], str]:
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    vocab = {ch: i for i, ch in enumerate(CHARS)} | {"<pad>": PAD, "<eos>": EOS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.padding_side = "left"
    config = LlamaConfig(
        vocab_size=EOS + 1,
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    task, probs = problems(PROMPTS * (steps + 2))
    data = Dataset.from_list([{"prompt": render_prompt("compact", p.question), "target": p.answer} for p in probs])
    accuracy = accuracy_reward(task)

    def trl_accuracy(prompts, completions, target, **_):
        return accuracy(prompts, completions, target=[int(t) for t in target])

    def trl_format(prompts, completions, **_):
        return format_reward(prompts, completions)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(f"{folder}/model")
        tokenizer.save_pretrained(f"{folder}/model")
        args = TRLConfig(
            output_dir=f"{folder}/out",
            per_device_train_batch_size=PROMPTS * GROUP,
            num_generations=GROUP,
            max_completion_length=NEW_TOKENS,
            learning_rate=LR,
            loss_type="dapo",
            beta=0.0,
            num_iterations=1,
            temperature=1.0,
            reward_weights=[1.0, 0.1],
            max_steps=steps,
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            report_to="none",
            logging_steps=1000,
            disable_tqdm=True,
            seed=0,
        )
        trainer = TRLTrainer(
            model=f"{folder}/model",
            reward_funcs=[trl_accuracy, trl_format],
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    return timer.times, f"TRL {trl.__version__} (transformers {transformers.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    add_json_argument(parser)
    args = parser.parse_args()
    load = load_average()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    ours, generation, train_flops = run_nanoseek(args.steps)
    theirs, version = run_trl(args.steps)
    rate = matmul_flops_per_second()
    a, b, gen = median_step(ours, args.warmup), median_step(theirs, args.warmup), median_step(generation, args.warmup)
    n = args.steps - args.warmup
    print(f"nanoseek: {a:.3f} s/step, median of {n} (generation {gen:.3f} s, the rest {a - gen:.3f} s)")
    print(f"{version}: {b:.3f} s/step, median of {n}")
    print(f"ratio nanoseek / TRL: {a / b:.2f} (goal <= 0.20)")
    print(
        f"compute floor of the update alone: {train_flops / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s "
        f"(this machine's matmul rate now) = {train_flops / rate:.3f} s, {train_flops / rate / b:.2f} of TRL's step"
    )
    rows = [
        row("nanoseek / TRL seconds per step", a / b, "×"),
        row("nanoseek step / compute floor of its update", a / (train_flops / rate), "×"),
    ]
    write_json(args.json, "grpo_vs_trl", rows, load, torch.get_num_threads())


if __name__ == "__main__":
    main()
