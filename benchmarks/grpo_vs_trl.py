"""GRPO on nanoseek vs TRL's GRPOTrainer: seconds per step and wall time to reach the same training reward.

Setup (DESIGN.md §5 peer numbers): a Llama-shaped model — width 256, FFN 688, 4 layers, 4 heads, tied embeddings, a
49-token character vocabulary (≈ 3.2M parameters) — 4 prompts × 8 completions per step, at most 32 new tokens, loss
"dapo", β = 0 (no reference model), one update per batch, temperature 1, constant learning rate, AdamW (β2 0.95, no
weight decay, gradient clipping at 1), on CPU in bf16 where the CPU has AMX (both trainers; fp32 elsewhere: with
AVX512-BF16 alone a bf16 matmul ran at 0.6× float32's speed and nanoseek's GRPO step was slower in bf16, docs/LOG.md).
Prompts are 2-digit additions and subtractions in the compact R1-Zero template; rewards are accuracy + 0.1 × format.
Both stop a completion at the end-of-text token only.

Both trainers start from the *same weights*: a cold start (supervised steps on prompt + answer block + end-of-text,
through nanoseek's engine, seed 0) so that rewards differ within groups from the first step — a random model scores 0
everywhere and neither trainer would learn. The weights go to TRL as a ``LlamaForCausalLM`` through
``nanoseek.interop.hf_weights.to_hf`` (the largest logit difference is printed). TRL reads its model from a local folder
and the hub is switched off (HF_HUB_OFFLINE=1), so nothing is downloaded. TRL's own best matching options: the same
batch, generations, loss and optimiser settings; bf16 where the CPU has AMX, as nanoseek (this script says whether it
used it). The problem streams differ (TRL shuffles its dataset with its seed; nanoseek draws from the task's
generator) but come from the same distribution.

Each trainer runs --seeds times (seeds 0.., problem order and sampling; default 3), the two taking turns: a single run's
time to the reward is mostly chance (32 completions a step), and moved between 0.43× and 0.69× TRL's in single runs. A
run ends after --steps steps, or earlier once it has reached the target and taken --min-steps steps: what would come
after changes neither its time to the reward nor, much, its median step, and TRL's slower steps are most of the
benchmark's time. Reported, for each run and as medians over the seeds: seconds per step after --warmup steps; the wall
time (sum of step times) until the mean training reward over --window consecutive steps first reaches --target (a seed
that never does counts as infinitely late, so the median says "not reached" when most did not); by default the target is
the cold-started weights' own reward (measured before either trainer starts) plus --gain, so that it lies above where
both start (a learning rate of 1e-4 raises both trainers' 10-step reward by about 0.1 within 100 steps; 3e-4 and above
make it fall); the wall time includes compiling (nanoseek) and TRL's first-step set-up once — the first run's, since
later seeds in the same process reuse its compiled graphs — and is also given without them (the first --warmup steps'
time beyond the median step); the fraction of groups whose rewards were all equal (zero variance: with β = 0 they carry
no gradient; nanoseek skips them, TRL computes them); and for nanoseek the step's compute floor: its FLOPs (generation +
update, analytic) at this machine's matmul rate in nanoseek's dtype, measured in the same run, and the ratio of the
median step to it (goal ≤ 1.5). Goal: nanoseek's time to the reward ≤ 0.2 × TRL's.

Needs the ``bench`` extra, installed with torch pinned so pip keeps the CPU build:
    .venv/bin/pip install -e ".[bench]" torch==2.13.0

    python benchmarks/grpo_vs_trl.py [--seeds 3] [--steps 100] [--min-steps 40] [--gain 0.07 | --target R]
                                     [--window 10] [--lr 1e-4] [--no-share-prompt] [--no-compile] [--no-bf16]
                                     [--overlap]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from common import (
    add_json_argument,
    cpu_bf16_units,
    cpu_has_amx,
    load_average,
    package_versions,
    require_at_least,
    require_at_least_one,
    row,
    write_json,
)

from nanoseek import ModelConfig, Transformer
from nanoseek.data.examples import TaskExamples
from nanoseek.data.tasks import make_task
from nanoseek.data.templates import render_prompt
from nanoseek.interop.hf_weights import to_hf
from nanoseek.rl.grpo import GRPO, GRPOConfig
from nanoseek.rl.rewards import accuracy_reward, format_reward
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine

CHARS = "0123456789+-*/=()<>\n abcdefghijklmnopqrstuvwxyz"  # 47 characters, then <pad> and <eos>: 49 tokens
PAD, EOS = len(CHARS), len(CHARS) + 1
WIDTH, FFN, LAYERS, HEADS, SEQ = 256, 688, 4, 4, 128
PROMPTS, GROUP, NEW_TOKENS, DIGITS = 4, 8, 32, 1
BF16 = cpu_has_amx()  # bf16 where it is the faster choice for both trainers (docs/LOG.md, 2026-12-03)


class CharTokenizer:
    """One token per character of CHARS; unknown characters are an error (the prompts use CHARS only)."""

    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return [CHARS.index(ch) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(CHARS[i] if i < len(CHARS) else "" for i in ids)


def task():
    t = make_task("arithmetic", digits=DIGITS, operators="+-")
    t.template, t.max_new_tokens, t.stop = "compact", NEW_TOKENS, ()
    return t


def model_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=EOS + 1, d_model=WIDTH, n_layers=LAYERS, n_heads=HEADS, ffn_hidden=FFN, seq_len=SEQ, norm_eps=1e-6
    )


def train_config(lr: float, **extra) -> TrainConfig:
    return TrainConfig(lr=lr, weight_decay=0.0, warmup_steps=0, schedule="constant", **extra)


def cold_start(steps: int) -> dict[str, torch.Tensor]:
    """Supervised steps on prompt + answer block + end-of-text (32 sequences a step, loss on every token), seed 0."""
    torch.manual_seed(0)
    engine = Engine(Transformer(model_config()), train_config(1e-3, batch_size=32), log=lambda message: None)
    tok, examples = CharTokenizer(), TaskExamples(task(), seed=7, targets="answers")
    for step in range(steps):
        rows = [tok.encode(p + t) + [EOS] for p, t in examples.train(step * 32, 32)]
        ids = torch.full((len(rows), max(map(len, rows))), PAD)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD, -1)  # -1: ignored by the loss
        engine.update([lambda ids=ids, targets=targets: engine.forward(ids[:, :-1], targets)[1]])
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def matmul_flops_per_second(dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul rate in ``dtype`` at this model's shapes (median of repeats), for the compute floor."""
    a, b = torch.randn(1280, WIDTH, dtype=dtype), torch.randn(WIDTH, FFN, dtype=dtype)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * a.shape[0] * WIDTH * FFN / statistics.median(times)


