"""The model's config: shape of the transformer, its residual connections and its FFN (DESIGN.md §3, §4)."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.schema import check_choice, require

FFN_KINDS = ("swiglu", "relu2", "moe")
MOE_DISPATCHES = ("grouped", "loop")
MHC_RES_INITS = ("identity", "uniform", "eye")
STREAM_COLLAPSES = ("mean", "sum", "learned")


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
    head_size: int = 0
    """Width of each attention head; 0 means d_model / n_heads. Set it for models whose heads are wider or
    narrower than that (Qwen3: 128-wide heads at any d_model); queries and values then have n_heads · head_size
    features, projected back to d_model."""
    qkv_bias: bool = False
    """Add a bias to the query, key and value projections (as Qwen2 does); the output projection has none."""
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
    stream_recompute: int = 0
    """hc / mhc block recompute (the mHC paper's): sites per block, k >= 2 keeps the n-stream state for backward
    only at the first site of every k and rebuilds it inside the block by replaying the mixes (F is not rerun; its
    outputs and the coefficients are kept). Less memory, some more time; 0 or 1 keeps the state at every site."""
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
        value = self.stream_recompute
        require(isinstance(value, int) and value >= 0, "stream_recompute", value, "expected an integer >= 0")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "n_streams", "sinkhorn_iters"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "expected an integer >= 1")
        require(self.n_kv_heads >= 0, "n_kv_heads", self.n_kv_heads, "expected 0 (= n_heads) or a positive integer")
        require(self.ffn_hidden >= 0, "ffn_hidden", self.ffn_hidden, "expected 0 (automatic) or a positive integer")
        require(
            isinstance(self.head_size, int) and self.head_size >= 0,
            "head_size",
            self.head_size,
            "expected 0 (= d_model / n_heads) or a positive integer",
        )
        if self.head_size:
            require(self.head_size % 2 == 0, "head_size", self.head_size, "must be even for rotary embeddings")
        else:
            require(
                self.d_model % self.n_heads == 0,
                "d_model",
                self.d_model,
                f"must be divisible by n_heads={self.n_heads} (or set head_size)",
            )
            require(
                self.head_dim % 2 == 0, "d_model", self.d_model, "d_model / n_heads must be even for rotary embeddings"
            )
        require(
            self.n_heads % self.kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"must divide n_heads={self.n_heads}",
        )
        check_choice("ffn", self.ffn, FFN_KINDS)
        from nanoseek.model.residual import RESIDUALS  # the kinds live with their classes, which import this file

        check_choice("residual", self.residual, tuple(RESIDUALS))
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
        """The width of each attention head actually used (see head_size)."""
        return self.head_size or self.d_model // self.n_heads

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
