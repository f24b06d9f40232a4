"""The ``nanoseek`` command: one subcommand per stage. It only wires arguments to the library."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import nanoseek

EPILOG = """examples:
  nanoseek train --preset demo                       train the demo model on the embedded Python docs
  nanoseek train --preset tiny --set model.residual=mhc --out runs/mhc
  nanoseek train --preset tiny --data my_texts/      train on your own text files (a file or a folder)
  nanoseek train --resume --out runs/mhc             continue the newest checkpoint in runs/mhc exactly
  torchrun --nproc_per_node=2 -m nanoseek train --preset tiny      data-parallel on 2 processes
  nanoseek sample --ckpt runs/demo --prompt "The with statement"
  nanoseek config --preset demo                      every key of a config, with its value and what it means
  nanoseek compare --preset demo                     baseline vs hc vs mhc vs muon: compute, time, energy to reach
  nanoseek export --ckpt runs/demo --out hf/demo     a transformers model folder (and back: --init hf:hf/demo)
  nanoseek serve --ckpt runs/sft                     OpenAI-compatible API + web chat on http://127.0.0.1:8000/
  nanoseek chat --ckpt runs/sft                      chat in the terminal
"""

COMPARE_EPILOG = """The comparison file (TOML) has [compare] (seeds, baseline, budget, target_loss, watts_per_core,
price_per_hour), the common base run config [base.model] / [base.data] / [base.train], and one table of overrides
per arm, e.g. [arms.mhc] with model.residual = "mhc". The shipped ones: nanoseek config --list.

examples:
  nanoseek compare --preset smoke                    2 arms × 2 seeds, about a minute
  nanoseek compare --preset demo                     4 arms × 3 seeds, ≤ 20 minutes on 2 cores
  nanoseek compare --preset demo --report-only       rebuild report.md / report.json / plots from the cached runs
  nanoseek compare --config my.toml --set train.steps=400 --target-loss 1.9 --out runs/mine
