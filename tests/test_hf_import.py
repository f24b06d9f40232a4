"""Importing transformers causal LMs (`hf:DIR` or a plain folder) into nanoseek: exact or refused naming the key,
the tokenizer and its chat template as they come, and every stage taking the imported model."""

import json

import pytest
import torch
from hf_models import (
    CHAT_TEMPLATE,
    HF,
    TOL,
    greedy_hf,
    greedy_nanoseek,
    hf_tokenizer_files,
    max_diff,
    prompts,
    save_hf,
)  # fmt: skip
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoseek.cli import main
from nanoseek.data.tokenizer import HFTokenizer, load_tokenizer
from nanoseek.interop.hf_export import export
from nanoseek.train.load import load_model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Every HF kind: (transformers model, its saved folder)."""
    out = {}
    for kind in HF:
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = (save_hf(folder, kind), folder)
    return out


@pytest.mark.parametrize("kind", list(HF))
def test_imported_model_computes_the_same_in_nanoseek(hf_folders, kind):
    hf, folder = hf_folders[kind]
    loaded = load_model(f"hf:{folder}")
    assert loaded.stage == "hf" and loaded.folder == folder and not loaded.model.training
    ids = prompts(260)
    with torch.no_grad():
        ours, theirs = loaded.model(ids), hf(ids).logits
    assert theirs.abs().max() > 1
    assert max_diff(ours, theirs) <= TOL
    assert greedy_nanoseek(loaded.model, ids) == greedy_hf(hf, ids)


@pytest.mark.parametrize("kind", list(HF))
def test_import_then_export_gives_back_the_same_checkpoint(hf_folders, kind, tmp_path):
    hf, folder = hf_folders[kind]
    done = export(f"hf:{folder}", tmp_path / "again", stock_only=True)
    again = AutoModelForCausalLM.from_pretrained(done.folder).eval()
    assert type(again) is type(hf)
    mine, theirs = hf.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert max_diff(again(prompts(260)).logits, hf(prompts(260)).logits) <= TOL
    original = json.loads((folder / "tokenizer_config.json").read_text())
    assert json.loads((done.folder / "tokenizer_config.json").read_text()) == original
    assert json.loads((done.folder / "config.json").read_text())["eos_token_id"] == 257


def test_the_mapping_is_the_expected_one(hf_folders):
    cfgs = {kind: load_model(f"hf:{folder}").model.cfg for kind, (_, folder) in hf_folders.items()}
    assert (cfgs["llama"].tie_embeddings, cfgs["llama"].kv_heads, cfgs["llama"].rope_base) == (True, 2, 5000.0)
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].tie_embeddings and cfgs["qwen2"].norm_eps == 1e-5
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 12 and cfgs["qwen3"].head_size == 12
    moe = cfgs["glm4_moe"]
    assert (moe.ffn, moe.n_routed_experts, moe.top_k, moe.n_shared_experts, moe.expert_width) == ("moe", 4, 2, 1, 16)
    assert (moe.first_k_dense, moe.route_scale, moe.qk_norm, moe.seq_len) == (1, 2.5, True, 256)


def test_a_plain_folder_path_and_sharded_weights_load_too(tmp_path):
    hf = save_hf(tmp_path, "llama", max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    loaded = load_model(tmp_path)  # no hf: prefix: config.json and no nanoseek meta.json
    with torch.no_grad():
        assert max_diff(loaded.model(prompts(260)), hf(prompts(260)).logits) <= TOL


def test_hf_tokenizer_is_used_as_it_comes(hf_folders):
    _, folder = hf_folders["qwen2"]
    ours, theirs = load_tokenizer_of(folder), AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>user\nwhat is 2 + 2? é🙂<|im_end|>\n"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.encode(text)[0] == 256 and ours.decode(ours.encode(text)) == text
    assert ours.eos_id == 257 == theirs.eos_token_id and ours.vocab_size == 258
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    for generation_prompt in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, generation_prompt) == expected
    assert ours.chat_template == CHAT_TEMPLATE


def load_tokenizer_of(folder) -> HFTokenizer:
    return load_model(f"hf:{folder}").tokenizer


def test_hf_tokenizer_survives_a_checkpoint_exactly(hf_folders, tmp_path):
    _, folder = hf_folders["llama"]
    tok = load_tokenizer_of(folder)
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, HFTokenizer) and back.config == tok.config and back.eos_id == 257
    text = "<|im_start|>assistant\n4<|im_end|>"
    assert back.encode(text) == tok.encode(text) and back.chat_template == CHAT_TEMPLATE


def config_with(folder, tmp_path, **changes):
    raw = json.loads((folder / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    hf_tokenizer_files(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        ("llama", {"model_type": "gpt2"}, "model_type='gpt2' is not supported; nanoseek reads llama, qwen2, qwen3"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         "rope_parameters.rope_type='yarn' is not supported: nanoseek's rotary embedding is unscaled"),
        ("llama", {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
         "rope_scaling={'type': 'linear', 'factor': 2.0} is not supported"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=True is not supported"),
        ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types=['full_attention', 'sliding"),
        ("llama", {"attention_bias": True}, "attention_bias=True is not supported: llama's attention_bias also adds"),
        ("qwen3", {"attention_bias": True}, "attention_bias=True is not supported: qwen3's attention_bias also adds"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True is not supported"),
        ("llama", {"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported: nanoseek has no dropout"),
        ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config={'quant_method': 'gptq'}"),
        ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
         "partial_rotary_factor=0.5 is not supported: nanoseek rotates every dimension"),
        ("glm4_moe", {"norm_topk_prob": False}, "norm_topk_prob=False is not supported"),
        ("glm4_moe", {"n_group": 2, "topk_group": 1}, "topk_group=1 is not supported: nanoseek routes over all"),
        ("llama", {"vocab_size": 100}, "embed.weight is (260, 32), the config implies (100, 32)"),
    ],
)  # fmt: skip
def test_what_nanoseek_does_not_compute_is_refused_naming_the_key(hf_folders, tmp_path, capsys, kind, changes, message):
    folder = config_with(hf_folders[kind][1], tmp_path, **changes)
    with pytest.raises(ValueError) as err:
        load_model(f"hf:{folder}")
    assert message in str(err.value)
    assert main(["eval", "--ckpt", f"hf:{folder}", "--task", "arithmetic", "--n", "1"]) == 2
    assert message in capsys.readouterr().err


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--ckpt", f"hf:{tmp_path / 'nowhere'}"]) == 2
    assert "config.json is missing (expected a Hugging Face model folder)" in capsys.readouterr().err
