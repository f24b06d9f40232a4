"""Measurement: energy meters and their labels, the trainer's energy accounting, and the comparison statistics."""

import json
import math
import sys
import types

import pytest
import torch

from nanoseek.config import checkpoint_config, load_run_config
from nanoseek.measure import energy
from nanoseek.measure.stats import diff_ci, first_reach, loss_spikes, mean_ci
from nanoseek.train.pretrain import pretrain

# ---------------------------------------------------------------------------------------------------------------------
# meters


def test_cpu_meter_is_labelled_estimated_and_charges_watts_per_cpu_second(monkeypatch):
    clock = iter([100.0, 102.5])
    monkeypatch.setattr(energy.time, "process_time", lambda: next(clock))
    meter = energy.CpuTimeMeter(watts_per_core=10.0)
    assert meter.read() == pytest.approx(25.0)  # 2.5 CPU seconds × 10 W
    assert meter.describe() == {"method": "estimated", "source": "process CPU seconds × 10 W per core"}
    with pytest.raises(ValueError, match="watts_per_core=0 is invalid"):
        energy.CpuTimeMeter(0)


def test_without_rapl_or_nvml_the_meter_is_an_estimate(tmp_path, monkeypatch):
    meter = energy.select_meter("cpu", 7.0, powercap=tmp_path / "absent")
    assert isinstance(meter, energy.CpuTimeMeter) and meter.method == "estimated" and meter.watts == 7.0
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    meter = energy.select_meter("cuda", powercap=tmp_path / "absent")
    assert meter.method == "estimated" and "GPU energy NOT included" in meter.source


def _zone(root, name, kind, uj, max_uj=1_000_000):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(kind + "\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_package_counters_are_measured_and_unwrapped(tmp_path):
    package = _zone(tmp_path, "intel-rapl:0", "package-0", 900_000)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5)  # inside the package: would double count
    _zone(tmp_path, "intel-rapl:1", "psys", 7)  # the whole platform: would double count
    _zone(tmp_path, "intel-rapl-mmio:0", "package-0", 9)  # the same package through MMIO
    root_only = _zone(tmp_path, "intel-rapl:2", "package-1", 0)
    (root_only / "energy_uj").unlink()  # as when the kernel restricts it to root
    meter = energy.select_meter("cpu", powercap=tmp_path)
    assert isinstance(meter, energy.RaplMeter) and meter.method == "measured"
    assert meter.zones == [package]
    (package / "energy_uj").write_text("950000\n")
    assert meter.read() == pytest.approx(0.05)
    (package / "energy_uj").write_text("100000\n")  # wrapped at 1 J: 0.05 J to the top, then 0.1 J
    assert meter.read() == pytest.approx(0.2)


def test_nvml_counter_is_measured_in_joules(monkeypatch):
    counter = {"mj": 5_000}

    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: uuid,
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: counter["mj"],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = types.SimpleNamespace(uuid="1234-abcd", name="Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    meter = energy.select_meter("cuda")
    assert isinstance(meter, energy.NvmlMeter) and meter.handles == ["GPU-1234-abcd"]
    assert meter.describe()["method"] == "measured" and "Fake GPU" in meter.source
    counter["mj"] += 2_500
    assert meter.read() == pytest.approx(2.5)


class CountingMeter(energy.EnergyMeter):
    """1 J per read: the trainer reads it once when its clock starts and once when it stops."""

    method, source = "measured", "test"

    def __init__(self):
        self.reads = 0

    def read(self) -> float:
        self.reads += 1
        return float(self.reads)


def test_trainer_meters_only_timed_steps_and_resumes_the_count(text_file, tmp_path):
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "train.batch_size=4"]
    base += ["train.steps=6", "train.warmup_steps=2", "train.eval_every=3", "train.eval_batches=2", "train.threads=1"]
    cfg = load_run_config([], [*base, f"data.source={json.dumps(str(text_file))}"])
    seen = []
    pretrain(cfg, tmp_path, progress=False, meter=CountingMeter(), callback=seen.append, until=4)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # step 1 is the untimed warm-up; each later step is one start/stop pair = 1 J; evaluations are not metered
    assert [r["energy_j"] for r in records] == [0.0, 1.0, 2.0, 3.0]
    assert seen == records
    assert json.loads((tmp_path / "run.json").read_text())["energy"] == {"method": "measured", "source": "test"}
    summary = pretrain(checkpoint_config(tmp_path), tmp_path, resume=True, progress=False, meter=CountingMeter())
    assert summary["energy_j"] == 4.0  # 3 J before the checkpoint at step 4, then step 5 is warm-up and step 6 1 J


# ---------------------------------------------------------------------------------------------------------------------
# statistics


def test_confidence_intervals_match_the_t_table():
    mean, ci = mean_ci([1.0, 2.0, 3.0])  # s = 1, n = 3: t_{0.975, 2} = 4.303
    assert mean == 2.0 and ci == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    mean, ci = mean_ci([2.0, 4.0, 4.0, 4.0, 6.0])  # s = sqrt(2), n = 5: t_{0.975, 4} = 2.776
    assert mean == 4.0 and ci == pytest.approx(2.776 * math.sqrt(2) / math.sqrt(5), rel=1e-3)
    assert mean_ci([1.5]) == (1.5, None)
    with pytest.raises(ValueError):
        mean_ci([])


def test_welch_interval_of_a_difference():
    # equal sizes and variances: se = sqrt(1/3 + 1/3), Welch-Satterthwaite df = 4, t_{0.975, 4} = 2.776
    delta, ci = diff_ci([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert delta == -1.0 and ci == pytest.approx(2.776 * math.sqrt(2 / 3), rel=1e-3)
    assert diff_ci([1.0], [2.0, 3.0]) == (-1.5, None)


def _evals(*losses):
    return [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(losses)]


def test_to_reach_is_the_first_evaluation_at_or_below_the_target():
    assert first_reach(_evals(3.0, 2.5, 2.0, 1.9, 2.1), 2.0)["step"] == 30  # first crossing, equality counts
    assert first_reach(_evals(3.0, 2.5, 1.8, 2.2, 1.7), 2.0)["step"] == 30  # not the last one
    assert first_reach(_evals(1.5, 1.4), 2.0)["step"] == 10  # reached at the first evaluation
    assert first_reach(_evals(3.0, 2.5, 2.01), 2.0) is None  # not reached: never extrapolated


def test_loss_spikes_are_rises_above_the_recent_median():
    losses = [3.0] * 5 + [9.0] + [2.0] * 20  # index 5: huge, but inside the first window
    losses += [2.59, 2.61, 2.0, math.nan, 2.0]  # 30 % above the median 2.0 is 2.6
    assert loss_spikes(losses) == [27, 29]
    assert loss_spikes(losses, rise=0.1) == [26, 27, 29]