"""


def add_config_args(p: argparse.ArgumentParser, kind: str = "") -> None:
    from nanoseek.config import preset_names

    names = ", ".join(preset_names(kind)) or "none"
    p.add_argument("--preset", help=f"a config shipped with nanoseek ({names})")
    p.add_argument("--config", action="append", default=[], metavar="FILE.toml", help="config file(s), merged in order")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value, e.g. --set model.residual=mhc --set train.lr=1e-3 (repeatable; "
        "`nanoseek config` lists every key)",
    )


def _config_files(args: argparse.Namespace, kind: str = "") -> list[Path]:
    from nanoseek.config import preset_path

    return ([preset_path(args.preset, kind)] if args.preset else []) + [Path(c) for c in args.config]


def _data_override(args: argparse.Namespace) -> list[str]:
    """--data PATH as the override data.source (quoted as a TOML string, so any path works)."""
    if getattr(args, "data", None) is None:
        return []
    return [f"data.source={json.dumps(str(args.data))}"]


def _observers(cfg) -> dict:
    """What measure/ hands to the engine: the energy meter and the provenance of the run."""
    import torch

    from nanoseek.measure.energy import select_meter
    from nanoseek.measure.provenance import provenance

    want = cfg.train.device
    device = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
    return {"meter": select_meter(device), "info": {"provenance": provenance()}}


def _exit_code(summary: dict) -> int:
    """0 for a run that reached its steps or its time budget; 130 / 143 (as shells expect) when a signal stopped it."""
    if summary.get("stop_reason") != "interrupted":
        return 0
    return 143 if summary.get("signal") == "SIGTERM" else 130


def _report(summary: dict) -> int:
    from nanoseek.train.distributed import setup

    if setup("cpu").main:
        print(json.dumps(summary, indent=1))
    return _exit_code(summary)


def cmd_train(args: argparse.Namespace) -> int:
    from nanoseek.config import checkpoint_config, load_run_config
    from nanoseek.train.pretrain import pretrain

    out = Path(args.out or f"runs/{args.preset or 'run'}")
    if args.resume:
        if args.preset or args.config or args.data:
            raise ValueError("--resume takes its config and data from the checkpoint; pass only --set overrides")
        out = out if args.resume is True else Path(args.resume)
        cfg = checkpoint_config(out, args.set)
    else:
        cfg = load_run_config(_config_files(args), _data_override(args) + args.set)
    summary = pretrain(
        cfg, out, resume=bool(args.resume), progress=not args.no_progress, allow_changed_inputs=args.allow_data_change,
        **_observers(cfg),
    )  # fmt: skip
    return _report(summary)


def cmd_sample(args: argparse.Namespace) -> int:
    from nanoseek.train.sampling import sample_text

    for text in sample_text(
        args.ckpt, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, args.num_samples
    ):
        print(text)
        print("-" * 40)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from nanoseek.config import preset_names
    from nanoseek.data.config import DataConfig
    from nanoseek.data.loader import load_token_data
    from nanoseek.measure.provenance import provenance

    info = provenance()
    data = load_token_data(DataConfig(source=args.data), seq_len=1)
    info["corpus"] = data.metadata
    info["presets"] = {kind or "train": preset_names(kind) for kind in ("", "sft", "grpo", "distill", "compare", "r1")}
    print(json.dumps(info, indent=1))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from nanoseek.config import describe, load_run_config, preset_names

    if args.list:
        for kind in ("", "sft", "grpo", "distill", "compare", "r1"):
            print(f"{kind or 'train'}: {', '.join(preset_names(kind))}")
        return 0
    kind, _, name = (args.preset or "").rpartition("/")
    args.preset = name or None
    extra = ["task.name='arithmetic'", "grpo.mu=1"] if args.all else []
    cfg = load_run_config(_config_files(args, kind), extra + _data_override(args) + args.set)
    print(describe(cfg))
    return 0


def _stage_config(args: argparse.Namespace, kind: str):
    """Config of an sft / grpo run: on --resume the checkpoint's (plus --set); else preset and --config files, then
    --task and --set, with the [model] and [data] of --init's checkpoint, which the weights must match."""
    from nanoseek.config import checkpoint_config, load_run_config

    overrides = ([f"task.name={args.task!r}"] if args.task else []) + args.set
    if args.resume:
        if args.preset or args.config or args.init:
            raise ValueError("--resume takes its config and weights from --out; pass only --set overrides with it")
        return checkpoint_config(args.out, overrides)
    if args.init is None:
        return load_run_config(_config_files(args, kind), overrides)
    if any(o.strip().startswith(("model.", "data.")) for o in args.set):
        raise ValueError("--set model.* / data.* cannot change a model loaded with --init")
    init = checkpoint_config(args.init)
    base = {k: v for k, v in init.to_dict().items() if k not in ("model", "data")}
    cfg = load_run_config(_config_files(args, kind), overrides, base=base)
    cfg.model, cfg.data = init.model, init.data
    return cfg


def cmd_sft(args: argparse.Namespace) -> int:
    from nanoseek.rl.stages import run_sft

    if args.data is not None:
        args.set = [f"sft.data={json.dumps(str(args.data))}", *args.set]
    cfg = _stage_config(args, "sft")
    options = {"progress": not args.no_progress, **_observers(cfg)}
    return _report(run_sft(cfg, args.out, init=args.init, resume=args.resume, **options))


def cmd_grpo(args: argparse.Namespace) -> int:
    from nanoseek.rl.stages import run_grpo

    cfg = _stage_config(args, "grpo")
    options = {"progress": not args.no_progress, **_observers(cfg)}
    return _report(run_grpo(cfg, args.out, init=args.init, resume=args.resume, **options))


