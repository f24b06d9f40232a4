"""Configuration: typed dataclasses with defaults, docstrings and early validation.

Every invalid value raises ``ValueError`` naming the field, the value and what is allowed, so a bad run fails
before any work is done rather than deep inside a tensor op.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RESIDUAL_KINDS = ("plain", "hc", "mhc")
FFN_KINDS = ("swiglu", "relu2", "moe")
MOE_DISPATCHES = ("grouped", "loop")
MHC_RES_INITS = ("identity", "uniform", "eye")
STREAM_COLLAPSES = ("mean", "sum", "learned")


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ValueError that names the offending field, its value and what would be accepted."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, name, value, f"expected one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Shape of the transformer language model and of its residual connections (DESIGN.md §3)."""

    vocab_size: int = 256
    """Number of token ids (256 for the byte tokenizer)."""
    d_model: int = 256
    """Width C of the residual stream and of every block's input and output."""
    n_layers: int = 4
    """Number of transformer blocks; each block has two residual sites (attention, FFN)."""
    n_heads: int = 4
    """Attention query heads; d_model must be divisible by it."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means n_heads (plain multi-head attention)."""
    seq_len: int = 256
    """Longest context the model is trained on (rotary tables are built for it)."""
    ffn: str = "swiglu"
    """Feed-forward kind: swiglu (gated SiLU), relu2 (squared ReLU) or moe (DeepSeekMoE, DESIGN.md §4: shared +
    routed SwiGLU experts; blocks below first_k_dense keep a dense SwiGLU)."""
    ffn_hidden: int = 0
    """Dense FFN hidden width; 0 picks the usual size (8/3·d_model rounded up to a multiple of 32 for swiglu and
    moe, 4·d_model for relu2), so both dense kinds have about the same parameter count."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before rotary embedding (stabilises attention logits)."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""
    residual: str = "plain"
    """Residual connection: plain (pre-norm residual), hc (Hyper-Connections, arXiv 2409.19606) or mhc
    (Manifold-Constrained Hyper-Connections, arXiv 2512.24880)."""
    n_streams: int = 4
    """Expansion rate n: number of residual streams for hc and mhc (ignored by plain)."""
    sinkhorn_iters: int = 20
    """Sinkhorn-Knopp iterations t_max for mhc's H_res (the paper uses 20)."""
    mhc_res_init: str = "identity"
    """Initial static bias b_res of mhc: identity (Sinkhorn(b_res) has diagonal 0.95, a near-residual start that
    still passes gradient), uniform (zeros: every stream mixes equally, 1/n), or eye (b_res = I: diagonal ≈ 0.475
    at n=4)."""
    mhc_gate_init: float = 0.01
    """Initial value of mhc's scalar gates α_pre, α_post, α_res (the paper's 0.01)."""
    stream_collapse: str = "mean"
    """How the n streams become one before the final norm: mean (default; keeps the plain model's scale), sum (HC's
    convention; equal after the final RMSNorm up to its epsilon), or learned (DeepSeek-V4-style dynamic weights)."""
    n_shared_experts: int = 1
    """moe: experts every token goes through (DeepSeek-V3 has 1). 0 for none."""
    n_routed_experts: int = 16
    """moe: fine-grained experts the router chooses from (DeepSeek-V3 has 256)."""
    top_k: int = 2
    """moe: routed experts per token (DeepSeek-V3 uses 8)."""
    expert_hidden: int = 0
    """moe: hidden width of each expert, shared and routed. 0 = automatic: the dense hidden width (see ffn_hidden)
    divided by n_shared_experts + top_k, rounded to a multiple of 8 (at least 8), so an MoE block has about the
    dense block's *active* parameters and FLOPs while holding (n_shared + n_routed) / (n_shared + top_k) times its
    parameters."""
    route_scale: float = 1.0
    """moe: the chosen experts' gate weights sum to this (DeepSeek-V3's routed scaling factor is 2.5)."""
    first_k_dense: int = 0
    """moe: the first k blocks keep a dense SwiGLU FFN (DeepSeek-V3 keeps 3 of 61)."""
    bias_update_rate: float = 0.001
    """moe: γ of the auxiliary-loss-free balancing, b_i <- b_i + γ·sign(mean load - load_i) after every optimizer
    step (DeepSeek-V3's 0.001); 0 freezes the biases."""
    seq_aux_loss: float = 0.0001
    """moe: α of the sequence-wise balance loss added to the training loss (DeepSeek-V3's 0.0001); 0 disables."""
    moe_dispatch: str = "grouped"
    """moe: how routed experts run. grouped: tokens sorted by expert, one torch.nn.functional.grouped_mm per
    matrix (float32 / bfloat16 / float16 only; needs d_model and expert_hidden multiples of 8). loop: one matmul
    per expert (any dtype; the reference the grouped path is tested against). Same result either way."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "n_streams", "sinkhorn_iters"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "expected an integer >= 1")
        require(self.n_kv_heads >= 0, "n_kv_heads", self.n_kv_heads, "expected 0 (= n_heads) or a positive integer")
        require(self.ffn_hidden >= 0, "ffn_hidden", self.ffn_hidden, "expected 0 (automatic) or a positive integer")
        require(
            self.d_model % self.n_heads == 0,
            "d_model",
            self.d_model,
            f"must be divisible by n_heads={self.n_heads}",
        )
        require(self.head_dim % 2 == 0, "d_model", self.d_model, "d_model / n_heads must be even for rotary embeddings")
        require(
            self.n_heads % self.kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"must divide n_heads={self.n_heads}",
        )
        check_choice("ffn", self.ffn, FFN_KINDS)
        check_choice("residual", self.residual, RESIDUAL_KINDS)
        check_choice("mhc_res_init", self.mhc_res_init, MHC_RES_INITS)
        check_choice("stream_collapse", self.stream_collapse, STREAM_COLLAPSES)
        require(self.norm_eps > 0, "norm_eps", self.norm_eps, "expected a positive number")
        require(self.init_std > 0, "init_std", self.init_std, "expected a positive number")
        require(self.rope_base > 1, "rope_base", self.rope_base, "expected a number > 1")
        self._check_moe()

    def _check_moe(self) -> None:
        for name in ("n_shared_experts", "expert_hidden", "first_k_dense"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, name, value, "expected an integer >= 0")
        for name in ("n_routed_experts", "top_k"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "expected an integer >= 1")
        require(self.route_scale > 0, "route_scale", self.route_scale, "expected a positive number")
        require(self.bias_update_rate >= 0, "bias_update_rate", self.bias_update_rate, "expected a number >= 0")
        require(self.seq_aux_loss >= 0, "seq_aux_loss", self.seq_aux_loss, "expected a number >= 0 (0 disables)")
        check_choice("moe_dispatch", self.moe_dispatch, MOE_DISPATCHES)
        if self.ffn != "moe":
            return
        require(
            self.top_k <= self.n_routed_experts,
            "top_k",
            self.top_k,
            f"must be <= n_routed_experts={self.n_routed_experts}",
        )
        require(
            self.first_k_dense < self.n_layers,
            "first_k_dense",
            self.first_k_dense,
            f"must be < n_layers={self.n_layers} so that at least one block is MoE",
        )
        if self.moe_dispatch == "grouped":  # grouped_mm needs 16-byte aligned rows, i.e. 8 bf16 values
            require(self.d_model % 8 == 0, "d_model", self.d_model, "moe_dispatch='grouped' needs a multiple of 8")
            require(
                self.expert_width % 8 == 0,
                "expert_hidden",
                self.expert_hidden,
                "moe_dispatch='grouped' needs a multiple of 8",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        """The FFN hidden width actually used."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.ffn == "relu2":
            return 4 * self.d_model
        return -(-8 * self.d_model // 3 // 32) * 32

    @property
    def expert_width(self) -> int:
        """The hidden width of each MoE expert actually used (see expert_hidden)."""
        if self.expert_hidden:
            return self.expert_hidden
        return max(8, round(self.hidden / (self.n_shared_experts + self.top_k) / 8) * 8)

    @property
    def streams(self) -> int:
        """Number of residual streams the model carries (1 for the plain residual)."""
        return 1 if self.residual == "plain" else self.n_streams


DATA_SOURCES = ("python-docs",)
TOKENIZERS = ("byte", "bpe")
SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
ON_NAN = ("stop", "skip")


@dataclass
class DataConfig:
    """What text the model learns from and how it becomes tokens (DESIGN.md §7)."""

    source: str = "python-docs"
    """python-docs (the running CPython's own documentation: pydoc topics + stdlib docstrings, no download), or a
    path to a UTF-8 text file or a folder of text files."""
    tokenizer: str = "byte"
    """byte (vocab 256, no training) or bpe (trained on the train split with the `tokenizers` library)."""
    bpe_vocab_size: int = 1024
    """Vocabulary size of the BPE tokenizer (bpe only); model.vocab_size is set from the tokenizer."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation (whole documents chosen by a hash of their name, or the tail of
    a single document)."""

    def __post_init__(self) -> None:
        check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        require(256 < self.bpe_vocab_size <= 65536, "bpe_vocab_size", self.bpe_vocab_size, "expected 257..65536")
        require(0 < self.val_fraction < 0.5, "val_fraction", self.val_fraction, "expected a number in (0, 0.5)")


@dataclass
class TrainConfig:
    """The optimisation: batch, schedule, optimiser, evaluation, checkpoints, precision and failure handling."""

    steps: int = 200
    """Optimizer steps (the schedule is laid out over them)."""
    max_time: float = 0.0
    """Stop after this many seconds of training (0 = no time budget); a checkpoint is written at the stop."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; global batch = batch_size × grad_accum × processes."""
    optimizer: str = "adamw"
    """adamw, or muon (torch.optim.Muon on 2-D block weight matrices, AdamW on everything else, as modded-nanogpt)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, and Muon with its RMS-matching adjustment)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """cosine decay after warm-up, or wsd (warmup-stable-decay: constant, then linear decay over decay_fraction)."""
    decay_fraction: float = 0.2
    """Share of the steps spent decaying in the wsd schedule."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices (never on norms, biases, gates or embeddings unless
    decay_embeddings)."""
    decay_embeddings: bool = False
    """Apply weight decay to the embedding / LM head too."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    eval_every: int = 50
    """Evaluate the validation loss every this many steps (and at the end)."""
    eval_batches: int = 8
    """Batches of batch_size windows per evaluation (the same windows every time)."""
    diag_every: int = 50
    """Residual gain diagnostics every this many steps for hc / mhc (0 = never)."""
    ckpt_every: int = 0
    """Write a checkpoint every this many steps (0 = only at the end, on Ctrl-C and at the time budget)."""
    keep_last: int = 2
    """Checkpoints kept in the run folder (older ones are deleted after a new one is complete)."""
    seed: int = 0
    """Seeds the weights and the data windows."""
    dtype: str = "float32"
    """float32, or bfloat16 (autocast for the matmuls; weights, optimizer and residual coefficients stay fp32)."""
    compile: bool = False
    """torch.compile the model (the first step's compile time is reported separately)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    on_nan: str = "stop"
    """When the loss or gradient is not finite: stop (with a message naming the step; no checkpoint is written from
    the poisoned weights) or skip the step."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "keep_last"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "expected an integer >= 1")
        for name in ("warmup_steps", "diag_every", "ckpt_every", "threads", "seed"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, name, value, "expected an integer >= 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("on_nan", self.on_nan, ON_NAN)
        require(self.lr > 0, "lr", self.lr, "expected a positive number")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "expected a number in [0, 1]")
        require(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "expected (0, 1]")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "expected a number >= 0")
        require(0 <= self.beta1 < 1, "beta1", self.beta1, "expected a number in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", self.beta2, "expected a number in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "expected a number >= 0 (0 = off)")
        require(self.max_time >= 0, "max_time", self.max_time, "expected seconds >= 0 (0 = no limit)")
        require(self.warmup_steps <= self.steps, "warmup_steps", self.warmup_steps, f"must be <= steps={self.steps}")


@dataclass
class RunConfig:
    """Everything a run needs: the sections [model], [data] and [train] of a TOML file, and for the reasoning
    stages the optional [task] (nanoseek.data.tasks.TaskConfig) and [grpo] (nanoseek.rl.grpo.GRPOConfig). An
    optional section is None when the file has none, so a pretraining checkpoint's config stays what it was."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    task: Any = None
    grpo: Any = None

    SECTIONS: ClassVar[dict[str, type]] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
    # module and class of each optional section, imported on first use (those modules import this one)
    OPTIONAL: ClassVar[dict[str, tuple[str, str]]] = {
        "task": ("nanoseek.data.tasks", "TaskConfig"),
        "grpo": ("nanoseek.rl.grpo", "GRPOConfig"),
    }

    def to_dict(self) -> dict[str, dict[str, Any]]:
        names = [*self.SECTIONS, *(k for k in self.OPTIONAL if getattr(self, k) is not None)]
        return {name: asdict(getattr(self, name)) for name in names}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        """Build and validate; unknown sections or keys and values of the wrong type are errors naming them."""
        unknown = set(raw) - set(cls.SECTIONS) - set(cls.OPTIONAL)
        if unknown:
            allowed = ", ".join([*cls.SECTIONS, *cls.OPTIONAL])
            raise ValueError(f"{where}: unknown section [{sorted(unknown)[0]}]; allowed: {allowed}")
        optional = {k: getattr(importlib.import_module(m), c) for k, (m, c) in cls.OPTIONAL.items() if k in raw}
        parts = {}
        for name, section_cls in {**cls.SECTIONS, **optional}.items():
            values = raw.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"{where}: [{name}] must be a table of key = value pairs")
            typed = {k: _typed(section_cls, name, k, v, where) for k, v in values.items()}
            try:
                parts[name] = section_cls(**typed)
            except ValueError as err:
                raise ValueError(f"{where}: [{name}] {err}") from None
        return cls(**parts)


def _typed(section_cls: type, section: str, key: str, value: Any, where: str) -> Any:
    """Check that ``key`` exists in the section and ``value`` has its type (ints are accepted for floats)."""
    kinds = {f.name: f.type for f in fields(section_cls)}
    if key not in kinds:
        close = difflib.get_close_matches(key, kinds, n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise ValueError(f"{where}: unknown key {section}.{key}{hint}; allowed: {', '.join(kinds)}")
    if kinds[key] == "tuple[str, ...]":  # a TOML array of strings
        if not (isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)):
            raise ValueError(f"{where}: {section}.{key}={value!r} has the wrong type: expected a list of strings")
        return tuple(value)
    kind = {"int": int, "float": float, "bool": bool, "str": str}[kinds[key]]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{where}: {section}.{key}={value!r} has the wrong type: expected {kind.__name__}")
    return value


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); the value is read as a TOML literal, else as a string."""
    path, sep, raw = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not key:
        raise ValueError(f"--set {text!r}: expected section.key=value, e.g. --set model.d_model=128")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key.strip(), value


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a ValueError naming the file (``what`` says its role)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid TOML: {err}") from None


def load_run_config(
    files: list[str | Path] = (), overrides: list[str] = (), base: dict[str, Any] | None = None
) -> RunConfig:
    """Merge TOML files in order, then ``--set`` overrides, onto ``base`` and validate the result."""
    raw: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (base or {}).items()}
    for path in files:
        loaded = read_toml(path, "config file")
        for section, values in loaded.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return RunConfig.from_dict(raw)


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(cfg.to_dict()), encoding="utf-8")
