"""The training loop: exact resume, checkpoints, failure handling, schedules, optimizer groups."""

import json
import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.config import TrainConfig, load_run_config
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.optim import build_optimizers, lr_factor, param_groups
from nanoseek.train.trainer import Trainer, TrainingError


def tiny(text_file, *overrides):
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "train.batch_size=4"]
    base += ["train.steps=6", "train.warmup_steps=2", "train.eval_every=3", "train.eval_batches=2", "train.seed=1"]
    return load_run_config([], [*base, f"data.source={json.dumps(str(text_file))}", *overrides])


def losses(run_dir):
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [[], ["model.residual='mhc'", "train.optimizer='muon'", "train.grad_accum=2"]])
def test_resume_continues_bitwise_identically(text_file, tmp_path, extra):
    torch.set_num_threads(1)
    Trainer(tiny(text_file, *extra), tmp_path / "straight", progress=False).run()
    Trainer(tiny(text_file, *extra), tmp_path / "split", progress=False).run(until=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "split")] == ["ckpt-0000003"]
    Trainer(None, tmp_path / "split", resume=tmp_path / "split", progress=False).run()
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(straight) == len(split) == 6
    assert straight == split  # bitwise: same floats, not merely close


def test_training_lowers_the_loss_and_records_costs(text_file, tmp_path):
    summary = Trainer(tiny(text_file, "train.steps=30", "train.eval_every=10"), tmp_path, progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.3
    assert summary["stop_reason"] == "steps" and summary["final_val_loss"] == vals[-1]
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32))
    assert records[-1]["flops"] == 30 * 4 * 32 * model.flops_per_token()
    assert records[-1]["wall_seconds"] > 0 and records[-1]["cpu_seconds"] > 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["data"]["corpus_sha256"] and run["provenance"]["torch"] == torch.__version__


def test_corrupt_checkpoint_is_named_and_refused(text_file, tmp_path):
    Trainer(tiny(text_file, "train.steps=2", "train.warmup_steps=1"), tmp_path, progress=False).run()
    folder = ckpt.list_checkpoints(tmp_path)[-1]
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is corrupt or truncated"):
        Trainer(None, tmp_path, resume=tmp_path, progress=False)
    (folder / "meta.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(folder)


def test_a_failed_save_leaves_the_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    trainer = Trainer(tiny(text_file, "train.steps=4", "train.warmup_steps=1"), tmp_path, progress=False)
    trainer.run(until=2)
    good = ckpt.list_checkpoints(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    trainer.step = 3
    with pytest.raises(OSError):
        trainer.save()
    assert ckpt.list_checkpoints(tmp_path) == good
    ckpt.verify_checkpoint(good[-1])


def test_non_finite_loss_stops_naming_the_step_without_a_checkpoint(text_file, tmp_path):
    trainer = Trainer(tiny(text_file), tmp_path, progress=False)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(math.nan)  # every logit becomes NaN
    with pytest.raises(TrainingError, match="non-finite loss=nan at step 1"):
        trainer.run()
    assert ckpt.list_checkpoints(tmp_path) == []


def test_non_finite_step_can_be_skipped(text_file, tmp_path):
    trainer = Trainer(tiny(text_file, "train.on_nan='skip'"), tmp_path, progress=False)
    calls = []

    def poison_first_call(module, args, output):
        calls.append(1)
        return output * math.nan if len(calls) == 1 else output

    trainer.model.embed.register_forward_hook(poison_first_call)
    summary = trainer.run()
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["final_train_loss"])
    assert summary["step"] == 6 and ckpt.list_checkpoints(tmp_path)


def test_time_budget_stops_with_an_evaluation_and_a_checkpoint(text_file, tmp_path):
    summary = Trainer(tiny(text_file, "train.steps=1000", "train.warmup_steps=1", "train.max_time=0.5"), tmp_path,
                      progress=False).run()  # fmt: skip
    assert summary["stop_reason"] == "max_time" and summary["step"] < 1000
    assert summary["final_val_loss"] is not None and ckpt.list_checkpoints(tmp_path)


def test_learning_rate_schedules_by_hand():
    cos = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_factor(s, cos) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cos) == pytest.approx(1.0)
    assert lr_factor(6, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10, cos) == pytest.approx(0.1)
    wsd = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_factor(s, wsd) for s in range(2, 8)] == [1.0] * 6
    assert [lr_factor(s, wsd) for s in (8, 9)] == [0.5, 0.0]


def test_norms_biases_gates_and_embeddings_are_not_decayed():
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, residual="mhc"))
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["matrices"]}
    assert "blocks.0.attn.fn.q.weight" in decayed and "blocks.1.ffn.fn.down.weight" in decayed
    assert not any(k in n for n in decayed for k in ("norm", "phi", "b_res", "alpha", "embed"))
    (adamw,) = build_optimizers(model, TrainConfig())
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))
    adamw_, muon = build_optimizers(model, TrainConfig(optimizer="muon"))
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(p) for p in groups["matrices"]}
    assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])


def test_moe_experts_are_decayed_routers_are_not_and_loads_are_logged(text_file, tmp_path):
    moe = ["model.ffn='moe'", "model.n_routed_experts=4", "model.top_k=2", "train.optimizer='muon'"]
    trainer = Trainer(tiny(text_file, *moe), tmp_path, progress=False)
    groups = param_groups(trainer.model)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["experts"]} == {"gate_up", "down"}
    assert any("router" in names[id(p)] for p in groups["other"])
    assert not any("router" in names[id(p)] for p in groups["matrices"])
    trainer.run()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= last["moe_max_violation"] <= 3  # 4 experts: at most 4 / 1 - 1
    assert abs(sum(last["moe_layer0_load"]) - 1) < 1e-6
