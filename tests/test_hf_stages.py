"""Every stage takes a Hugging Face model with `--init hf:DIR` (or `--ckpt hf:DIR`): SFT, GRPO, eval, sample; what
they write keeps the model's tokenizer, chat template and eos, and exports back to the same class."""

import json

import pytest
import torch
from hf_models import CHAT_TEMPLATE, save_hf
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoseek.cli import main
from nanoseek.config import checkpoint_config
from nanoseek.data.tokenizer import HFTokenizer, load_tokenizer
from nanoseek.interop.hf_import import run_config_tables
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.load import load_model

SFT = ["sft", "--preset", "demo", "--task", "arithmetic", "--set", "train.steps=2", "--set", "train.warmup_steps=1",
       "--set", "train.batch_size=4", "--set", "train.eval_batches=1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_hf(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def sft_from_hf(hf_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    assert main([*SFT, "--init", f"hf:{hf_llama}", "--out", str(out)]) == 0
    return out


def test_init_hf_gives_the_run_the_models_config(hf_llama):
    cfg = checkpoint_config(f"hf:{hf_llama}")
    assert cfg.model.d_model == 32 and cfg.model.vocab_size == 260 and cfg.data.tokenizer == "hf"
    assert cfg.to_dict()["model"] == run_config_tables(hf_llama)["model"]


def test_sft_from_a_hf_model_keeps_its_tokenizer_and_exports_back(sft_from_hf, hf_llama, tmp_path):
    run = json.loads((sft_from_hf / "run.json").read_text())
    assert run["init"] == str(hf_llama) and run["init_stage"] == "hf"
    loaded = load_model(sft_from_hf)
    assert loaded.stage == "sft" and loaded.step == 2 and loaded.config["data"]["tokenizer"] == "hf"
    tok = load_tokenizer(list_checkpoints(sft_from_hf)[-1])
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 257 and tok.chat_template == CHAT_TEMPLATE
    original = load_model(f"hf:{hf_llama}")
    changed = [k for k, v in loaded.model.state_dict().items() if not torch.equal(v, original.model.state_dict()[k])]
    assert changed  # training moved the weights
    assert main(["export", "--ckpt", str(sft_from_hf), "--out", str(tmp_path / "hf"), "--stock-only"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert float((hf(ids).logits - loaded.model(ids)).abs().max()) <= 1e-5
    exported = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert exported == json.loads((hf_llama / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id == 257


def test_sft_targets_end_with_the_hf_models_eos(sft_from_hf):
    from nanoseek.train.sft import sft_batch

    tok = load_tokenizer(list_checkpoints(sft_from_hf)[-1])
    _, targets, _ = sft_batch(tok, [("2+2=", "4")], seq_len=64)
    assert targets[0, -1].item() == 257


def test_grpo_and_eval_and_sample_take_a_hf_model(hf_llama, tmp_path, capsys):
    grpo = ["grpo", "--preset", "demo", "--task", "arithmetic", "--init", f"hf:{hf_llama}", "--out",
            str(tmp_path / "grpo"), "--set", "train.steps=1", "--set", "grpo.group_size=2", "--set",
            "train.batch_size=2", "--set", "task.max_new_tokens=8", "--no-progress"]  # fmt: skip
    assert main(grpo) == 0
    assert load_model(tmp_path / "grpo").tokenizer.chat_template == CHAT_TEMPLATE
    assert (
        main(["eval", "--ckpt", f"hf:{hf_llama}", "--task", "arithmetic", "--n", "2", "--samples", "1", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 2 and result["task"] == "arithmetic"
    assert (
        main(["sample", "--ckpt", f"hf:{hf_llama}", "--prompt", "12+", "--max-new-tokens", "5", "--temperature", "0"])
        == 0
    )
    assert capsys.readouterr().out.startswith("12+")