def cmd_distill(args: argparse.Namespace) -> int:
    from nanoseek.config import checkpoint_config
    from nanoseek.rl.stages import run_distill

    if not args.resume and bool(args.student) == bool(args.preset or args.config):
        raise ValueError("give the student as exactly one of --student CKPT or --preset NAME / --config FILE.toml")
    distill = [f"distill.mode={args.mode!r}"] if args.mode else []
    if args.teacher:
        distill.append(f"distill.teacher={json.dumps(str(args.teacher))}")
    args.init, args.set = args.student, [*distill, *args.set]
    cfg = _stage_config(args, "distill")
    if cfg.task is None and args.teacher:  # the teacher's task, when neither the student nor the config names one
        teacher = checkpoint_config(args.teacher)
        cfg.task = teacher.task
    options = {"progress": not args.no_progress, **_observers(cfg)}
    return _report(run_distill(cfg, args.out, init=args.student, resume=args.resume, **options))


def cmd_eval(args: argparse.Namespace) -> int:
    from nanoseek.config import checkpoint_config, load_run_config
    from nanoseek.rl.stages import run_eval

    task = None
    if args.task or args.set:
        if any(not o.strip().startswith("task.") for o in args.set):
            raise ValueError("eval takes only --set task.KEY=VALUE overrides")
        cfg = checkpoint_config(args.ckpt)
        base = {"task": cfg.to_dict()["task"]} if cfg.task is not None and not args.task else {}
        overrides = ([f"task.name={args.task!r}"] if args.task else []) + args.set
        task = load_run_config([], overrides, base=base).task
    result = run_eval(args.ckpt, task=task, n=args.n, samples=args.samples, seed=args.seed, pass_at=args.pass_at_k)
    if args.json:
        print(json.dumps({"task": result.task, "n": result.n, "samples": result.samples, **result.metrics()}))
    else:
        print(result.report())
    return 0


def _k_list(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 1,4,16,64"
        ) from None
    if not ks or ks[0] < 1 or ks[-1] > 4096:
        raise argparse.ArgumentTypeError(f"{text!r}: every k must be in 1..4096")
    return ks


