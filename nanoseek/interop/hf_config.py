"""Which Hugging Face class holds which nanoseek model, and the translation of their configs (REFERENCES.md §2).

Every mapping is exact or refused: a nanoseek ``ModelConfig`` goes to the first stock class that computes the same
function (``stock_class``), and a ``config.json`` comes back only when nanoseek computes what its class computes
(``model_config_from_hf``); anything else is an error naming the key and its value.

    plain residual, SwiGLU                          LlamaForCausalLM
      + qkv_bias                                    Qwen2ForCausalLM
      + qk_norm                                     Qwen3ForCausalLM
    plain residual, DeepSeekMoE (any qk_norm /      Glm4MoeForCausalLM  (sigmoid router, bias that only chooses,
      qkv_bias)                                       normalised top-k times routed_scaling_factor, one group)
    HC / mHC, ReLU², qk_norm with qkv_bias, ...     no stock class: nanoseek's own modelling code (remote code)

This module knows only the model config; it imports nothing from transformers, so a model can be imported without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nanoseek.model.config import ModelConfig
from nanoseek.schema import build_section

STOCK = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}
REMOTE = "nanoseek"  # model_type of the exported modelling code (nanoseek/interop/remote)

# Defaults of the config classes (transformers 5.23) for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "attention_bias": True},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "attention_bias": False, "head_dim": 128},
    "glm4_moe": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "use_qk_norm": False,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "partial_rotary_factor": 0.5,
    },  # fmt: skip
}


class UnsupportedModel(ValueError):
    """A model that has no exact counterpart on the other side."""


# ---------------------------------------------------------------------------------------------------------------------
# nanoseek -> Hugging Face


def stock_blockers(cfg: ModelConfig) -> list[str]:
    """The features of ``cfg`` that no stock transformers class computes (empty: a stock class fits exactly)."""
    blockers = []
    if cfg.residual != "plain":
        blockers.append(f"model.residual={cfg.residual!r} (n residual streams mixed per site)")
    if cfg.ffn == "relu2":
        blockers.append("model.ffn='relu2' (squared-ReLU FFN)")
    if cfg.ffn == "moe" and cfg.n_routed_experts < 2:
        blockers.append("model.n_routed_experts=1 (Glm4Moe's router needs at least 2 experts)")
    if cfg.ffn != "moe" and cfg.qk_norm and cfg.qkv_bias:
        blockers.append("model.qk_norm with model.qkv_bias (Qwen3's attention_bias also adds a bias to o_proj)")
    return blockers


def stock_class(cfg: ModelConfig) -> str | None:
    """model_type of the stock class that computes exactly what ``cfg`` does, or None."""
    if stock_blockers(cfg):
        return None
    if cfg.ffn == "moe":
        return "glm4_moe"
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def hf_config(cfg: ModelConfig, model_type: str, tokens: dict[str, int | None]) -> dict[str, Any]:
    """config.json of ``cfg`` as ``model_type`` (a stock type from ``stock_class``); ``tokens`` holds bos / eos / pad
    token ids (or None)."""
    out: dict[str, Any] = {
        "architectures": [STOCK[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "intermediate_size": cfg.hidden,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "dtype": "float32",
        "use_cache": True,
        **{f"{name}_token_id": value for name, value in tokens.items()},
    }
    if model_type == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    elif model_type in ("qwen2", "qwen3"):
        out |= {"use_sliding_window": False} | ({"attention_bias": False} if model_type == "qwen3" else {})
    elif model_type == "glm4_moe":
        out["rope_parameters"]["partial_rotary_factor"] = 1.0  # Glm4Moe's default is 0.5
        out |= {
            "attention_bias": cfg.qkv_bias,
            "use_qk_norm": cfg.qk_norm,
            "moe_intermediate_size": cfg.expert_width,
            "n_routed_experts": cfg.n_routed_experts,
            "num_experts_per_tok": cfg.top_k,
            "n_shared_experts": cfg.n_shared_experts,
            "routed_scaling_factor": cfg.route_scale,
            "first_k_dense_replace": cfg.first_k_dense,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": True,
            "num_nextn_predict_layers": 0,
        }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face -> nanoseek


def model_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """The nanoseek config computing what ``raw`` (a config.json) describes, or UnsupportedModel naming the first
    key whose value nanoseek does not compute."""
    model_type = raw.get("model_type")
    if model_type == REMOTE:  # nanoseek's own modelling code: its config.json holds the [model] keys as they are
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return build_section(ModelConfig, {k: v for k, v in raw.items() if k in names}, "model", where)
    if model_type not in _DEFAULTS:
        allowed = ", ".join([*_DEFAULTS, REMOTE])
        raise UnsupportedModel(f"{where}: model_type={model_type!r} is not supported; nanoseek reads {allowed}")
    raw = _DEFAULTS[model_type] | raw

    def refuse(key: str, why: str) -> UnsupportedModel:
        return UnsupportedModel(f"{where}: {key}={raw.get(key)!r} is not supported: {why}")

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(raw.get(key), int):
            raise refuse(key, "expected an integer")
    if raw.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "nanoseek's gated FFN is SwiGLU (silu)")
    if raw.get("quantization_config") is not None:
        raise refuse("quantization_config", "nanoseek reads unquantised weights only")
    if raw.get("attention_dropout") or 0.0:
        raise refuse("attention_dropout", "nanoseek has no dropout")
    if raw.get("mlp_bias"):
        raise refuse("mlp_bias", "nanoseek's FFN has no biases")
    if raw.get("use_sliding_window") or any(t != "full_attention" for t in raw.get("layer_types") or []):
        key = "use_sliding_window" if raw.get("use_sliding_window") else "layer_types"
        raise refuse(key, "nanoseek attends to the whole context in every layer")
    rope_base = _rope_base(raw, model_type, refuse)
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    qkv_bias = bool(raw["attention_bias"])
    if qkv_bias and model_type in ("llama", "qwen3"):
        raise refuse("attention_bias", f"{model_type}'s attention_bias also adds a bias to o_proj; nanoseek's has none")
    fields: dict[str, Any] = {
        "vocab_size": raw["vocab_size"],
        "d_model": raw["hidden_size"],
        "n_layers": raw["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": raw.get("num_key_value_heads") or heads,
        "head_size": 0 if head_dim * heads == raw["hidden_size"] else head_dim,
        "qkv_bias": qkv_bias,
        "qk_norm": model_type == "qwen3" or bool(raw.get("use_qk_norm")),
        "seq_len": raw["max_position_embeddings"],
        "ffn": "swiglu",
        "ffn_hidden": raw["intermediate_size"],
        "rope_base": rope_base,
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "norm_eps": raw["rms_norm_eps"],
        "init_std": raw.get("initializer_range") or 0.02,
    }
    if model_type == "glm4_moe":
        fields |= _moe_fields(raw, refuse)
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise UnsupportedModel(f"{where}: maps to an invalid nanoseek config: {err}") from None


def _rope_base(raw: dict[str, Any], model_type: str, refuse) -> float:
    """rope_theta from rope_parameters (transformers >= 5) or the older top-level rope_theta / rope_scaling."""
    params = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling") not in (None, {}):
        scaling = raw["rope_scaling"]
        if not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"):
            raise refuse("rope_scaling", "nanoseek's rotary embedding is unscaled (rope_type 'default')")
    if params.get("rope_type", "default") != "default":
        raise UnsupportedModel(
            f"rope_parameters.rope_type={params['rope_type']!r} is not supported: nanoseek's rotary embedding is "
            "unscaled (rope_type 'default')"
        )
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise UnsupportedModel(
            f"partial_rotary_factor={factor!r} is not supported: nanoseek rotates every dimension of a head (1.0)"
        )
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)):
        raise refuse("rope_theta", "expected a number")
    return float(theta)


def _moe_fields(raw: dict[str, Any], refuse) -> dict[str, Any]:
    if not raw["norm_topk_prob"]:
        raise refuse("norm_topk_prob", "nanoseek renormalises the chosen experts' gate weights (true)")
    if raw["topk_group"] != raw["n_group"]:
        raise refuse("topk_group", f"nanoseek routes over all experts (topk_group = n_group = {raw['n_group']})")
    if raw["first_k_dense_replace"] >= raw["num_hidden_layers"]:
        raise refuse("first_k_dense_replace", "no MoE layer is left (load it as a dense model)")
    return {
        "ffn": "moe",
        "n_routed_experts": raw["n_routed_experts"],
        "top_k": raw["num_experts_per_tok"],
        "n_shared_experts": raw["n_shared_experts"],
        "expert_hidden": raw["moe_intermediate_size"],
        "route_scale": float(raw["routed_scaling_factor"]),
        "first_k_dense": raw["first_k_dense_replace"],
        # grouped_mm needs 16-byte aligned rows; the loop computes the same for any width
        "moe_dispatch": "grouped" if raw["hidden_size"] % 8 == 0 and raw["moe_intermediate_size"] % 8 == 0 else "loop",
    }