def compile_seconds(times: list[float], warmup: int) -> float:
    """What compiling added: the first ``warmup`` steps' time beyond that many median steps (0 when not compiled)."""
    return max(0.0, sum(times[:warmup]) - warmup * statistics.median(times[warmup:]))


def compile_split(times: list[float], sampling: list[float], warmup: int) -> tuple[float, float]:
    """``compile_seconds`` of the sampling part of each step and of the rest (the update): which side paid the
    first steps' extra time (a decode step built or traced, or the update's forward traced)."""
    update = [t - g for t, g in zip(times, sampling, strict=True)]
    return compile_seconds(sampling, warmup), compile_seconds(update, warmup)


def steps_to_reward(rewards: list[float], target: float, window: int) -> int | None:
    """Steps taken at the end of the first window of steps whose mean reward reaches target (None: not yet)."""
    for end in range(window, len(rewards) + 1):
        if statistics.mean(rewards[end - window : end]) >= target:
            return end
    return None


def time_to_reward(times: list[float], rewards: list[float], target: float, window: int) -> float | None:
    """Wall time (sum of step times) at the end of the first window of steps whose mean reward reaches target."""
    end = steps_to_reward(rewards, target, window)
    return None if end is None else sum(times[:end])


def run_is_done(rewards: list[float], a: argparse.Namespace) -> bool:
    """Whether a run may stop before --steps: it has reached the target and taken --min-steps steps (never with
    --min-steps 0). The steps after that would change neither its time to the reward nor, much, its median step."""
    return a.min_steps > 0 and len(rewards) >= a.min_steps and steps_to_reward(rewards, a.target, a.window) is not None


START_SEED = 1000  # the start reward's problems: a seed no run uses (runs use 0 .. --seeds - 1)


def median_reached(times: list[float | None]) -> float | None:
    """Median of the seeds' times to the reward, a seed that never reached it counting as infinitely late (None
    when the median is: most seeds did not reach it)."""
    median = statistics.median(math.inf if t is None else t for t in times)
    return None if math.isinf(median) else median


