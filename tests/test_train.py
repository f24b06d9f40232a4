"""Pretraining on the engine: exact resume, checkpoints, failure handling, schedules, optimizer groups."""

import json
import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.config import checkpoint_config, load_run_config
from nanoseek.data.loader import load_token_data
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.config import TrainConfig
from nanoseek.train.engine import Engine, TrainingError
from nanoseek.train.loop import run_stage
from nanoseek.train.optim import build_optimizers, lr_factor, param_groups
from nanoseek.train.pretrain import Pretraining, pretrain
from nanoseek.train.runfolder import RunFolder


def tiny(text_file, *overrides):
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "train.batch_size=4"]
    base += ["train.steps=6", "train.warmup_steps=2", "train.eval_every=3", "train.eval_batches=2", "train.seed=1"]
    return load_run_config([], [*base, f"data.source={json.dumps(str(text_file))}", *overrides])


def quiet(message):
    pass


class Parts:
    """What pretrain() builds, for tests that reach inside (poison a weight, crash a save)."""

    def __init__(self, cfg, out):
        self.cfg, self.folder = cfg, RunFolder(out, log=quiet)
        self.data = load_token_data(cfg.data, cfg.model.seq_len)
        torch.manual_seed(cfg.train.seed)
        self.engine = Engine(Transformer(cfg.model), cfg.train, log=quiet)
        self.stage = Pretraining(self.engine, self.data, cfg.model.seq_len)

    def run(self, **kwargs):
        return run_stage(self.stage, self.engine, self.folder, self.cfg.to_dict(), self.data.tokenizer,
                         progress=False, log=quiet, **kwargs)  # fmt: skip


def train(cfg, out, **kwargs):
    return pretrain(cfg, out, progress=False, log=quiet, **kwargs)


def resume(out, *overrides, **kwargs):
    return pretrain(checkpoint_config(out, list(overrides)), out, resume=True, progress=False, log=quiet, **kwargs)


def losses(run_dir):
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [[], ["model.residual='mhc'", "train.optimizer='muon'", "train.grad_accum=2"]])
def test_resume_continues_bitwise_identically(text_file, tmp_path, extra):
    torch.set_num_threads(1)
    train(tiny(text_file, *extra), tmp_path / "straight")
    train(tiny(text_file, *extra), tmp_path / "split", until=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "split")] == ["ckpt-0000003"]
    resume(tmp_path / "split")
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(straight) == len(split) == 6
    assert straight == split  # bitwise: same floats, not merely close


def test_resuming_a_finished_run_says_so_and_changes_nothing(text_file, tmp_path):
    done = train(tiny(text_file), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    said = []
    again = pretrain(checkpoint_config(tmp_path), tmp_path, resume=True, progress=False, log=said.append)
    assert again == done and (tmp_path / "metrics.jsonl").read_bytes() == before
    assert said == [f"{tmp_path} is already finished (6 of train.steps=6 steps): nothing to do"]
    longer = resume(tmp_path, "train.steps=8")  # a larger step budget continues it
    assert longer["step"] == 8 and len(losses(tmp_path)) == 8


def test_training_lowers_the_loss_and_records_costs(text_file, tmp_path):
    summary = train(tiny(text_file, "train.steps=30", "train.eval_every=10"), tmp_path, info={"provenance": {"x": 1}})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.3
    assert summary["stop_reason"] == "steps" and summary["final"]["val_loss"] == vals[-1]
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32))
    assert records[-1]["flops"] == 30 * 4 * 32 * model.flops_per_token() == summary["flops"]
    assert records[-1]["tokens"] == 30 * 4 * 32
    assert records[-1]["wall_seconds"] > 0 and records[-1]["cpu_seconds"] > 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["data"]["corpus_sha256"] and run["provenance"] == {"x": 1} and run["stage"] == "pretrain"


