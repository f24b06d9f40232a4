"""Configuration of a nanoseek model exported for transformers: the keys of nanoseek's [model] table, with every
automatic width already resolved (ffn_hidden, expert_hidden, head_size, n_kv_heads are the widths in use)."""

from transformers import PreTrainedConfig


class NanoseekConfig(PreTrainedConfig):
    model_type = "nanoseek"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_size: int = 64
    qkv_bias: bool = False
    seq_len: int = 256
    ffn: str = "swiglu"  # swiglu | relu2 | moe
    ffn_hidden: int = 704
    qk_norm: bool = False
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    residual: str = "plain"  # plain | hc | mhc
    n_streams: int = 4
    sinkhorn_iters: int = 20
    stream_collapse: str = "mean"  # mean | sum | learned
    n_shared_experts: int = 1
    n_routed_experts: int = 16
    top_k: int = 2
    expert_hidden: int = 232
    route_scale: float = 1.0
    first_k_dense: int = 0
    tie_word_embeddings: bool = False  # nanoseek ties the head itself (tie_embeddings); nothing for transformers to tie
