"""``nanoseek export``: a checkpoint -> a Hugging Face model folder that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` open offline.

The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json``. The model goes to the stock class that computes exactly what it computes (hf_config.py);
a model no stock class holds (HC / mHC residuals, ReLU², ...) gets nanoseek's own modelling code beside its weights
(``configuration_nanoseek.py``, ``modeling_nanoseek.py``, loaded with ``trust_remote_code=True``), or, with
``stock_only``, is refused with the features that prevent a stock class. Tokenizers: the byte tokenizer becomes a
byte-level BPE with no merges (the same ids), a trained BPE is written as it is, a Hugging Face tokenizer as it came;
a reasoning model (a checkpoint with a [task]) gets a chat template that renders the task's prompt.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from nanoseek.data.tasks import TaskConfig
from nanoseek.data.templates import render_prompt
from nanoseek.data.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer
from nanoseek.interop.hf_config import REMOTE, STOCK, UnsupportedModel, hf_config, stock_blockers, stock_class
from nanoseek.interop.hf_weights import to_hf
from nanoseek.model.config import ModelConfig
from nanoseek.schema import build_section
from nanoseek.train.load import load_model

REMOTE_FILES = ("configuration_nanoseek.py", "modeling_nanoseek.py")


@dataclass
class Exported:
    folder: Path
    architecture: str
    """The transformers class: LlamaForCausalLM, ..., or NanoseekForCausalLM (remote code)."""
    remote_code: bool
    reasons: list[str]
    """Why no stock class fits (empty for a stock class)."""


def export(ckpt: str | Path, out: str | Path, *, stock_only: bool = False) -> Exported:
    """Write the model of checkpoint (or run folder, or ``hf:DIR``) ``ckpt`` into ``out``, a new or empty folder."""
    loaded = load_model(ckpt)
    cfg: ModelConfig = loaded.model.cfg
    model_type, reasons = stock_class(cfg), stock_blockers(cfg)
    if model_type is None and stock_only:
        raise UnsupportedModel(
            f"no stock transformers class computes this model: {'; '.join(reasons)}. Without --stock-only it is "
            "exported with nanoseek's own modelling code (trust_remote_code=True)"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never overwrite: it may be someone's model
        raise ValueError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokens = _write_tokenizer(loaded.tokenizer, loaded.config, cfg, tmp)
        state = loaded.model.state_dict()
        if model_type is None:
            config, weights = _remote_config(cfg, tokens), state
            for name in REMOTE_FILES:
                shutil.copyfile(str(resources.files("nanoseek.interop.remote").joinpath(name)), tmp / name)
        else:
            config, weights = hf_config(cfg, model_type, tokens), to_hf(state, cfg)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
        _write_json(tmp / "config.json", config)
        generation = {f"{k}_token_id": v for k, v in tokens.items() if v is not None} | {"max_length": cfg.seq_len}
        _write_json(tmp / "generation_config.json", generation)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    architecture = STOCK[model_type] if model_type else "NanoseekForCausalLM"
    return Exported(out, architecture, model_type is None, reasons)


def _remote_config(cfg: ModelConfig, tokens: dict[str, int | None]) -> dict[str, Any]:
    """config.json for the remote code: the [model] keys, every automatic width resolved."""
    values = asdict(cfg) | {
        "n_kv_heads": cfg.kv_heads,
        "head_size": cfg.head_dim,
        "ffn_hidden": cfg.hidden,
        "expert_hidden": cfg.expert_width,
    }
    return {
        "architectures": ["NanoseekForCausalLM"],
        "model_type": REMOTE,
        "auto_map": {
            "AutoConfig": "configuration_nanoseek.NanoseekConfig",
            "AutoModelForCausalLM": "modeling_nanoseek.NanoseekForCausalLM",
        },
        **values,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "use_cache": True,
        **{f"{name}_token_id": value for name, value in tokens.items()},
    }


def _write_tokenizer(tokenizer, config: dict[str, Any], cfg: ModelConfig, folder: Path) -> dict[str, int | None]:
    """Write tokenizer.json and tokenizer_config.json; return the bos / eos / pad token ids for config.json."""
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_pretrained(folder)
        return {name: tokenizer.special_id(f"{name}_token") for name in ("bos", "eos", "pad")}
    if isinstance(tokenizer, ByteTokenizer):
        byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    elif isinstance(tokenizer, BPETokenizer):
        tokenizer.save(folder)
    else:
        raise ValueError(f"cannot export a {type(tokenizer).__name__}")
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if "task" in config:
        task = build_section(TaskConfig, config["task"], "task", "checkpoint config").build()
        tokenizer_config["chat_template"] = task_chat_template(task.template)
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    return {"bos": None, "eos": None, "pad": None}


def byte_level_tokenizer():
    """nanoseek's byte tokenizer as a ``tokenizers`` byte-level BPE with no merges: byte b is token b, written as
    the printable character byte-level BPE uses for it (the GPT-2 convention: printable Latin-1 bytes stand for
    themselves, the other 68 take the characters from U+0100 on, in byte order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    vocab, extra = {}, 0
    for b in range(256):
        vocab[chr(b) if b in printable else chr(0x100 + extra)] = b
        extra += b not in printable
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def task_chat_template(template: str) -> str:
    """A Jinja chat template that puts the last user message into the task's prompt template, exactly as the model
    saw its problems in training (one turn: the model was never trained on conversations)."""
    marker = "\x00question\x00"
    prefix, suffix = render_prompt(template, marker).split(marker)
    last_user = (
        "{%- set ns = namespace(q='') -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
        "{%- set ns.q = m['content'] -%}{%- endif -%}{%- endfor -%}"
    )
    return f"{last_user}{_jinja_literal(prefix)}{{{{ ns.q }}}}{_jinja_literal(suffix)}"


def _jinja_literal(text: str) -> str:
    """``text`` as a Jinja expression printing it verbatim (a JSON string is a valid Jinja string literal)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place (over an empty folder), so ``out`` is never half written."""
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
