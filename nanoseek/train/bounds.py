"""Bounds on the sizes a user can type: a model, a batch or a number of samples that cannot fit in memory is
refused before anything is allocated, with the estimate in the message (instead of an allocator traceback, an
out-of-memory kill of the machine's other work, or a loop that runs for hours before failing).

The estimates are deliberately simple upper-side figures (float32 everywhere; weights, gradients and two AdamW
moments; per token and layer the activations a block keeps for backward, the attention scores, the logits), good
to an order of magnitude: they exist to catch a typo (batch_size=1e8, n_layers=1e7, d_model=2**62), not to plan a
run. A config within the machine's memory but near it still runs and may still fail.
"""

from __future__ import annotations

from nanoseek.memory import available_memory, gib

FLOAT = 4
"""Bytes per value: the estimates count float32."""


def param_count(cfg) -> int:
    """Parameters of a model config (ModelConfig), computed from its sizes without building it."""
    d, layers, head = cfg.d_model, cfg.n_layers, cfg.head_dim
    attention = d * head * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    if cfg.ffn == "moe":
        ffn = 3 * d * cfg.expert_width * (cfg.n_shared_experts + cfg.n_routed_experts) + d * cfg.n_routed_experts
    else:
        ffn = (3 if cfg.ffn == "swiglu" else 2) * d * cfg.hidden
    streams = cfg.n_streams if cfg.residual != "plain" else 1
    mixing = 2 * (streams * d * (2 * streams + streams * streams)) if streams > 1 else 0
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + layers * (attention + ffn + mixing)


def activation_bytes(cfg, batch: int, length: int) -> int:
    """What a forward and backward over ``batch`` sequences of ``length`` tokens keeps, roughly."""
    streams = cfg.n_streams if cfg.residual != "plain" else 1
    per_token_layer = cfg.d_model * (16 + 4 * streams) + 2 * cfg.hidden + cfg.n_heads * length
    return FLOAT * batch * length * (cfg.n_layers * per_token_layer + 3 * cfg.vocab_size)


def _refuse_over(need: int, what: str, change: str) -> None:
    have = available_memory()
    if need > have:
        raise ValueError(f"{what} needs about {gib(need)} of memory (estimated), more than the {gib(have)} available; "
                         f"{change}")  # fmt: skip


def check_model_memory(cfg, where: str = "model") -> None:
    """A model of this config fits in memory (weights only: loading for sampling, serving, a teacher)."""
    _refuse_over(FLOAT * param_count(cfg), f"{where}: a model of {param_count(cfg):.3g} parameters",
                 "use a smaller model.d_model / model.n_layers / model.vocab_size")  # fmt: skip


def check_training_memory(model_cfg, train_cfg, world: int = 1) -> None:
    """Weights, gradients and optimizer moments plus one micro-batch's activations fit in memory."""
    params = param_count(model_cfg)
    need = 4 * FLOAT * params + activation_bytes(model_cfg, train_cfg.batch_size, model_cfg.seq_len)
    _refuse_over(
        need,
        f"training a model of {params:.3g} parameters with train.batch_size={train_cfg.batch_size} × "
        f"model.seq_len={model_cfg.seq_len}",
        "lower train.batch_size (raise train.grad_accum to keep the batch), model.seq_len, model.d_model or "
        "model.n_layers",
    )


def check_generation_memory(cfg, sequences: int, length: int, what: str) -> None:
    """``sequences`` sequences generated together up to ``length`` tokens fit: KV cache and logits."""
    kv = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * length
    streams = cfg.n_streams if cfg.residual != "plain" else 1
    need = FLOAT * (param_count(cfg) + sequences * (kv + length * cfg.d_model * streams + 2 * cfg.vocab_size))
    _refuse_over(need, f"{what}: {sequences} sequences of up to {length} tokens", f"ask for fewer than {sequences}")
