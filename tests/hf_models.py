"""Tiny random models on both sides of the Hugging Face interop, built from config classes (nothing is downloaded)."""

import json

import torch
import transformers
from tokenizers import AddedToken

from nanoseek.config import RunConfig
from nanoseek.data.config import DataConfig
from nanoseek.data.tasks import TaskConfig
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.interop.hf_export import byte_level_tokenizer
from nanoseek.model import ModelConfig, Transformer
from nanoseek.model.generate import generate
from nanoseek.train.checkpoint import save_checkpoint
from nanoseek.train.config import TrainConfig

transformers.logging.set_verbosity_error()

TOL = 1e-5  # max |Δ logits| allowed between the libraries, fp32
NEW_TOKENS = 32

# nanoseek configs, one per target class; init_std 0.2 spreads the logits so greedy decoding has no near-ties
NANOSEEK = {
    "llama": {"n_kv_heads": 2},
    "qwen2": {"qkv_bias": True, "tie_embeddings": False},
    "qwen3": {"qk_norm": True, "head_size": 12, "n_kv_heads": 2},
    "glm4_moe": {"ffn": "moe", "n_routed_experts": 4, "top_k": 2, "first_k_dense": 1, "route_scale": 2.5,
                 "qk_norm": True, "qkv_bias": True, "expert_hidden": 16},
    "hc": {"residual": "hc", "stream_collapse": "learned"},
    "mhc_moe": {"residual": "mhc", "ffn": "moe", "n_routed_experts": 4, "top_k": 2, "expert_hidden": 16,
                "n_kv_heads": 2},
}  # fmt: skip
ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "hc": "NanoseekForCausalLM",
    "mhc_moe": "NanoseekForCausalLM",
}


def nanoseek_model(**kwargs) -> Transformer:
    cfg = ModelConfig(**({"d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 96, "init_std": 0.2} | kwargs))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    spread(model)
    return model


def spread(model: torch.nn.Module) -> None:
    """Move every gain, bias and expert bias off its initial value, so a weight mapped to the wrong place shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 and "scale" not in name and "alpha" not in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith(("expert_bias", "e_score_correction_bias")):
                b.copy_(0.1 * torch.randn_like(b))


def save_nanoseek(folder, model: Transformer, tokenizer=None, task: TaskConfig | None = None):
    run = RunConfig(model=model.cfg, data=DataConfig(), train=TrainConfig(), task=task)
    state = {"step": 3, "stage": "sft" if task else "pretrain"}
    return save_checkpoint(folder, 3, model.state_dict(), run.to_dict(), tokenizer or ByteTokenizer(), state)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face side

CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HF_COMMON = {"vocab_size": 260, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "initializer_range": 0.2, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
             "eos_token_id": 257}  # fmt: skip
HF = {
    "llama": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "qwen2": (transformers.Qwen2Config, {"rms_norm_eps": 1e-5}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 12, "tie_word_embeddings": True}),
    "glm4_moe": (transformers.Glm4MoeConfig, {"moe_intermediate_size": 16, "n_routed_experts": 4,
                 "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
                 "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 0, "use_qk_norm": True,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0}}),
}  # fmt: skip


def hf_tokenizer_files(folder) -> None:
    """A byte-level tokenizer with two special tokens (<|im_start|> 256, <|im_end|> 257 = eos) and a chat template."""
    tok = byte_level_tokenizer()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def hf_model(kind: str):
    config_class, extra = HF[kind]
    torch.manual_seed(0)
    model = getattr(transformers, config_class.__name__.replace("Config", "ForCausalLM"))(
        config_class(**(HF_COMMON | extra))
    ).eval()
    spread(model)
    return model


def save_hf(folder, kind: str, **save_options):
    model = hf_model(kind)
    model.save_pretrained(folder, **save_options)
    hf_tokenizer_files(folder)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Comparing


def prompts(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(2))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def greedy_hf(model, ids: torch.Tensor) -> list[list[int]]:
    # no end-of-text: both libraries decode all NEW_TOKENS steps
    config = transformers.GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.shape[1] :].tolist()


def greedy_nanoseek(model, ids: torch.Tensor) -> list[list[int]]:
    return generate(model, ids.tolist(), NEW_TOKENS, temperature=0).tokens.tolist()
