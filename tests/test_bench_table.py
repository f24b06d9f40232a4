"""The benchmark table: goals compared right, disturbed runs never reported as met, skipped benchmarks shown."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import cpu_bf16_units, row, write_json  # noqa: E402
from table import write_table  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cores": 2, "bf16": False, "python": "3.11", "torch": "2.13.0", "torch_threads": 2,
           "commit": "abc1234", "date": "2026-12-02 04:00"}  # fmt: skip


def as_run_by_bench(path: Path, status: str, commit: str) -> None:
    """Add to a benchmark's result file what bench.py records about its run."""
    result = json.loads(path.read_text()) | {"status": status, "others_cores": 0.1, "seconds": 60.0}
    path.write_text(json.dumps(result | {"commit": commit, "date": "2026-12-02 05:00"}))


def test_goal_rows_compare_the_value_with_the_bound():
    assert row("x", 1.05, "×", "<= 1.1")["met"] is True
    assert row("x", 1.15, "×", "<= 1.1")["met"] is False
    assert row("x", 0.95, "×", ">= 0.9")["met"] is True
    assert row("x", 40.0, "ms", "< 50")["met"] is True and row("x", 50.0, "ms", "< 50")["met"] is False
    assert row("x", 1.0)["met"] is None and row("x", "not reached", goal="<= 0.2")["met"] is None
    assert row("x", "not reached", goal="<= 0.2", met=False)["met"] is False  # a miss the run itself showed
    assert row("x", 0.1, goal="<= 0.2", met=False)["met"] is True  # a measured value is always compared
    with pytest.raises(ValueError, match="expected one of"):
        row("x", 1.0, goal="~ 1")


def test_the_bf16_units_are_read_from_the_cpu_flags():
    """AMX and AVX512-BF16 alone are told apart (their bf16 speeds differ several-fold), by whole flag names."""
    assert cpu_bf16_units("flags\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8") == "AMX and AVX512-BF16"
    assert cpu_bf16_units("flags\t: fpu avx512f avx512_bf16 avx512_vnni") == "AVX512-BF16 (no AMX)"
    assert cpu_bf16_units("flags\t: fpu avx2 avx512_bf16x") == "" and cpu_bf16_units("") == ""


def test_table_marks_disturbed_runs_and_skipped_benchmarks(tmp_path, monkeypatch):
    (tmp_path / "machine.json").write_text(json.dumps(MACHINE))
    monkeypatch.setattr(sys, "argv", ["quiet.py", "--json", "x"])
    write_json(tmp_path / "quiet.json", "quiet", [row("speed ratio", 1.05, "×", "<= 1.1")], 0.2, 2)
    write_json(tmp_path / "busy.json", "busy", [row("speed ratio", 1.05, "×", "<= 1.1")], 3.5, 2)
    for name, status in (("quiet", "ok"), ("busy", "load too high")):
        as_run_by_bench(tmp_path / f"{name}.json", status, f"{name[0]}bc1234")
    # written by hand, without bench.py's load check: shown, never counted as met
    write_json(tmp_path / "hand.json", "hand", [row("speed ratio", 1.05, "×", "<= 1.1")], 0.1, 2,
               versions={"trl": "1.16.0"})  # fmt: skip
    (tmp_path / "peer.json").write_text(json.dumps({"benchmark": "peer", "status": "skipped: trl not installed",
                                                    "rows": []}))  # fmt: skip
    write_table(tmp_path, tmp_path / "B.md", ["quiet", "busy", "peer", "hand"])
    text = (tmp_path / "B.md").read_text()
    assert "Test CPU, 2 cores (bf16 instructions: no)" in text and "torch 2.13.0" in text
    (tmp_path / "machine.json").write_text(json.dumps(MACHINE | {"bf16": True, "bf16_units": "AVX512-BF16 (no AMX)"}))
    write_table(tmp_path, tmp_path / "B2.md", ["quiet"])
    assert "Test CPU, 2 cores (bf16 instructions: yes, AVX512-BF16 (no AMX))" in (tmp_path / "B2.md").read_text()
    assert "| quiet | speed ratio | 1.05 × | <= 1.1 | met |" in text
    assert "| busy | speed ratio | 1.05 × (load too high) | <= 1.1 | (load too high) |" in text
    assert "| peer | skipped: trl not installed |" in text
    assert "| quiet | `quiet.py --json x` | 2 | 0.20 →" in text
    assert "| ok | qbc1234 | 2026-12-02 05:00 |" in text and "| load too high | bbc1234 |" in text  # code and time
    assert "| peer | — | — | — | — | — | skipped: trl not installed | — | — |" in text
    assert "| hand | speed ratio | 1.05 × (unchecked) | <= 1.1 | (unchecked) |" in text
    assert "| unchecked: not run by bench.py | — | — |" in text and "compared with trl 1.16.0" in text


def test_a_timed_out_benchmark_takes_its_children_with_it(tmp_path):
    from bench import run_group

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")  # fmt: skip
    with pytest.raises(subprocess.TimeoutExpired):
        run_group([sys.executable, "-c", script], timeout=3)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and "Z" not in proc_state(child):
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in proc_state(child)  # gone (or a zombie awaiting init)
    done = run_group([sys.executable, "-c", "print('ok')"], timeout=30)
    assert done.returncode == 0 and done.stdout == "ok\n"


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_failed_benchmark_keeps_its_goals_in_the_table_as_not_measured(tmp_path, monkeypatch):
    import bench

    scripts, out = tmp_path / "scripts", tmp_path / "out"
    scripts.mkdir()
    (scripts / "flaky.py").write_text("import sys\nsys.exit('flaky: it broke')\n")
    monkeypatch.setattr(bench, "HERE", scripts)
    monkeypatch.setattr(bench, "BENCHMARKS", {"flaky": ([], [])})
    monkeypatch.setattr(sys, "argv", ["flaky.py", "--json", "x"])
    write_json(out / "flaky.json", "flaky", [row("speed ratio", 1.05, "×", "<= 1.1"), row("info", 3.0)], 0.1, 2)
    argv = ["--only", "flaky", "--out", str(out), "--table", str(tmp_path / "B.md"), "--max-load", "100"]
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    bench.main()
    text = (tmp_path / "B.md").read_text()
    assert "| flaky | speed ratio | not measured (the run failed) | <= 1.1 | — |" in text
    assert "| flaky | info |" not in text  # a figure without a goal is not kept
    assert "failed (exit 1): flaky: it broke" in text