def test_corrupt_checkpoint_is_named_and_refused(text_file, tmp_path):
    train(tiny(text_file, "train.steps=2", "train.warmup_steps=1"), tmp_path)
    folder = ckpt.list_checkpoints(tmp_path)[-1]
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is corrupt or truncated"):
        resume(tmp_path)
    (folder / "meta.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(folder)


def test_a_failed_save_leaves_the_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    train(tiny(text_file, "train.steps=4", "train.warmup_steps=1", "train.ckpt_every=2"), tmp_path, until=2)
    good = ckpt.list_checkpoints(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        resume(tmp_path)
    assert ckpt.list_checkpoints(tmp_path) == good
    ckpt.verify_checkpoint(good[-1])


def test_non_finite_loss_stops_naming_the_step_without_a_checkpoint(text_file, tmp_path):
    parts = Parts(tiny(text_file), tmp_path)
    with torch.no_grad():
        parts.engine.model.norm.weight.fill_(math.nan)  # every logit becomes NaN
    with pytest.raises(TrainingError, match="non-finite loss=nan at step 1"):
        parts.run()
    assert ckpt.list_checkpoints(tmp_path) == []


def test_non_finite_step_can_be_skipped(text_file, tmp_path):
    parts = Parts(tiny(text_file, "train.on_nan='skip'"), tmp_path)
    calls = []

    def poison_first_call(module, args, output):
        calls.append(1)
        return output * math.nan if len(calls) == 1 else output

    parts.engine.model.embed.register_forward_hook(poison_first_call)
    summary = parts.run()
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["final"]["train_loss"])
    assert summary["step"] == 6 and ckpt.list_checkpoints(tmp_path)


def test_time_budget_stops_with_an_evaluation_and_a_checkpoint(text_file, tmp_path):
    summary = train(tiny(text_file, "train.steps=1000", "train.warmup_steps=1", "train.max_time=0.5"), tmp_path)
    assert summary["stop_reason"] == "max_time" and summary["step"] < 1000
    assert summary["final"]["val_loss"] is not None and ckpt.list_checkpoints(tmp_path)


def test_compute_budget_stops_at_the_first_step_that_reaches_it(text_file, tmp_path):
    per_step = 4 * 32 * Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32)).flops_per_token()
    summary = train(tiny(text_file, "train.steps=1000", f"train.max_flops={2.5 * per_step}"), tmp_path)
    assert summary["stop_reason"] == "max_flops" and summary["step"] == 3 and summary["flops"] == 3 * per_step


def test_learning_rate_schedules_by_hand():
    cos = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_factor(s, cos) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cos) == pytest.approx(1.0)
    assert lr_factor(6, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10, cos) == pytest.approx(0.1)
    wsd = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_factor(s, wsd) for s in range(2, 8)] == [1.0] * 6
    assert [lr_factor(s, wsd) for s in (8, 9)] == [0.5, 0.0]
    constant = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.0, schedule="constant")
    assert [lr_factor(s, constant) for s in range(10)] == [0.5] + [1.0] * 9


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


@pytest.mark.parametrize("ffn", ["swiglu", "moe"])
def test_fused_adamw_update_equals_the_per_parameter_loop_in_float64(ffn):
    """The engine's AdamW runs torch's fused kernel; five updates with the model's real groups (decayed matrices
    and experts, undecayed rest) and changing gradients land where the plain per-parameter loop lands."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=16, residual="mhc", ffn=ffn,
                      n_routed_experts=4, top_k=2)  # fmt: skip
    torch.manual_seed(0)
    fused_model = Transformer(cfg).double()
    loop_model = Transformer(cfg).double()
    loop_model.load_state_dict(fused_model.state_dict())
    train = TrainConfig(lr=3e-2, weight_decay=0.1)
    (fused,) = build_optimizers(fused_model, train)
    (loop,) = build_optimizers(loop_model, train)
    assert all(g["fused"] for g in fused.param_groups)
    for g in loop.param_groups:
        g["fused"], g["foreach"] = False, False
    params = list(zip(fused_model.parameters(), loop_model.parameters(), strict=True))
    start = [a.detach().clone() for a, _ in params]
    for step in range(5):
        for a, b in params:
            a.grad = torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    assert max(float((a.detach() - a0).abs().max()) for (a, _), a0 in zip(params, start, strict=True)) > 0.1  # it moved
    for a, b in params:
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_moe_experts_are_decayed_routers_are_not_and_loads_are_logged(text_file, tmp_path):
    moe = ["model.ffn='moe'", "model.n_routed_experts=4", "model.top_k=2", "train.optimizer='muon'"]
    parts = Parts(tiny(text_file, *moe), tmp_path)
    model = parts.engine.model
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["experts"]} == {"gate_up", "down"}
    assert any("router" in names[id(p)] for p in groups["other"])
    assert not any("router" in names[id(p)] for p in groups["matrices"])
    parts.run()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    # the logged loads are the last update's counts: 4 windows × 32 tokens × top-2 = 256 token-expert pairs
    layer = model.moe_layers()[0]
    assert int(layer.last_load.sum()) == 4 * 32 * 2
    fractions = (layer.last_load.double() / 256).tolist()
    assert last["moe_layer0_load"] == pytest.approx(fractions)
    assert last["moe_layer0_max_violation"] == pytest.approx(max(fractions) * 4 - 1)
