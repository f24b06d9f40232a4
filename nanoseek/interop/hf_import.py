"""Reading a Hugging Face causal LM folder into nanoseek: ``config.json`` -> ``ModelConfig`` (exact or refused, see
hf_config.py), ``model.safetensors`` (or its shards) -> a ``Transformer``'s weights, and the tokenizer with its chat
template as it comes (``HFTokenizer``).

Every stage reaches this through ``nanoseek.train.load.load_model("hf:DIR")`` (or a plain folder holding a
config.json and no nanoseek checkpoint). Only safetensors are read: nothing is unpickled and no code runs, the
folder's own modelling code (trust_remote_code) included; transformers itself is not needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from nanoseek.data.tokenizer import HFTokenizer
from nanoseek.interop.hf_config import REMOTE, model_config_from_hf
from nanoseek.interop.hf_weights import from_hf
from nanoseek.model import Transformer
from nanoseek.model.config import ModelConfig

PREFIX = "hf:"


def hf_folder(path: str | Path) -> Path | None:
    """The Hugging Face folder ``path`` names — ``hf:DIR``, or a folder with a config.json and no nanoseek
    checkpoint files — or None for anything else."""
    text = str(path)
    if text.startswith(PREFIX):
        folder = Path(text[len(PREFIX) :])
        if not (folder / "config.json").is_file():
            raise ValueError(f"{text}: {folder / 'config.json'} is missing (expected a Hugging Face model folder)")
        return folder
    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / "meta.json").is_file():
        return folder
    return None


def read_config(folder: Path) -> ModelConfig:
    where = str(folder / "config.json")
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return model_config_from_hf(raw, where)


def run_config_tables(folder: Path) -> dict[str, dict[str, Any]]:
    """The [model] and [data] tables of an imported model, as a checkpoint's config.toml would hold them."""
    return {"model": asdict(read_config(folder)), "data": {"tokenizer": "hf"}}


def read_weights(folder: Path) -> dict:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        tensors: dict = {}
        for shard in shards:
            tensors |= load_file(folder / shard)
        return tensors
    raise ValueError(f"{folder}: no model.safetensors (nanoseek reads safetensors only, never pickled weights)")


def import_hf(folder: str | Path) -> tuple[Transformer, HFTokenizer, dict[str, dict[str, Any]]]:
    """The model (float32, eval mode), its tokenizer and its [model] / [data] tables."""
    folder = Path(folder)
    tables = run_config_tables(folder)
    cfg = ModelConfig(**tables["model"])
    tensors = read_weights(folder)
    where = str(folder / "model.safetensors")
    is_remote = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == REMOTE
    state = {k: v.float() for k, v in tensors.items()} if is_remote else from_hf(tensors, cfg, where)
    model = Transformer(cfg)
    expected = model.state_dict()
    for name in sorted(expected.keys() | state.keys()):
        if name not in state or name not in expected or state[name].shape != expected[name].shape:
            got = tuple(state[name].shape) if name in state else "nothing"
            want = tuple(expected[name].shape) if name in expected else "no such tensor"
            raise ValueError(f"{where} does not fit its config.json: {name} is {got}, the config implies {want}")
    model.load_state_dict(state)
    tokenizer = HFTokenizer.from_folder(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size} embeddings"
        )
    return model.eval(), tokenizer, tables
