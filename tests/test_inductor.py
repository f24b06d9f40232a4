"""The once-per-process preparation of CPU compiles (nanoseek.inductor)."""

from __future__ import annotations

import torch

import nanoseek.inductor as inductor
from nanoseek.model import ModelConfig, Transformer
from nanoseek.model.generate import compiled_decode_step
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine


def test_nothing_is_started_for_other_devices(monkeypatch):
    monkeypatch.setattr(inductor, "_thread", None)
    assert inductor.prepare_in_background("cuda") is None
    assert inductor._thread is None


def test_the_preparation_runs_once_and_fills_inductors_own_caches(monkeypatch):
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    monkeypatch.setattr(inductor, "_thread", None)
    valid_vec_isa_list.cache_clear()
    thread = inductor.prepare_in_background("cpu")
    assert thread is not None and inductor.prepare_in_background("cpu") is thread  # started once per process
    thread.join(timeout=120)
    assert not thread.is_alive()
    # the compile's own call is now answered from the cache, without probing again
    assert valid_vec_isa_list.cache_info().currsize == 1
    hits = valid_vec_isa_list.cache_info().hits
    valid_vec_isa_list()
    assert valid_vec_isa_list.cache_info().hits == hits + 1


def test_every_compile_nanoseek_sets_up_starts_it(monkeypatch):
    started: list[str] = []
    monkeypatch.setattr(inductor, "_thread", None)
    monkeypatch.setattr("nanoseek.train.distributed.prepare_in_background", started.append)
    monkeypatch.setattr("nanoseek.model.generate.prepare_in_background", started.append)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, seq_len=16)
    Engine(Transformer(cfg), TrainConfig(compile=False), log=lambda m: None)
    assert started == []  # no compile, no preparation
    Engine(Transformer(cfg), TrainConfig(compile=True), log=lambda m: None)
    assert started == ["cpu"]
    compiled_decode_step(Transformer(cfg))
    assert started == ["cpu", "cpu"]
    torch.compiler.reset()
