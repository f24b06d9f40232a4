"""`nanoseek export`: nanoseek -> transformers -> nanoseek is exact (fp32 logits within 1e-5, identical greedy decodes,
the same experts chosen), tokenizers open with AutoTokenizer, and models without a faithful stock class are either
carried by nanoseek's own modelling code or refused naming the feature."""

import json
import subprocess
import sys

import pytest
import torch
from hf_models import (
    ARCHITECTURE,
    NANOSEEK,
    NEW_TOKENS,
    TOL,
    greedy_hf,
    greedy_nanoseek,
    max_diff,
    nanoseek_model,
    prompts,
    save_nanoseek,
)  # fmt: skip
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanoseek.cli import main
from nanoseek.data.tasks import TaskConfig
from nanoseek.data.tokenizer import BPETokenizer
from nanoseek.interop.hf_export import export
from nanoseek.model.generate import generate
from nanoseek.train.load import load_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every NANOSEEK config: (nanoseek model, export folder)."""
    out = {}
    for name, kwargs in NANOSEEK.items():
        root = tmp_path_factory.mktemp(name)
        model = nanoseek_model(**kwargs)
        out[name] = (model, export(save_nanoseek(root / "run", model), root / "hf"))
    return out


@pytest.mark.parametrize("name", list(NANOSEEK))
def test_exported_model_computes_the_same_in_transformers(exported, name):
    model, done = exported[name]
    assert done.architecture == ARCHITECTURE[name]
    assert done.remote_code == (ARCHITECTURE[name] == "NanoseekForCausalLM")
    hf = AutoModelForCausalLM.from_pretrained(done.folder, trust_remote_code=True).eval()
    assert type(hf).__name__ == ARCHITECTURE[name]
    ids = prompts()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.abs().max() > 1  # logits large enough that a mapping error would show
    assert max_diff(ours, theirs) <= TOL
    assert greedy_nanoseek(model, ids) == greedy_hf(hf, ids)


@pytest.mark.parametrize("name", list(NANOSEEK))
def test_export_then_import_gives_back_the_same_weights(exported, name):
    model, done = exported[name]
    back = load_model(f"hf:{done.folder}")
    assert back.stage == "hf" and back.step == 0
    mine, theirs = model.state_dict(), back.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert max_diff(back.model(prompts()), model(prompts())) <= TOL


@pytest.mark.parametrize("name", ["llama", "mhc_moe"])
def test_left_padded_prompts_of_different_lengths_decode_the_same(exported, name):
    model, done = exported[name]
    hf = AutoModelForCausalLM.from_pretrained(done.folder, trust_remote_code=True).eval()
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ids = torch.tensor([rows[0], [0] * 4 + rows[1]])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, generation_config=config)[:, 7:].tolist()
    assert generate(model, rows, NEW_TOKENS, temperature=0).tokens.tolist() == theirs


def test_exported_moe_router_picks_the_same_experts(exported):
    model, done = exported["glm4_moe"]
    hf = AutoModelForCausalLM.from_pretrained(done.folder).eval()
    x = torch.randn(300, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    for moe, layer in zip(model.moe_layers(), hf.model.layers[model.cfg.first_k_dense :], strict=True):
        with torch.no_grad():
            weights, chosen, _ = moe.route(x)
            _, hf_weights, hf_chosen = layer.mlp.gate(x)
        order, hf_order = chosen.sort(-1), hf_chosen.sort(-1)
        assert torch.equal(order.values, hf_order.values)
        assert max_diff(weights.gather(-1, order.indices), hf_weights.gather(-1, hf_order.indices)) <= 1e-6
        assert len(chosen.unique()) == model.cfg.n_routed_experts  # every expert is chosen by some token


def test_byte_tokenizer_exports_as_byte_level_bpe_without_merges(exported):
    _, done = exported["llama"]
    raw = json.loads((done.folder / "tokenizer.json").read_text())
    assert raw["model"]["type"] == "BPE" and raw["model"]["merges"] == [] and len(raw["model"]["vocab"]) == 256
    tok = AutoTokenizer.from_pretrained(done.folder)
    text = "déjà vu\t→ 🙂\n\x00end"
    assert tok.encode(text) == list(text.encode())
    assert tok.decode(list(text.encode())) == text
    assert sorted(raw["model"]["vocab"].values()) == list(range(256))


def test_bpe_tokenizer_is_exported_as_it_is(tmp_path):
    bpe = BPETokenizer.train(["the cat sat on the mat " * 20, "a dog, a log, a fog"], vocab_size=300)
    model = nanoseek_model(vocab_size=bpe.vocab_size)
    done = export(save_nanoseek(tmp_path / "run", model, bpe), tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(done.folder)
    text = "the cat sat on a log"
    assert tok.encode(text) == bpe.encode(text) and len(bpe.encode(text)) < len(text)
    assert tok.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("template", ["compact", "r1_zero"])
def test_reasoning_model_gets_a_chat_template_that_renders_its_task_prompt(tmp_path, template):
    task = TaskConfig(name="arithmetic", template=template)
    done = export(save_nanoseek(tmp_path / "run", nanoseek_model(), task=task), tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(done.folder)
    problem = task.build().problems("test", 1)[0]
    messages = [{"role": "user", "content": problem.question}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == task.build().prompt(problem)
    assert problem.question in rendered


def test_export_writes_the_files_transformers_reads(exported):
    _, done = exported["mhc_moe"]
    names = {p.name for p in done.folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "configuration_nanoseek.py", "modeling_nanoseek.py"} == names  # fmt: skip
    config = json.loads((done.folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanoseek.NanoseekForCausalLM"
    assert config["ffn_hidden"] > 0 and config["expert_hidden"] == 16 and config["residual"] == "mhc"
    assert json.loads((done.folder / "generation_config.json").read_text()) == {"max_length": 96}


@pytest.mark.slow  # a fresh interpreter importing transformers: about 7 s
def test_remote_code_runs_without_nanoseek_installed(exported):
    model, done = exported["mhc_moe"]
    script = (
        "import sys, torch; sys.modules['nanoseek'] = None\n"  # any `import nanoseek` now fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(done.folder)!r}, trust_remote_code=True)\n"
        "ids = torch.tensor([[1, 2, 3, 4]])\n"
        "print(m(ids).logits[0, -1, :4].tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    with torch.no_grad():
        expected = model(torch.tensor([[1, 2, 3, 4]]))[0, -1, :4]
    assert max_diff(torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])), expected) <= TOL


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        ({"residual": "hc"}, "model.residual='hc' (n residual streams mixed per site)"),
        ({"ffn": "relu2"}, "model.ffn='relu2' (squared-ReLU FFN)"),
        ({"qk_norm": True, "qkv_bias": True}, "model.qk_norm with model.qkv_bias"),
        ({"ffn": "moe", "n_routed_experts": 1, "top_k": 1}, "model.n_routed_experts=1"),
    ],
)
def test_stock_only_refuses_naming_the_feature(tmp_path, capsys, kwargs, feature):
    ckpt = save_nanoseek(tmp_path / "run", nanoseek_model(**kwargs))
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--stock-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek export: error: no stock transformers class computes this model")
    assert feature in err and not (tmp_path / "hf").exists()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "NanoseekForCausalLM" in capsys.readouterr().out


def test_export_never_overwrites_an_existing_folder(tmp_path, capsys):
    ckpt = save_nanoseek(tmp_path / "run", nanoseek_model())
    (tmp_path / "empty").mkdir()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert "wrote" in capsys.readouterr().out and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    before = (tmp_path / "empty" / "config.json").read_text()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "empty")]) == 2
    assert "already exists and is not an empty folder; choose a new folder" in capsys.readouterr().err
    assert (tmp_path / "empty" / "config.json").read_text() == before


def test_export_help_gives_examples(capsys):
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "nanoseek export --ckpt runs/demo --out hf/demo" in out and "--stock-only" in out and "hf:DIR" in out
