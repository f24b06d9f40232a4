"""`nanoseek compare`: comparison files, the run cache, the report from known curves, the smoke preset end to end."""

import json
import math

import pytest

from nanoseek.cli import main
from nanoseek.measure import compare
from nanoseek.measure.arms import flops_per_token, load_comparison
from nanoseek.measure.compare import run_comparison, run_folder

BASE = """
[base.model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32
[base.data]
source = {source}
[base.train]
steps = {steps}
batch_size = 4
warmup_steps = 2
eval_every = 2
eval_batches = 2
diag_every = 2
threads = 1
"""


MHC_ARMS = '[arms.baseline]\n[arms.mhc]\nmodel.residual = "mhc"\n'


def write_comparison(tmp_path, text_file, compare="seeds = [0]", arms=MHC_ARMS, steps=6, name="cmp.toml"):
    path = tmp_path / name
    body = BASE.format(source=json.dumps(str(text_file)), steps=steps)
    path.write_text(f"[compare]\n{compare}\n{body}\n{arms}")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# comparison files


@pytest.mark.parametrize(
    "compare_table, arms, message",
    [
        (
            'baseline = "plain"',
            "[arms.baseline]\n[arms.hc]\nmodel.residual='hc'",
            "compare.baseline='plain' is not an arm",
        ),
        ("", "[arms.hc]\nmodel.residual='hc'", "compare.baseline='baseline' is not an arm; arms: hc"),
        ("", "[arms.baseline]\n[arms.hc]\nmodel.residul='hc'", "arms.hc: unknown key model.residul (did you mean"),
        ("", "[arms.baseline]\n[arms.same]\nmodel.residual='plain'", "arms.same is identical to the baseline arm"),
        ("", "[arms.baseline]\n[arms.long]\ntrain.steps=12", "arms.long: train.steps is shared by all arms"),
        ("", "[arms.baseline]\n[arms.other]\ndata.val_fraction=0.1", "arms.other: data.* is shared by all arms"),
        ("", "[arms.baseline]\n[arms.x]\noptim.lr=1", "arms.x: unknown section [optim]"),
        ("", "[arms.baseline]", "only the baseline arm 'baseline'"),
        ("seeds = []", "[arms.baseline]\n[arms.hc]\nmodel.residual='hc'", "compare.seeds=[] is invalid"),
        ("sedes = [1]", "[arms.baseline]\n[arms.hc]\nmodel.residual='hc'", "unknown key compare.sedes"),
        ('budget = "time"', "[arms.baseline]\n[arms.hc]\nmodel.residual='hc'", "compare.budget='time' is invalid"),
    ],
)
def test_bad_comparison_fails_before_anything_runs(tmp_path, text_file, capsys, compare_table, arms, message):
    path = write_comparison(tmp_path, text_file, compare=compare_table, arms=arms, name="bad.toml")
    out = tmp_path / "out"
    assert main(["compare", "--config", str(path), "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_flops_budget_gives_each_arm_the_baseline_flops(tmp_path, text_file):
    path = write_comparison(tmp_path, text_file, compare='budget = "flops"', steps=100)
    comparison = load_comparison(path)
    base, mhc = (comparison.arm_config(arm, 0) for arm in ("baseline", "mhc"))
    assert base.train.steps == 100
    assert mhc.train.steps == round(100 * flops_per_token(base) / flops_per_token(mhc)) < 100
    tokens = load_comparison(write_comparison(tmp_path, text_file, steps=100, name="tokens.toml"))
    assert tokens.arm_config("mhc", 0).train.steps == 100


def test_runs_are_interleaved_by_seed_and_keyed_by_their_config(tmp_path, text_file):
    comparison = load_comparison(write_comparison(tmp_path, text_file, compare="seeds = [3, 1]"))
    runs = comparison.runs()
    assert [(r.arm, r.seed) for r in runs] == [("baseline", 3), ("mhc", 3), ("baseline", 1), ("mhc", 1)]
    assert len({r.key for r in runs}) == 4 and runs[1].name == f"mhc-seed3-{runs[1].key[:12]}"
    again = load_comparison(write_comparison(tmp_path, text_file, compare="seeds = [3, 1]"), ["train.lr=1e-3"])
    assert comparison.runs()[0].key == runs[0].key != again.runs()[0].key


# ---------------------------------------------------------------------------------------------------------------------
# the cache


@pytest.mark.slow
def test_cache_skips_finished_runs_resumes_interrupted_ones_and_reruns_changed_ones(tmp_path, text_file, monkeypatch):
    trained = []
    real_train_run = compare.train_run

    def recording(run, folder, data, meter, bar, resume):
        trained.append((run.arm, resume))
        return real_train_run(run, folder, data, meter, bar, resume)

    monkeypatch.setattr(compare, "train_run", recording)
    out = tmp_path / "out"
    first = load_comparison(write_comparison(tmp_path, text_file))
    report = run_comparison(first, out, progress=False, log=lambda m: None)
    assert trained == [("baseline", False), ("mhc", False)]
    assert [a["name"] for a in report["arms"]] == ["baseline", "mhc"]

    trained.clear()  # the same command again: nothing to train, the same report
    assert run_comparison(first, out, progress=False, log=lambda m: None)["arms"] == report["arms"]
    assert trained == []

    changed = write_comparison(tmp_path, text_file, arms='[arms.baseline]\n[arms.mhc]\nmodel.residual = "hc"\n')
    second = load_comparison(changed)
    folder = run_folder(out, second.runs()[1])
    from nanoseek.train.pretrain import pretrain

    pretrain(second.runs()[1].cfg, folder, progress=False, log=lambda m: None, until=3)  # as if killed at step 3
    report = run_comparison(second, out, progress=False, log=lambda m: None)
    assert trained == [("mhc", True)]  # only the changed arm, continued from its checkpoint
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and report["arms"][1]["full_run"]["steps"] == 6


def test_report_only_names_the_missing_runs(tmp_path, text_file):
    comparison = load_comparison(write_comparison(tmp_path, text_file))
    with pytest.raises(ValueError, match=r"--report-only: 2 of 2 runs are not finished .*baseline-seed0-"):
        run_comparison(comparison, tmp_path / "out", report_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# the report from fake runs with known answers

F = 1000.0  # FLOPs per step of the fake runs


def fake_run(folder, losses, walls, energy_per_second=2.0, world=1):
    """A finished run: evaluations every 10 steps with the given val losses, timed wall seconds at each."""
    folder.mkdir(parents=True)
    records = []
    for i, (loss, wall) in enumerate(zip(losses, walls, strict=True)):
        step = 10 * (i + 1)
        records.append({"step": step, "train_loss": loss + 0.1, "grad_norm": 1.0 + i, "flops": step * F,
                        "wall_seconds": wall, "cpu_seconds": 2 * wall, "warmup_seconds": 0.5,
                        "energy_j": energy_per_second * wall, "val_loss": loss})  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = {"corpus": "test", "corpus_sha256": "ab" * 32, "corpus_bytes": 1, "python_version": "3", "tokenizer": "byte"}
    run = {"world_size": world, "params": 1, "flops_per_token": 1, "energy": {"method": "estimated", "source": "x"},
           "provenance": {"git_commit": "abc"}, "data": data}  # fmt: skip
    (folder / "run.json").write_text(json.dumps(run))
    summary = {
        "stop_reason": "steps",
        "step": records[-1]["step"],
        "final": {"val_loss": losses[-1]},
        "skipped_steps": 0,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "gains.json").write_text("null")


def test_report_from_fake_runs_with_known_answers(tmp_path, text_file):
    arms = '[arms.baseline]\n[arms.fast]\ntrain.optimizer = "muon"\n[arms.never]\nmodel.residual = "hc"\n'
    comparison = load_comparison(
        write_comparison(tmp_path, text_file, compare="seeds = [0, 1]\nprice_per_hour = 3.6", arms=arms, steps=30)
    )
    out = tmp_path / "out"
    curves = {  # (val losses at steps 10, 20, 30; timed wall seconds at them)
        ("baseline", 0): ([3.0, 2.5, 2.0], [10, 20, 30]),
        ("baseline", 1): ([3.0, 2.6, 2.2], [10, 21, 32]),
        ("fast", 0): ([2.8, 2.05, 1.9], [10, 20, 30]),
        ("fast", 1): ([2.9, 2.1, 2.0], [11, 22, 33]),
        ("never", 0): ([2.9, 2.5, 2.3], [10, 20, 30]),
        ("never", 1): ([2.9, 2.5, 2.2], [10, 20, 30]),
    }
    for run in comparison.runs():
        fake_run(run_folder(out, run), *curves[(run.arm, run.seed)])
    report = run_comparison(comparison, out, report_only=True)
    assert report["target_loss"] == pytest.approx(2.1)  # mean of the baseline's final losses 2.0 and 2.2
    base, fast, never = report["arms"]
    # baseline: its full runs are 100 %: 30 F each; 31 s on average (30 and 32 s)
    assert base["compute_pct"] == {"mean": 100.0, "ci95": 0.0, "n": 2}
    assert base["time_pct"]["mean"] == pytest.approx(100.0)
    assert base["time_pct"]["ci95"] == pytest.approx(12.706 * math.sqrt(2) / 31 * 100 / math.sqrt(2), rel=1e-4)
    assert (base["reached_runs"], base["total_runs"]) == (1, 2)  # seed 1 ends at 2.2 > 2.1
    # fast: both seeds reach 2.1 at step 20 (2.05, then 2.1: equality counts), at 20 s and 22 s
    assert (fast["reached_runs"], fast["steps_to_reach"]) == (2, [20, 20])
    assert fast["compute_pct"]["mean"] == pytest.approx(200 / 3) and fast["compute_pct"]["ci95"] == 0.0
    assert fast["time_pct"]["mean"] == pytest.approx(21 / 31 * 100)
    assert fast["time_pct"]["ci95"] == pytest.approx(12.706 * (math.sqrt(2) / 31 * 100) / math.sqrt(2), rel=1e-4)
    assert fast["energy_pct"]["mean"] == pytest.approx(21 / 31 * 100)  # energy ∝ wall time in these fakes
    assert fast["cost_pct"]["mean"] == pytest.approx(21 / 31 * 100)
    assert fast["final_val_loss"]["mean"] == pytest.approx(1.95)
    assert fast["final_val_loss_vs_baseline"]["mean"] == pytest.approx(-0.15)
    # never: does not reach the target, and is not extrapolated
    assert never["reached_runs"] == 0 and never["compute_pct"] is None and never["time_pct"] is None
    assert report["energy_method"] == "estimated" and report["price_per_hour"] == 3.6
    assert base["stability"]["max_grad_norm"] == {"mean": 3.0, "ci95": 0.0, "n": 2}  # grad norms 1, 2, 3
    assert base["stability"]["loss_spikes"] == [0, 0] and base["stability"]["composite_gain"] is None
    assert report["runs"][0]["full"]["cost"] == pytest.approx(30 / 3600 * 3.6)
    md = (out / "report.md").read_text()
    assert md.startswith("# nanoseek compare: cmp")
    table = md.split("\n\n")[2]
    assert "| **Compute** to reach quality | 100.0 % ± 0.0 (3e+04 FLOP) | 66.7 % ± 0.0 | not reached |" in table
    assert "| Runs that reached the target | 1/2 | 2/2 | 0/2 |" in table
    assert {p.name for p in out.glob("*.png")} == {"val_loss_vs_flops.png", "val_loss_vs_time.png"}
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) >= {"baseline", "target_loss", "energy_method", "arms"}
    for arm in saved["arms"]:
        assert set(arm) >= {"name", "reached_runs", "total_runs", "compute_pct", "time_pct", "energy_pct"}


def test_a_given_target_is_measured_against_the_baselines_own_time_to_reach_it(tmp_path, text_file):
    arms = '[arms.baseline]\n[arms.fast]\ntrain.optimizer = "muon"\n'
    comparison = load_comparison(
        write_comparison(tmp_path, text_file, compare="seeds = [0, 1]", arms=arms, steps=30), [], 2.5
    )
    out = tmp_path / "out"
    curves = {("baseline", 0): [3.0, 2.5, 2.0], ("baseline", 1): [3.0, 2.4, 2.2], ("fast", 0): [2.5, 2.0, 1.9],
              ("fast", 1): [2.6, 2.1, 2.0]}  # fmt: skip
    for run in comparison.runs():
        fake_run(run_folder(out, run), curves[(run.arm, run.seed)], [10, 20, 30])
    report = run_comparison(comparison, out, report_only=True)
    base, fast = report["arms"]
    assert report["target_loss"] == 2.5 and report["reference"] == "baseline to reach the target"
    assert base["compute_pct"]["mean"] == 100.0 and fast["steps_to_reach"] == [10, 20]
    assert fast["compute_pct"]["mean"] == pytest.approx(75.0)  # (10 + 20) / 2 steps vs the baseline's 20

    never = load_comparison(
        write_comparison(tmp_path, text_file, compare="seeds = [0, 1]", arms=arms, steps=30), [], 1.5
    )
    with pytest.raises(ValueError, match="--target-loss 1.5 is never reached by the baseline arm 'baseline': its "
                       "lowest validation loss over 2 seed"):  # fmt: skip
        run_comparison(never, out, report_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "| **Compute** to reach quality | 100.0 %" in printed.out and "| baseline | mhc |" in printed.out
    assert printed.err.count(" steps, val loss ") == 4  # a line per finished run
    report = json.loads((out / "report.json").read_text())
    assert [(a["name"], a["total_runs"]) for a in report["arms"]] == [("baseline", 2), ("mhc", 2)]
    assert report["energy_method"] in ("measured", "estimated")
    mhc = report["arms"][1]
    assert mhc["stability"]["composite_gain"]["fwd_max"]["mean"] == pytest.approx(1.0, abs=0.05)
    assert len(mhc["stability"]["layer_gains"]) == 4  # 2 blocks × (attention, FFN)
    assert {p.name for p in out.glob("*.png")} == {
        "val_loss_vs_flops.png", "val_loss_vs_time.png", "residual_gain_per_layer.png"
    }  # fmt: skip
    for run in (out / "runs").iterdir():
        assert {"metrics.jsonl", "config.toml", "run.json", "summary.json", "gains.json"} <= {
            p.name for p in run.iterdir()
        }
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--report-only"]) == 0


def test_help_shows_the_comparison_file_and_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["compare", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for text in ("--preset", "--config", "--target-loss", "--report-only", "--set", "[arms.mhc]", "--out"):
        assert text in out
    assert main(["compare", "--preset", "smoke", "--config", "x.toml"]) == 2
    assert "exactly one of --preset NAME or --config FILE.toml" in capsys.readouterr().err


def test_moe_arms_report_their_expert_balance(tmp_path, text_file):
    arms = "[arms.baseline]\n[arms.moe]\nmodel.ffn='moe'\nmodel.n_routed_experts=4\nmodel.top_k=2"
    comparison = load_comparison(write_comparison(tmp_path, text_file, arms=arms), [], None)
    report = run_comparison(comparison, tmp_path / "out", progress=False)
    base, moe = report["arms"]
    assert base["stability"]["moe_max_violation"] is None
    # the report's figure is the mean over seeds of each run's last logged violation
    finals = []
    for run in comparison.runs():
        if run.arm == "moe":
            last = (run_folder(tmp_path / "out", run) / "metrics.jsonl").read_text().splitlines()[-1]
            finals.append(json.loads(last)["moe_max_violation"])
    assert moe["stability"]["moe_max_violation"]["mean"] == pytest.approx(sum(finals) / len(finals))
    assert "MoE max violation" in (tmp_path / "out" / "report.md").read_text()


def test_every_comparison_preset_is_valid_and_the_demo_has_what_the_claim_needs():
    from nanoseek.config import preset_names, preset_path

    presets = {name: load_comparison(preset_path(name, "compare")) for name in preset_names("compare")}
    assert set(presets) >= {"smoke", "demo", "recipe"}
    assert list(presets["recipe"].arms) == ["baseline", "moe", "recipe"]
    demo = presets["demo"]
    assert list(demo.arms) == ["baseline", "hc", "mhc", "muon"] and len(demo.seeds) >= 3
    configs = {arm: demo.arm_config(arm, 0) for arm in demo.arms}
    assert configs["baseline"].model.residual == "plain" and configs["baseline"].train.optimizer == "adamw"
    assert configs["muon"].model.residual == "plain" and configs["muon"].train.optimizer == "muon"
    assert (configs["hc"].model.residual, configs["mhc"].model.residual) == ("hc", "mhc")
    assert len({c.train.steps * c.train.batch_size * c.model.seq_len for c in configs.values()}) == 1  # same tokens
