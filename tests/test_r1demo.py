"""The r1-demo: every arm's config is valid and fair (same worked examples, separate RL pool, equal FLOPs), the
verdict rule by hand, and the whole pipeline end to end on the smoke preset."""

import json

import pytest

from nanoseek.config import load_run_config, preset_path
from nanoseek.measure.r1demo import BUDGETED, STUDENT_ARMS, arm_config, jobs, load_r1_config
from nanoseek.measure.r1report import verdict


def test_the_verdict_is_the_side_of_zero_the_interval_lies_on():
    assert verdict([0.10, 0.12, 0.08])[0] == "confirmed"
    assert verdict([-0.10, -0.12, -0.08])[0] == "reversed"
    assert verdict([0.10, -0.10, 0.05])[0] == "not confirmed"
    assert verdict([0.5])[0] == "not confirmed"  # one seed: no interval, no verdict
    assert verdict([-0.10, -0.12, -0.08], claim_positive=False)[0] == "confirmed"
    _, f = verdict([0.10, 0.12, 0.08])
    assert f["mean"] == pytest.approx(0.10) and f["ci95"] == pytest.approx(4.303 * 0.02 / 3**0.5, rel=1e-3)


def test_every_arm_is_a_valid_run_and_the_arms_are_compared_fairly(tmp_path):
    c = load_r1_config(preset_path("demo", "r1"))
    configs = {arm: load_run_config([], [], base=arm_config(c, arm, 1, budget=1e12, out=tmp_path))
               for arm in (*STUDENT_ARMS, "teacher-cold", "teacher-grpo")}  # fmt: skip
    cold, grpo = configs["cold"], configs["grpo"]
    assert cold.task.worked_examples == c.worked_examples and cold.train.seed == 1
    assert configs["sft-more"].train.seed == 1  # the same worked examples as the cold start
    assert grpo.train.seed != 1 and configs["sft-answers"].train.seed == grpo.train.seed  # the pool, not the examples
    assert configs["sft-unlimited"].task.worked_examples == 0 and configs["sft-answers"].sft.targets == "answers"
    for arm in BUDGETED:
        assert configs[arm].train.max_flops == 1e12  # equal student compute: the grpo arm's FLOPs
    assert configs["sft-more"].train.lr == cold.train.lr and cold.train.schedule == "constant"
    assert configs["grpo-process"].grpo.advantage == "process" and configs["r1-zero"].grpo.format_weight > 0
    assert configs["teacher-cold"].model.d_model > cold.model.d_model
    assert configs["distill-onpolicy"].distill.teacher.endswith("teacher/grpo")
    graph = jobs(c)
    assert graph["seed1/distill-traces"] == ("seed1/grpo", "teacher/traces") and graph["eval:seed1/cold"] == (
        "seed1/cold",
    )


@pytest.mark.slow
def test_the_smoke_preset_runs_every_arm_and_writes_the_report(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["r1-demo", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    # an untrained teacher solves nothing, so the traces arm is skipped and claims 3 and 4 say so
    assert set(report["arms"]) == set(STUDENT_ARMS) - {"distill-traces"}
    verdicts = {c["claim"]: c["verdict"] for c in report["claims"]}
    assert set(verdicts) == {1, 2, 3, 4, 5, 6} and verdicts[3].startswith("not measured")
    assert {p.name for p in tmp_path.glob("*.png")} == {"accuracy_vs_flops.png", "rl_length_and_format.png",
                                                        "pass_at_k.png"}  # fmt: skip
    assert "| **grpo**: cold start + GRPO on the pool |" in capsys.readouterr().out
    assert main(["r1-demo", "--preset", "smoke", "--out", str(tmp_path), "--set", "task.x=1"]) == 2