def _add_stage_args(p: argparse.ArgumentParser, kind: str) -> None:
    add_config_args(p, kind)
    p.add_argument("--task", help="task name (arithmetic, countdown, gsm); options via --set task.KEY=VALUE")
    p.add_argument("--out", required=True, help="run folder for metrics.jsonl, summary.json and ckpt-*")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint of --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_compare(args: argparse.Namespace) -> int:
    from nanoseek.config import preset_path
    from nanoseek.measure.arms import load_comparison
    from nanoseek.measure.compare import run_comparison
    from nanoseek.measure.report import render_headline

    if bool(args.preset) == bool(args.config):
        raise ValueError("give exactly one of --preset NAME or --config FILE.toml")
    path = preset_path(args.preset, "compare") if args.preset else Path(args.config)
    comparison = load_comparison(path, _data_override(args) + args.set, args.target_loss)
    out = Path(args.out or f"runs/compare-{comparison.name}")
    report = run_comparison(comparison, out, report_only=args.report_only, progress=not args.no_progress)
    if report is None:
        print("nanoseek compare: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    print(render_headline(report))
    print(f"full report: {out / 'report.md'} (and report.json, plots, every run in {out / 'runs'})")
    return 0


def cmd_r1_demo(args: argparse.Namespace) -> int:
    from nanoseek.config import preset_path
    from nanoseek.measure.r1demo import main_r1
    from nanoseek.schema import parse_override

    overrides = {}
    for text in args.set:
        section, key, value = parse_override(text)
        if section != "r1":
            raise ValueError(f"--set {text!r}: r1-demo takes only r1.KEY=VALUE (see nanoseek/presets/r1/)")
        overrides[key] = value
    out = Path(args.out or f"runs/r1-{args.preset}")
    return main_r1(preset_path(args.preset, "r1"), out, overrides, args.report_only)


def cmd_export(args: argparse.Namespace) -> int:
    from nanoseek.interop.hf_export import export

    done = export(args.ckpt, args.out, stock_only=args.stock_only)
    print(f"wrote {done.folder}: {done.architecture}")
    if done.remote_code:
        print(f"  no stock class computes {'; '.join(done.reasons)}: the folder carries nanoseek's modelling code")
        print("  load with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) (and AutoTokenizer)")
    return 0


def cmd_reason_demo(args: argparse.Namespace) -> int:
    from nanoseek.rl.demo import run_demo

    run_demo(Path(args.out), args.seeds, args.n, args.samples, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Talking to a model: serve and chat

SERVE_EPILOG = """examples:
  make chat-demo                                    train a small reasoning model (~4 min), serve it
  nanoseek serve --ckpt runs/chat-demo              then open http://127.0.0.1:8000/
  nanoseek serve --ckpt runs/demo --port 8001 --api-key s3cret
  curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "3+4-2"}], "stream": true}'
  any OpenAI client: base_url="http://127.0.0.1:8000/v1" (the model id is the run folder's name: GET /v1/models)

The API key may also come from the environment variable NANOSEEK_API_KEY. Binding to an address other than
127.0.0.1 / localhost without a key prints a warning: anyone who can reach the port can use the model.
"""

CHAT_EPILOG = """examples:
  nanoseek chat --ckpt runs/chat-demo
  nanoseek chat --ckpt runs/demo -p "The with statement" --max-tokens 80

In the chat: /set temperature 0.7 (also top_p, top_k, max_tokens, seed), /show, /clear, /bye. End a line with
a backslash to continue the message on the next line.
"""


def _device(choice: str) -> str:
    import torch

    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from nanoseek.config import checkpoint_config

    try:
        import uvicorn

        from nanoseek.serve.app import ServeOptions, create_app
        from nanoseek.serve.protocol import Prices
    except ImportError as err:
        raise ValueError(
            f"serving needs the serve extra ({err.name} is missing): pip install 'nanoseek[serve]'"
        ) from None
    from nanoseek.train.load import load_model

    checkpoint_config(args.ckpt)  # a wrong path or a broken checkpoint stops here, before the server starts
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"nanoseek serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)  # fmt: skip
    options = ServeOptions(
        model_name=args.model_name, api_key=key, max_batch=args.max_batch, max_queue=args.max_queue,
        prices=Prices(args.price_input, args.price_output, args.price_per_hour), cors_origins=tuple(args.cors_origin),
        compile=args.compile, generation=args.generation,
    )  # fmt: skip
    from functools import partial

    from nanoseek.measure.energy import select_meter

    device = _device(args.device)
    load = partial(load_model, args.ckpt, device=device)  # picklable: the generation process loads it too
    app = create_app(load, options, select_meter(device, args.watts_per_core))
    print(f"nanoseek serve: http://{args.host}:{args.port}/ (web chat), API at /v1", file=sys.stderr)
    # uvicorn finishes running answers on SIGTERM, then re-raises the signal: with the default handler back, the
    # process ends by it (143 in a shell), as servers under a supervisor are expected to
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.grace)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from nanoseek.measure.energy import select_meter
    from nanoseek.serve.chat import run_chat

    return run_chat(args, meter=select_meter("cpu", args.watts_per_core))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--watts-per-core", type=float, default=5.0, help="for the energy estimate without RAPL / NVML")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="DeepSeek's recipe (mHC, DeepSeekMoE, GRPO) small, readable and measured.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nanoseek {nanoseek.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="pretrain a language model",
        description="Pretrain a transformer LM. Config = preset, then --config files, then --set overrides. "
        "Writes metrics.jsonl, run.json, summary.json and checkpoints (ckpt-*) into --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--data", metavar="PATH", help="train on this text file or folder of text files (= data.source)")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="DIR",
        help="continue exactly from the newest checkpoint of --out (or of DIR)",
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue although the corpus's SHA-256 differs from the checkpoint's (refused otherwise)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint", description="Generate text with the KV cache.")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, a run folder (its newest checkpoint), or hf:DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "sft",
        help="supervised cold start on a reasoning task",
        description="Supervised fine-tuning on a task's train split (prompt + ideal think/answer completion, loss on "
        "the completion only), from --init CKPT or from scratch (a fresh model from [model]). Steps, batch, lr "
        "schedule, precision and everything else the engine does come from [train]; the task, its prompt template "
        "and token budget from [task] / --task. Evaluations log held-out loss and greedy accuracy.",
        epilog="examples:\n  nanoseek sft --preset demo --out runs/sft\n"
        "  nanoseek sft --init runs/pretrained --task arithmetic --set train.steps=500 --out runs/sft",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_stage_args(p, "sft")
    p.add_argument(
        "--init",
        help="start from this checkpoint (or run folder, or hf:DIR: a Hugging Face model) instead of a fresh model",
    )
    p.add_argument(
        "--data",
        metavar="FILE.jsonl",
        help="learn from this JSONL file of prompt / completion rows (e.g. `nanoseek distill` traces) instead of the "
        "task's examples (= sft.data)",
    )
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "grpo",
        help="reinforcement learning with GRPO and its variants",
        description="GRPO (DESIGN.md §5) from --init CKPT: per step, sample grpo.group_size completions for each of "
        "train.batch_size × train.grad_accum training problems, reward them by rule, make grpo.mu updates on the "
        "engine ([train]: optimizer, lr schedule — the demo preset's is constant — clipping, bf16, ...). Per-step "
        "metrics in metrics.jsonl: reward mean/std, accuracy, format rate, completion length, KL, clip fraction, "
        "zero-variance fraction, entropy, generation and training tokens/s; held-out greedy accuracy at every "
        "evaluation.",
        epilog="examples:\n  nanoseek grpo --init runs/sft --preset demo --out runs/grpo\n"
        "  nanoseek grpo --init runs/sft --task arithmetic --set grpo.loss_type=dapo --set grpo.epsilon_high=0.28 "
        "--out runs/dapo\n  nanoseek grpo --resume --out runs/grpo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_stage_args(p, "grpo")
    p.add_argument("--init", help="the checkpoint (or run folder, or hf:DIR) to start from, e.g. an SFT run")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser(
        "distill",
        help="distil a teacher into a student: rejection-sampled traces + SFT, or on-policy",
        description="Distillation (R1 §4.1; Qwen3's on-policy distillation). --mode traces: the teacher samples "
        "distill.samples completions of distill.problems training problems, the verifier keeps the right ones "
        "(OUT/traces.jsonl, its cost in OUT/traces.json), and the student is fine-tuned on them. --mode on-policy: "
        "the student samples, the teacher scores every token, and the advantage of a token is "
        "-(log p_student - log p_teacher). The student's optimisation is [train]'s, the task [task]'s (default: the "
        "teacher's).",
        epilog="examples:\n  nanoseek distill --teacher runs/teacher --student runs/sft --mode traces --out runs/d1\n"
        "  nanoseek distill --teacher runs/teacher --preset demo --mode on-policy --out runs/d2\n"
        "  nanoseek sft --init runs/sft --data runs/d1/traces.jsonl --out runs/d3     the traces with plain SFT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_stage_args(p, "distill")
    p.add_argument("--teacher", help="the teacher checkpoint (or run folder)")
    p.add_argument("--student", help="start the student from this checkpoint (else a fresh model from --preset)")
    p.add_argument("--mode", choices=("traces", "on-policy"), help="= distill.mode (default traces)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "eval",
        help="accuracy of a checkpoint on a task's test split",
        description="pass@1 greedy, pass@1 sampled, maj@k and (with --pass-at-k) pass@k on the first --n test "
        "problems, with 95%% Wilson intervals, and a few example completions. Task, template and token budget default "
        "to the checkpoint's.",
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, a run folder (its newest checkpoint), or hf:DIR")
    p.add_argument("--task", help="task name (default: the checkpoint's [task])")
    p.add_argument("--set", action="append", default=[], metavar="task.KEY=VALUE", help="task option override")
    p.add_argument("--n", type=int, default=200, help="test problems (default 200)")
    p.add_argument("--samples", type=int, default=4, help="k samples per problem for pass@1 sampled and maj@k")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument(
        "--pass-at-k",
        type=_k_list,
        default=(),
        metavar="K,K,...",
        help="also pass@k for these k (e.g. 1,4,16,64), unbiased estimator of Chen et al. 2021 from one set of "
        "max(k) samples per problem (raises --samples to the largest k)",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compare",
        help="the efficiency table: compute, time, energy and cost to reach the same quality, arm vs baseline",
        description="Train every arm of a comparison over its seeds (cached: finished runs are reused, interrupted "
        "ones resumed) and write report.md, report.json and plots into --out: compute, time, energy and cost to "
        "reach the baseline's final validation loss, mean ± 95 %% CI over seeds.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", help="a comparison shipped with nanoseek (smoke, demo, recipe)")
    p.add_argument("--config", metavar="FILE.toml", help="a comparison file")
    p.add_argument("--data", metavar="PATH", help="every arm trains on this text file or folder (= data.source)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value of the base run config (all arms), e.g. --set train.steps=400 (repeatable)",
    )
    p.add_argument(
        "--target-loss", type=float, metavar="X", help="quality target (default: the baseline's final val loss)"
    )
    p.add_argument("--out", help="output folder (default runs/compare-<name>)")
    p.add_argument("--report-only", action="store_true", help="no training: rebuild the report from cached runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per finished run only)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face transformers model folder",
        description="Write config.json, model.safetensors, generation_config.json, tokenizer.json and "
        "tokenizer_config.json into --out, so that transformers' AutoModelForCausalLM / AutoTokenizer open it "
        "offline. Plain residual + SwiGLU -> LlamaForCausalLM (Qwen2ForCausalLM with model.qkv_bias, "
        "Qwen3ForCausalLM with model.qk_norm); plain + DeepSeekMoE -> Glm4MoeForCausalLM; anything else (HC / mHC, "
        "ReLU², ...) -> nanoseek's own modelling code in the folder (trust_remote_code=True), or an error with "
        "--stock-only. A model trained on a task gets a chat template that renders the task's prompt.",
        epilog="examples:\n  nanoseek export --ckpt runs/demo --out hf/demo\n"
        "  nanoseek export --ckpt runs/sft/ckpt-0000500 --out hf/sft --stock-only\n"
        "  nanoseek sft --init hf:hf/demo --task arithmetic --out runs/sft-again     and back (hf:DIR)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, a run folder (its newest), or hf:DIR")
    p.add_argument("--out", required=True, help="the folder to write (new or empty; never overwritten)")
    p.add_argument("--stock-only", action="store_true", help="refuse models that need nanoseek's modelling code")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "config",
        help="print a resolved config with every key's meaning",
        description="Print the config a preset (and --config files, --set overrides) resolves to, as TOML, every key "
        "preceded by its docstring. Stage presets are named with their folder: sft/demo, grpo/demo.",
        epilog="examples:\n  nanoseek config --preset demo\n  nanoseek config --preset grpo/demo --set grpo.mu=2\n"
        "  nanoseek config --all            the defaults of every section, [task] and [grpo] included\n"
        "  nanoseek config --list           the shipped presets",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--data", metavar="PATH", help="= data.source")
    p.add_argument("--all", action="store_true", help="include the [task] and [grpo] sections")
    p.add_argument("--list", action="store_true", help="list the shipped presets")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "reason-demo",
        help="SFT cold start, then GRPO against an extra-SFT control, 3 seeds (make reason-demo)",
        description="For each seed: SFT a tiny model from scratch (preset sft/demo), evaluate it, then from that "
        "checkpoint GRPO (preset grpo/demo) and, as the control, as many extra SFT steps; evaluate both. Prints a "
        "table with 95%% Wilson intervals.",
    )
    p.add_argument("--out", default="runs/reason-demo", help="output folder (default runs/reason-demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=200, help="held-out test problems per evaluation")
    p.add_argument("--samples", type=int, default=4, help="samples per problem for pass@1 sampled and maj@k")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_reason_demo)

    p = sub.add_parser(
        "r1-demo",
        help="the R1 pipeline at laptop scale, each claim against its control (make r1-demo)",
        description="R1-Zero, cold start + RL against SFT at equal compute, distillation (traces and on-policy) "
        "against RL, process against outcome rewards, pass@k before and after RL — every arm a stage run on the "
        "engine, 3 seeds, cached (rerun to continue), then report.md / report.json / PNGs in --out with one verdict "
        "per claim. Presets: demo (≈ 30 min on 2 idle cores), full (hours), smoke (seconds; numbers mean nothing).",
    )
    p.add_argument("--preset", default="demo", help="r1 preset: demo, full or smoke (default demo)")
    p.add_argument("--set", action="append", default=[], metavar="r1.KEY=VALUE", help="override a preset value")
    p.add_argument("--out", help="output folder (default runs/r1-<preset>)")
    p.add_argument("--report-only", action="store_true", help="no training: rebuild the report from finished runs")
    p.set_defaults(func=cmd_r1_demo)

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible API and a web chat for a checkpoint",
        description="Serve a checkpoint over HTTP: POST /v1/chat/completions and /v1/completions (streamed or not, "
        "reasoning in reasoning_content), GET /v1/models, /health, /metrics (Prometheus) and a web chat at /. "
        "Every answer reports tokens, timings, joules and dollars. Concurrent requests are batched.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $NANOSEEK_API_KEY, else none)")
    p.add_argument("--model-name", help="the model id clients use (default: the run folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond it get 429 (default 64)")
    p.add_argument("--price-input", type=float, default=0.55, help="$ per million input tokens (DeepSeek-R1: 0.55)")
    p.add_argument("--price-output", type=float, default=2.19, help="$ per million output tokens (DeepSeek-R1: 2.19)")
    p.add_argument("--price-per-hour", type=float, default=0.10, help="$ per hour of this machine (default 0.10)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow a browser origin")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for running answers (default 30)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="decode eagerly instead of with the torch.compile'd step (which is compiled at start-up, "
                   "~20-40 s the first time, and decodes 2-3x faster on CPU)")  # fmt: skip
    p.add_argument("--generation", choices=("process", "thread"), default="process",
                   help="where the model generates: a child process of its own (default; the HTTP side and the "
                   "decode steps then run on two cores without sharing Python's interpreter lock: 1.0-1.2x a "
                   "thread's 16-client throughput on 2 cores, docs/LOG.md) or a thread of the server's process "
                   "(one interpreter and one copy of the weights instead of two)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "chat",
        help="chat with a checkpoint in the terminal",
        description="A terminal chat: streamed tokens, the thinking shown apart from the answer, history kept "
        "within the context length. -p PROMPT answers once and exits (for scripts).",
        epilog=CHAT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=0, help="0 = the checkpoint's task budget or the context left")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="machine, versions, presets and corpus statistics")
    p.add_argument("--data", default="python-docs", help="corpus to describe (default: the embedded python-docs)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nanoseek.errors import run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    return run_command(lambda: _then_leave_group(args.func(args)), f"nanoseek {args.command}", debug)


def _then_leave_group(code: int) -> int:
    """Leave torchrun's process group once a command has returned on this process (every process returns: a stop
    is agreed through a collective), then end a torchrun worker at once. A group never destroyed lets gloo's worker
    threads outlive the interpreter's teardown, which aborts the process now and then ("terminate called without an
    active exception", pytorch/pytorch#190489) and fails a finished run; with the group destroyed it happened once
    more in a clean-clone CI run (docs/LOG.md), from a thread that outlives the teardown. A worker that has returned
    has written everything it writes (checkpoints and metrics are written and closed before a command returns), so
    it flushes its output and exits with ``os._exit``, skipping the teardown, where such aborts happen (the one seen
    since could not be reproduced to confirm it was there: docs/LOG.md). After an exception the group is left alone:
    the other processes may still be inside a collective, and destroying it then can hang (torchtitan does the same)."""
    distributed = sys.modules.get("nanoseek.train.distributed")  # only a command that trained can have joined one
    if distributed is not None and distributed.teardown() > 1:  # a torchrun worker: it left a group of several
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process with ``code`` after flushing Python's output, without the interpreter's teardown."""
    import contextlib
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream has nothing left to write
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