def start_reward(state: dict, batches: int = 8) -> float:
    """Mean training reward of the cold-started weights before any GRPO update: ``batches`` × 32 completions
    sampled by nanoseek's GRPO stage from another seed's problems than the runs' (the same weights start both)."""
    torch.manual_seed(0)
    model = Transformer(model_config())
    model.load_state_dict(state)
    t = task()
    rewards = {"accuracy": (accuracy_reward(t), 1.0), "format": (format_reward, 0.1)}
    trainer = GRPO(Engine(model, train_config(1e-3, batch_size=PROMPTS, seed=START_SEED), log=lambda m: None),
                   CharTokenizer(), t, GRPOConfig(group_size=GROUP), rewards)  # fmt: skip
    return statistics.mean(trainer.collect()[0][0].rewards.mean().item() for _ in range(batches))


def run_nanoseek(state: dict, a: argparse.Namespace, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = Transformer(model_config())
    model.load_state_dict(state)
    cfg = train_config(a.lr, batch_size=PROMPTS, dtype="bfloat16" if a.bf16 else "float32", compile=a.compile,
                       steps=a.steps, seed=seed)  # fmt: skip
    engine = Engine(model, cfg, log=lambda message: None)
    t = task()
    rewards = {"accuracy": (accuracy_reward(t), 1.0), "format": (format_reward, 0.1)}
    cfg = GRPOConfig(group_size=GROUP, loss_type="dapo", beta=0.0, skip_zero_advantage=not a.no_skip,
                     share_prompt=not a.no_share_prompt, overlap=a.overlap)  # fmt: skip
    trainer = GRPO(engine, CharTokenizer(), t, cfg, rewards)
    out = {"times": [], "rewards": [], "zero_var": [], "flops": [], "generation": []}
    for step in range(a.steps):
        t0 = time.perf_counter()
        metrics = trainer.step(step)
        out["times"].append(time.perf_counter() - t0)
        out["rewards"].append(metrics["reward_mean"])
        out["zero_var"].append(metrics["zero_variance_frac"])
        out["flops"].append(metrics["flops"])
        out["generation"].append(PROMPTS * GROUP * metrics["completion_len"] / metrics["gen_tokens_per_s"])
        if run_is_done(out["rewards"], a):
            break
    trainer.close()
    extra = (", bf16" if a.bf16 else "") + (", overlap" if a.overlap else "")
    out["name"] = f"nanoseek ({model.num_params() / 1e6:.2f}M parameters{extra})"
    return out


def run_trl(state: dict, a: argparse.Namespace, seed: int = 0) -> dict:
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
        vocab_size=EOS + 1, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ, tie_word_embeddings=True,
        rms_norm_eps=1e-6, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(to_hf(state, model_config()), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"weight mapping to Llama failed: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    ours = Transformer(model_config()).eval()
    ours.load_state_dict(state)
    probe = torch.randint(0, EOS + 1, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = float((ours(probe) - hf.eval()(probe).logits).abs().max())
    if seed == 0:
        print(f"same weights in both: max |Δ logits| nanoseek vs Llama = {delta:.2e}")
    t = task()
    probs = [t.problem("train", 0, i) for i in range(PROMPTS * (a.steps + 2))]
    data = Dataset.from_list([{"prompt": render_prompt("compact", p.question), "target": p.answer} for p in probs])
    accuracy = accuracy_reward(t)

    def trl_accuracy(prompts, completions, target, **_):
        return accuracy(prompts, completions, target=[int(x) for x in target])

    def trl_format(prompts, completions, **_):
        return format_reward(prompts, completions)

    class Recorder(TrainerCallback):
        def __init__(self):
            self.times, self.rewards, self.zero_var, self.start = [], [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])
                self.zero_var.append(logs.get("frac_reward_zero_std", float("nan")))
                if run_is_done(self.rewards, a):  # never reset it: the trainer sets it at max_steps
                    control.should_training_stop = True

    recorder = Recorder()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(f"{folder}/model")
        tokenizer.save_pretrained(f"{folder}/model")
        args = TRLConfig(
            output_dir=f"{folder}/out", per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
            max_completion_length=NEW_TOKENS, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
            adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, loss_type="dapo", beta=0.0, num_iterations=1,
            temperature=1.0, reward_weights=[1.0, 0.1], max_steps=a.steps, use_cpu=True, bf16=BF16,
            save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=seed,
        )  # fmt: skip
        trainer = TRLTrainer(
            model=f"{folder}/model", reward_funcs=[trl_accuracy, trl_format], args=args, train_dataset=data,
            processing_class=tokenizer, callbacks=[recorder],
        )  # fmt: skip
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the logs are recorded, not printed
        trainer.train()
    name = f"TRL {trl.__version__} (transformers {transformers.__version__}, bf16 {'on' if BF16 else 'off'})"
    return {"times": recorder.times, "rewards": recorder.rewards, "zero_var": recorder.zero_var, "name": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps per trainer (default 100)")
    parser.add_argument("--min-steps", type=int, default=40, help="a run stops once its reward has reached the "
                        "target and it has taken this many steps (default 40; 0: every run takes --steps)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time (default 3)")
    parser.add_argument("--cold-start", type=int, default=300, help="supervised steps before GRPO (default 300)")
    parser.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate of both trainers (default 1e-4; "
                        "at 3e-4 and above the reward falls, docs/LOG.md)")  # fmt: skip
    parser.add_argument("--target", type=float, default=None, help="training reward to reach (default: the "
                        "cold-started weights' own reward, measured on 256 completions, plus --gain)")  # fmt: skip
    parser.add_argument("--gain", type=float, default=0.07, help="reward gain that sets the default target (0.07)")
    parser.add_argument("--window", type=int, default=10, help="steps averaged for the reward (default 10)")
    parser.add_argument("--no-share-prompt", action="store_true", help="prefill every completion's prompt")
    parser.add_argument("--no-skip", action="store_true", help="train on zero-advantage completions too")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="nanoseek under bf16 "
                        "autocast (train.dtype); default: as TRL, on where the CPU has AMX")  # fmt: skip
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="nanoseek without train.compile "
                        "(by default the update's forward and the decode step are compiled; the compile time is in "
                        "the first steps' times and so in the time to reward)")  # fmt: skip
    parser.add_argument("--overlap", action="store_true", help="nanoseek with grpo.overlap: the next batch sampled "
                        "while this one trains (one step off-policy), each side on one torch thread, so nanoseek "
                        "uses the same two cores TRL's two threads do")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="runs per trainer, seeds 0.. (problem order and "
                        "sampling), taking turns; medians are reported (default 3: one run's time to the reward "
                        "moved 0.43-0.69x TRL's between runs)")  # fmt: skip
    parser.add_argument("--skip-trl", action="store_true", help="nanoseek only")
    add_json_argument(parser)
    a = parser.parse_args()
    if a.bf16 is None:
        a.bf16 = BF16
    require_at_least_one(parser, a, "seeds", "window")
    require_at_least(parser, a, 0, "warmup", "cold_start")
    if a.steps <= a.warmup:
        parser.error(f"--steps={a.steps} is invalid: expected more than --warmup={a.warmup}")
    if a.min_steps != 0 and not a.warmup < a.min_steps <= a.steps:
        parser.error(f"--min-steps={a.min_steps} is invalid: expected 0 or more than --warmup={a.warmup} and at "
                     f"most --steps={a.steps}")  # fmt: skip
    load = load_average()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}, "
          f"bf16 units: {cpu_bf16_units() or 'none'}, so {'bf16' if BF16 else 'float32'}")  # fmt: skip
    t0 = time.perf_counter()
    state = cold_start(a.cold_start)
    print(f"cold start: {a.cold_start} supervised steps in {time.perf_counter() - t0:.0f} s")
    if a.target is None:  # a fixed target may sit below where both trainers start: then it measures nothing
        start = start_reward(state)
        a.target = round(start + a.gain, 3)
        print(f"reward of the cold-started weights {start:.3f} (256 completions): target {a.target}")
    threads = torch.get_num_threads()
    trainers: dict[str, list[dict]] = {"nanoseek": []} if a.skip_trl else {"nanoseek": [], "TRL": []}
    for seed in range(a.seeds):  # the trainers take turns, so a slow spell of the machine hits both
        if a.overlap:
            torch.set_num_threads(1)  # two Python threads (sampling, update) of one torch thread each
        trainers["nanoseek"].append(run_nanoseek(state, a, seed))
        torch.set_num_threads(threads)
        if not a.skip_trl:
            trainers["TRL"].append(run_trl(state, a, seed))
    rate = matmul_flops_per_second(torch.bfloat16 if a.bf16 else torch.float32)
    summary = {}
    for key, runs in trainers.items():
        for seed, r in enumerate(runs):
            r["step"] = statistics.median(r["times"][a.warmup :])
            r["compile"] = compile_seconds(r["times"], a.warmup)
            split = ""
            if r.get("generation"):  # nanoseek times its sampling: say which side the first steps' extra time was on
                sampling, update = compile_split(r["times"], r["generation"], a.warmup)
                split = f": sampling {sampling:.1f} s, the update {update:.1f} s"
            got = time_to_reward(r["times"], r["rewards"], a.target, a.window)
            r["warm"] = None if got is None else got - r["compile"]
            reached = f"{got:.1f} s" if got is not None else f"not reached within {a.steps} steps"
            first, last = statistics.mean(r["rewards"][: a.window]), statistics.mean(r["rewards"][-a.window :])
            print(f"{r['name']}, seed {seed}: {r['step']:.3f} s/step (median of {len(r['times']) - a.warmup}); "
                  f"reward {first:.3f} over the first {a.window} steps, {last:.3f} over the last; zero-variance "
                  f"groups {statistics.mean(r['zero_var']):.2f}; time to reward {a.target}: {reached} (the first "
                  f"steps' extra time, compiling: {r['compile']:.1f} s{split})")  # fmt: skip
        warm = median_reached([r["warm"] for r in runs])
        compile_once = runs[0]["compile"]  # what a process pays once: later seeds reuse its compiled graphs
        summary[key] = {
            "step": statistics.median(r["step"] for r in runs),
            "zero_var": statistics.mean(x for r in runs for x in r["zero_var"]),
            "warm": warm,
            "compile": compile_once,
            "reach": None if warm is None else warm + compile_once,
        }
        got = summary[key]["reach"]
        print(f"{key}, median of {len(runs)} seed(s): {summary[key]['step']:.3f} s/step; time to reward {a.target}: "
              + (f"{got:.1f} s (the seeds' median {warm:.1f} s + {compile_once:.1f} s of compiling / set-up, paid "
                 "once per process)" if got is not None else "not reached in most seeds"))  # fmt: skip
    ours = summary["nanoseek"]
    floor = statistics.median(f for r in trainers["nanoseek"] for f in r["flops"][a.warmup :]) / rate
    gen = statistics.median(g for r in trainers["nanoseek"] for g in r["generation"][a.warmup :])
    print(f"nanoseek step: generation {gen:.3f} s{' (overlapped with the update)' if a.overlap else ''}, the rest "
          f"{ours['step'] - gen:.3f} s; compute floor (generation + "
          f"update FLOPs at {rate / 1e9:.0f} GFLOP/s, this machine's {'bf16' if a.bf16 else 'fp32'} matmul rate "
          f"now) {floor:.3f} s; "
          f"the step is {ours['step'] / floor:.1f}× its floor")  # fmt: skip
    rows = [row("nanoseek step / its compute floor", ours["step"] / floor, "×", "<= 1.5")]
    rows.append(row("nanoseek zero-variance group fraction", ours["zero_var"]))
    if "TRL" in summary:
        theirs = summary["TRL"]
        print(f"ratio nanoseek / TRL, seconds per step: {ours['step'] / theirs['step']:.2f}")
        rows.append(row("nanoseek / TRL seconds per step", ours["step"] / theirs["step"], "×"))
        rows.append(row("TRL zero-variance group fraction", theirs["zero_var"]))
        if ours["reach"] is not None and theirs["reach"] is not None:
            ratio, warm = ours["reach"] / theirs["reach"], ours["warm"] / theirs["warm"]
            print(f"ratio nanoseek / TRL, time to reward {a.target} (medians of {a.seeds} seed(s)): {ratio:.2f} (goal "
                  f"<= 0.20); without either's first-step compile / set-up time: {warm:.2f}")  # fmt: skip
            rows.append(row(f"nanoseek / TRL time to training reward {a.target}", ratio, "×", "<= 0.2"))
            rows.append(row("nanoseek / TRL time to the reward, compile time left out", warm, "×"))
            rows.append(row("nanoseek time to the reward", ours["reach"], "s"))
        else:
            who = " and ".join(k for k, v in summary.items() if v["reach"] is None)
            print(f"time to reward {a.target}: not reached by {who} in most seeds within {a.steps} steps; no ratio")
            # nanoseek missing the target misses the goal; TRL alone missing it leaves the ratio unknown
            missed = False if ours["reach"] is None else None
            rows.append(row(f"nanoseek / TRL time to training reward {a.target}",
                            f"not reached by {who} in {a.steps} steps", goal="<= 0.2", met=missed))  # fmt: skip
    versions = package_versions("trl", "transformers") if "TRL" in summary else {}
    write_json(a.json, "grpo_vs_trl", rows, load, torch.get_num_threads(), versions=versions)


if __name__ == "__main__":
    main()
