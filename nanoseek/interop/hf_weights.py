"""Weight names and layouts between nanoseek and the stock transformers classes (Llama, Qwen2, Qwen3, Glm4Moe).

The four classes share one naming scheme; nanoseek differs only in how it stores a few matrices:

    nanoseek                                   transformers (as saved in model.safetensors)
    embed.weight                               model.embed_tokens.weight
    blocks.i.attn.norm.weight                  model.layers.i.input_layernorm.weight
    blocks.i.attn.fn.q.weight / .bias          model.layers.i.self_attn.q_proj.weight / .bias
    blocks.i.attn.fn.kv.weight / .bias         k_proj rows then v_proj rows (fused: one matmul)
    blocks.i.attn.fn.proj.weight               o_proj
    blocks.i.attn.fn.q_norm / k_norm.weight    q_norm / k_norm
    blocks.i.ffn.norm.weight                   model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.fn.gate_up.weight             mlp.gate_proj rows then mlp.up_proj rows; .down -> mlp.down_proj
    blocks.i.ffn.fn.router.weight              mlp.gate.weight
    blocks.i.ffn.fn.expert_bias                mlp.gate.e_score_correction_bias
    blocks.i.ffn.fn.experts.gate_up (E, C, 2H) mlp.experts.e.gate_proj.weight (H, C), up_proj (H, C): transposed
    blocks.i.ffn.fn.experts.down (E, H, C)     mlp.experts.e.down_proj.weight (C, H): transposed
    blocks.i.ffn.fn.shared.gate_up / .down     mlp.shared_experts.gate_proj / up_proj / down_proj
    norm.weight, head.weight (untied)          model.norm.weight, lm_head.weight

RoPE is rotate-half on both sides, so queries and keys need no permutation. Experts are written one per key, as
checkpoints on the Hub are; reading also accepts transformers' fused in-memory layout (experts.gate_up_proj
(E, 2H, C), experts.down_proj (E, C, H)).
"""

from __future__ import annotations

import torch

from nanoseek.model.config import ModelConfig


def _layer_pairs(cfg: ModelConfig, i: int) -> list[tuple[str, list[str]]]:
    """(nanoseek name, the HF names it is the row-concatenation of) for the matrices of block i that map 1:1 or by
    concatenation; routed experts are handled apart."""
    a, f, h = f"blocks.{i}.attn", f"blocks.{i}.ffn", f"model.layers.{i}"
    pairs = [
        (f"{a}.norm.weight", [f"{h}.input_layernorm.weight"]),
        (f"{a}.fn.q.weight", [f"{h}.self_attn.q_proj.weight"]),
        (f"{a}.fn.kv.weight", [f"{h}.self_attn.k_proj.weight", f"{h}.self_attn.v_proj.weight"]),
        (f"{a}.fn.proj.weight", [f"{h}.self_attn.o_proj.weight"]),
        (f"{f}.norm.weight", [f"{h}.post_attention_layernorm.weight"]),
    ]
    if cfg.qkv_bias:
        pairs += [
            (f"{a}.fn.q.bias", [f"{h}.self_attn.q_proj.bias"]),
            (f"{a}.fn.kv.bias", [f"{h}.self_attn.k_proj.bias", f"{h}.self_attn.v_proj.bias"]),
        ]
    if cfg.qk_norm:
        pairs += [(f"{a}.fn.{n}.weight", [f"{h}.self_attn.{n}.weight"]) for n in ("q_norm", "k_norm")]
    moe = cfg.ffn == "moe" and i >= cfg.first_k_dense
    mlp = f"{h}.mlp.shared_experts" if moe else f"{h}.mlp"
    if not moe or cfg.n_shared_experts:
        dense = f"{f}.fn.shared" if moe else f"{f}.fn"
        pairs += [
            (f"{dense}.gate_up.weight", [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]),
            (f"{dense}.down.weight", [f"{mlp}.down_proj.weight"]),
        ]
    if moe:
        pairs += [
            (f"{f}.fn.router.weight", [f"{h}.mlp.gate.weight"]),
            (f"{f}.fn.expert_bias", [f"{h}.mlp.gate.e_score_correction_bias"]),
        ]
    return pairs


def _moe_layers(cfg: ModelConfig) -> range:
    return range(cfg.first_k_dense, cfg.n_layers) if cfg.ffn == "moe" else range(0)


def _global_pairs(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    pairs = [("embed.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"])]
    return pairs if cfg.tie_embeddings else [*pairs, ("head.weight", ["lm_head.weight"])]


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A nanoseek state dict -> the tensors of the stock class's model.safetensors."""
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        for name, hf_names in _layer_pairs(cfg, i):
            parts = state[name].chunk(len(hf_names))  # k | v and gate | up are equal halves
            out |= dict(zip(hf_names, parts, strict=True))
    for name, (hf_name,) in _global_pairs(cfg):
        out[hf_name] = state[name]
    for i in _moe_layers(cfg):
        gate_up, down = state[f"blocks.{i}.ffn.fn.experts.gate_up"], state[f"blocks.{i}.ffn.fn.experts.down"]
        hidden = down.shape[1]
        for e in range(cfg.n_routed_experts):
            prefix = f"model.layers.{i}.mlp.experts.{e}"
            out[f"{prefix}.gate_proj.weight"] = gate_up[e, :, :hidden].t()
            out[f"{prefix}.up_proj.weight"] = gate_up[e, :, hidden:].t()
            out[f"{prefix}.down_proj.weight"] = down[e].t()
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a stock class's checkpoint -> a nanoseek state dict (float32). Every tensor the model needs
    must be there; tensors nothing reads are an error, except the ones transformers ignores as well (rotary
    caches, Glm4Moe's multi-token-prediction layers beyond num_hidden_layers, a tied head's copy, shared experts of
    width 0)."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"{where}: tensor {name} is missing")
        used.add(name)
        return tensors[name].float()

    state: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        for name, hf_names in _layer_pairs(cfg, i):
            state[name] = torch.cat([take(n) for n in hf_names])
    for name, (hf_name,) in _global_pairs(cfg):
        state[name] = take(hf_name)
    for i in _moe_layers(cfg):
        prefix = f"model.layers.{i}.mlp.experts"
        if f"{prefix}.gate_up_proj" in tensors:  # fused layout: (E, 2H, C) and (E, C, H)
            state[f"blocks.{i}.ffn.fn.experts.gate_up"] = take(f"{prefix}.gate_up_proj").transpose(1, 2)
            state[f"blocks.{i}.ffn.fn.experts.down"] = take(f"{prefix}.down_proj").transpose(1, 2)
            continue
        experts = range(cfg.n_routed_experts)
        gate_up = [torch.cat([take(f"{prefix}.{e}.gate_proj.weight"), take(f"{prefix}.{e}.up_proj.weight")]).t()
                   for e in experts]  # fmt: skip
        state[f"blocks.{i}.ffn.fn.experts.gate_up"] = torch.stack(gate_up)
        state[f"blocks.{i}.ffn.fn.experts.down"] = torch.stack(
            [take(f"{prefix}.{e}.down_proj.weight").t() for e in experts]
        )
    unused = [n for n in tensors if n not in used and not _ignorable(n, tensors[n], cfg)]
    if unused:
        raise ValueError(f"{where}: tensor {unused[0]} has no place in the nanoseek model ({len(unused)} unused)")
    return {k: v.contiguous() for k, v in state.items()}


def _ignorable(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq") or tensor.numel() == 0 or (name == "lm_head.weight" and cfg.tie_embeddings):
        return True
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) >= cfg.n_layers  # multi-token-prediction layers