@pytest.mark.parametrize("case", ["missing", "other machine"])
def test_a_partial_rerun_never_drops_or_mixes_rows(tmp_path, monkeypatch, case):
    """--only on a folder without the other benchmarks' results (a fresh clone), or with results from another
    machine, is refused before anything runs, and the table is left as it was."""
    import bench

    out, table = tmp_path / "out", tmp_path / "B.md"
    table.write_text("the last table\n")
    monkeypatch.setattr(bench, "BENCHMARKS", {"first": ([], []), "second": ([], [])})
    monkeypatch.setattr(bench, "run_one", lambda *args: pytest.fail("a benchmark ran"))
    here = {**MACHINE, "cpu": "This CPU", "cores": 2}
    monkeypatch.setattr(bench, "machine", lambda: here)
    out.mkdir()
    if case == "other machine":
        (out / "machine.json").write_text(json.dumps({**here, "cpu": "Another CPU"}))
        write_json(out / "second.json", "second", [row("speed", 1.0)], 0.1, 2)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "first", "--out", str(out), "--table", str(table)])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    expected = "no results of second" if case == "missing" else "another machine (Another CPU, 2 cores)"
    assert expected in str(stop.value) and "make bench" in str(stop.value)
    assert table.read_text() == "the last table\n"


@pytest.mark.parametrize("amx", [True, False])
def test_residual_overhead_times_bf16_by_default_only_with_amx_and_keeps_its_goal(monkeypatch, amx):
    """Without AMX the bf16 run is left out by default (a bf16 matmul is slower than float32's there) and its goal
    stays in the table as "not measured", with the reason; asked for by name it runs on any CPU."""
    import residual_overhead

    monkeypatch.setattr(residual_overhead, "cpu_has_amx", lambda: amx)
    runs = residual_overhead.parse_args([]).runs
    assert runs == (["eager", "compile", "compile-bf16"] if amx else ["eager", "compile"])
    assert residual_overhead.parse_args(["--runs", "eager,compile-bf16"]).runs == ["eager", "compile-bf16"]
    plain, mhc = {"median": 1.0, "saved": 10.0}, {"median": 1.3, "saved": 11.0}
    rows = residual_overhead.goal_rows({"eager": {"plain": plain, "mhc": mhc}, "compile": {"plain": plain, "mhc": mhc}})
    bf16 = [r for r in rows if "bf16" in r["metric"]]
    if amx:  # asked for and not run: nothing to say about this CPU
        assert bf16 == []
    else:
        assert [(r["goal"], r["met"]) for r in bf16] == [("<= 1.15", None)]
        assert "no AMX" in bf16[0]["value"]
    compiled = next(r for r in rows if r["metric"] == "mhc: compiled fp32 time / plain")
    assert compiled["value"] == pytest.approx(1.3) and compiled["met"] is False


def test_a_figure_over_repeats_shows_its_range_and_whether_every_repeat_met_the_goal(tmp_path, monkeypatch):
    """A median of repeats whose range straddles the goal's bound says so beside the verdict; one whose range is all
    on one side has the plain verdict; the verdict itself is always the median's."""
    (tmp_path / "machine.json").write_text(json.dumps(MACHINE))
    monkeypatch.setattr(sys, "argv", ["moe.py", "--json", "x"])
    rows = [
        row("a", 0.95, "×", ">= 0.9", spread=(0.85, 0.97)),
        row("b", 0.86, "×", ">= 0.9", spread=(0.80, 0.92)),
        row("c", 0.95, "×", ">= 0.9", spread=(0.91, 0.99)),
        row("d", 0.80, "×", ">= 0.9", spread=(0.70, 0.85)),
        row("f", 0.8965, "×", ">= 0.9"),
    ]
    assert rows[0]["spread"] == [0.85, 0.97] and "spread" not in row("e", 1.0)
    with pytest.raises(ValueError, match="lowest, highest"):
        row("x", 1.0, spread=(2.0, 1.0))
    write_json(tmp_path / "moe.json", "moe", rows, 0.2, 2)
    as_run_by_bench(tmp_path / "moe.json", "ok", "abc1234")
    write_table(tmp_path, tmp_path / "B.md", ["moe"])
    text = (tmp_path / "B.md").read_text()
    assert "| moe | a | 0.95 × (repeats 0.85–0.97) | >= 0.9 | met (not in every repeat) |" in text
    assert "| moe | b | 0.86 × (repeats 0.80–0.92) | >= 0.9 | **not met** (met in some repeats) |" in text
    assert "| moe | c | 0.95 × (repeats 0.91–0.99) | >= 0.9 | met |" in text
    assert "| moe | d | 0.80 × (repeats 0.70–0.85) | >= 0.9 | **not met** |" in text
    assert "| moe | f | 0.8965 × | >= 0.9 | **not met** |" in text  # not "0.90": rounded onto the bound
