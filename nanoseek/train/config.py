"""The [train] section: batch, schedule, optimizer, evaluation, checkpoints, precision, parallelism and failure
handling. Every stage runs on the one engine, so every key here means the same in pretraining, SFT and GRPO."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.schema import check_choice, require, require_finite, require_int

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
ON_NAN = ("stop", "skip")
PARALLEL = ("ddp", "fsdp")
MAX_STEPS = 10**9
"""Most steps of a stage (a billion; the schedule and counters are exact far beyond it)."""
MAX_COUNT = 2**20
"""Most examples per micro-batch, micro-batches per update, evaluation batches or checkpoints kept: larger values
are typos (memory is checked separately, before anything is allocated: nanoseek.train.bounds)."""


@dataclass
class TrainConfig:
    """The optimisation: batch, schedule, optimiser, evaluation, checkpoints, precision, parallelism and failure
    handling — the same meaning in every stage (pretraining, SFT, GRPO, distillation)."""

    steps: int = 200
    """Steps of the stage (the lr schedule is laid out over them). A GRPO step makes grpo.mu optimizer updates."""
    max_time: float = 0.0
    """Stop after this many seconds of training (0 = no time budget); a checkpoint is written at the stop."""
    max_flops: float = 0.0
    """Stop once the run's cumulative analytic FLOPs reach this (0 = no compute budget): arms compared at equal
    compute stop at the same FLOPs whatever their steps cost."""
    batch_size: int = 16
    """Examples per micro-batch per process: token windows (pretraining), prompt + completion pairs (SFT), prompts
    (GRPO, each with grpo.group_size sampled completions)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer update; global batch = batch_size × grad_accum × processes."""
    optimizer: str = "adamw"
    """adamw, or muon (torch.optim.Muon on 2-D block weight matrices, AdamW on everything else, as modded-nanogpt)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, and Muon with its RMS-matching adjustment)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine and wsd)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """cosine decay after warm-up; wsd (warmup-stable-decay: constant, then linear decay over decay_fraction); or
    constant (after warm-up, the peak lr throughout: what RL stages usually want)."""
    decay_fraction: float = 0.2
    """Share of the steps spent decaying in the wsd schedule."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices (never on norms, biases, gates or embeddings unless
    decay_embeddings)."""
    decay_embeddings: bool = False
    """Apply weight decay to the embedding / LM head too."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    eval_every: int = 50
    """Evaluate every this many steps (and at the end): validation loss in pretraining and SFT, greedy accuracy on
    held-out problems in the reasoning stages."""
    eval_batches: int = 8
    """Batches of batch_size examples per evaluation (the same examples every time)."""
    diag_every: int = 50
    """Residual gain diagnostics every this many steps for hc / mhc (0 = never)."""
    ckpt_every: int = 0
    """Write a checkpoint every this many steps (0 = only at the end, on Ctrl-C / SIGTERM and at the time budget)."""
    keep_last: int = 2
    """Checkpoints kept in the run folder (older ones are deleted after a new one is complete)."""
    seed: int = 0
    """Seeds the weights, the data windows, the training problems and the sampling."""
    dtype: str = "float32"
    """float32, or bfloat16 (autocast for the matmuls; weights, optimizer and residual coefficients stay fp32)."""
    compile: bool = False
    """torch.compile the model (the first step's compile time is reported separately); GRPO and on-policy
    distillation also generate with the compiled decode step (``generate(compile=True)``)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    parallel: str = "ddp"
    """With several processes (torchrun): ddp (DistributedDataParallel, every process holds the whole model) or
    fsdp (FSDP2's fully_shard on every block and the root: parameters, gradients and optimizer states sharded)."""
    on_nan: str = "stop"
    """When the loss, the gradient or the updated weights are not finite: stop (with a message naming the step;
    no checkpoint is written from the poisoned weights) or skip the step (the update is undone)."""
    threads: int = 0
    """torch CPU threads (0 = automatic: see nanoseek.train.threads)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "keep_last"):
            require_int(name, getattr(self, name), 1, MAX_STEPS if name in ("steps", "eval_every") else MAX_COUNT)
        for name in ("warmup_steps", "diag_every", "ckpt_every", "threads", "seed"):
            require_int(name, getattr(self, name), 0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("parallel", self.parallel, PARALLEL)
        check_choice("on_nan", self.on_nan, ON_NAN)
        # above ~1e37 Adam's step size (lr / (1 - beta1^t)) overflows float32; no optimizer here is stable near 1e3
        ok = isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and 0 < self.lr <= 1e3
        require(ok, "lr", self.lr, "expected a finite number in (0, 1000]")
        require_finite("max_time", self.max_time, 0)
        require_finite("max_flops", self.max_flops, 0)
        require_finite("weight_decay", self.weight_decay, 0)
        require_finite("grad_clip", self.grad_clip, 0)
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "expected a number in [0, 1]")
        require(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "expected a number in (0, 1]")
        require(0 <= self.beta1 < 1, "beta1", self.beta1, "expected a number in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", self.beta2, "expected a number in [0, 1)")
        require(self.warmup_steps <= self.steps, "warmup_steps", self.warmup_steps, f"must be <= steps={self.steps}")
        if self.parallel == "fsdp" and self.optimizer == "muon":
            raise ValueError(
                "optimizer='muon' is invalid with parallel='fsdp': Muon orthogonalises whole matrices and FSDP "
                "shards them; use parallel='ddp' with Muon"
            )
