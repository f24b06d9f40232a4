"""A comparison as data: named arms, each a few config overrides on one common base run, trained over the same seeds.

A comparison file is TOML::

    [compare]
    seeds = [0, 1, 2]          # every arm runs every seed
    baseline = "baseline"      # the arm the others are measured against
    budget = "tokens"          # every arm trains on the same tokens; or "flops": the same analytic FLOPs
    target_loss = 0            # 0: the baseline's final validation loss, mean over its seeds
    watts_per_core = 5.0       # for the energy estimate when no meter is readable (see energy.py)
    price_per_hour = 0.10      # per device-hour; default by device (see DEFAULT_PRICE_PER_HOUR)

    [base.model]               # the common base: [base.model], [base.data], [base.train] as in a run config
    d_model = 128
    [base.train]
    steps = 600

    [arms.baseline]            # no overrides: the base itself
    [arms.mhc]
    model.residual = "mhc"     # dotted keys: section.key = value

Keys that define the data, the token budget or when quality is measured are shared by all arms and may only be set in
the base (``SHARED_KEYS``): otherwise the arms would not be compared on the same terms.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import nanoseek
from nanoseek.config import RunConfig
from nanoseek.measure.energy import DEFAULT_WATTS_PER_CORE
from nanoseek.model import Transformer
from nanoseek.schema import parse_override, read_toml

BUDGETS = ("tokens", "flops")
COMPARE_KEYS = ("seeds", "baseline", "budget", "target_loss", "watts_per_core", "price_per_hour")
SHARED_KEYS = {
    "model": ("seq_len", "vocab_size"),
    "train": ("seed", "steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "max_time"),
}
DEFAULT_PRICE_PER_HOUR = {"cpu": 0.10, "cuda": 2.00}
"""Dollars per device-hour. cuda: the $2 per H800-hour rental price DeepSeek used for V3's and R1's cost figures;
cpu: roughly the on-demand price of a 2-vCPU cloud machine (the 'device' is the whole machine)."""

# The sources that decide what a run computes; report and CLI code may change without invalidating cached runs.
TRAINING_CODE = ("config.py", "schema.py", "model", "data", "train", "measure/energy.py")
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class Run:
    """One training run of a comparison: an arm at a seed."""

    arm: str
    seed: int
    cfg: RunConfig
    key: str
    """SHA-256 (hex) of the full run config, the training code and the torch version."""

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}-{self.key[:12]}"


@dataclass
class Comparison:
    name: str
    seeds: list[int]
    baseline: str
    budget: str
    target_loss: float
    """0 = the baseline's final validation loss (mean over seeds)."""
    watts_per_core: float
    price_per_hour: float | None
    """None = DEFAULT_PRICE_PER_HOUR of the device."""
    base: dict[str, dict[str, Any]]
    """The resolved base run config (every key, --set applied)."""
    arms: dict[str, dict[str, dict[str, Any]]]
    """arm name -> {section: {key: value}} overrides, in file order (the baseline first)."""

    def price(self, device: str) -> float:
        """Dollars per device-hour: price_per_hour, else the default for ``device`` ('cpu' or 'cuda')."""
        return self.price_per_hour if self.price_per_hour is not None else DEFAULT_PRICE_PER_HOUR[device]

    def arm_config(self, arm: str, seed: int, vocab_size: int | None = None) -> RunConfig:
        """The validated run config of ``arm`` at ``seed``. With budget 'flops' its steps are the baseline's ×
        the baseline's FLOPs per token ÷ the arm's, rounded."""
        raw = copy.deepcopy(self.base)
        for section, values in self.arms[arm].items():
            raw.setdefault(section, {}).update(values)
        raw["train"]["seed"] = seed
        if vocab_size is not None:
            raw["model"]["vocab_size"] = vocab_size
        cfg = RunConfig.from_dict(raw, where=f"arms.{arm}")
        if self.budget == "tokens" or arm == self.baseline:
            return cfg
        baseline = self.arm_config(self.baseline, seed, vocab_size)
        raw["train"]["steps"] = round(baseline.train.steps * flops_per_token(baseline) / flops_per_token(cfg))
        return RunConfig.from_dict(raw, where=f"arms.{arm} (budget='flops': {raw['train']['steps']} steps)")

    def runs(self, vocab_size: int | None = None) -> list[Run]:
        """Every run, interleaved by seed: all arms of the first seed, then of the second, ..."""
        code = code_version()
        out = []
        for seed in self.seeds:
            for arm in self.arms:
                cfg = self.arm_config(arm, seed, vocab_size)
                blob = json.dumps({"config": cfg.to_dict(), "code": code}, sort_keys=True)
                out.append(Run(arm, seed, cfg, hashlib.sha256(blob.encode()).hexdigest()))
        return out


def device_type(cfg: RunConfig) -> str:
    """'cuda' or 'cpu': where the run's train.device puts it on this machine."""
    want = cfg.train.device
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def flops_per_token(cfg: RunConfig) -> int:
    with torch.device("meta"):  # analytic: no weights are allocated
        return Transformer(cfg.model).flops_per_token()


def code_version() -> str:
    """SHA-256 of the training code's sources (TRAINING_CODE) and the torch version: a change re-runs the runs."""
    root = Path(nanoseek.__file__).resolve().parent
    h = hashlib.sha256(f"torch {torch.__version__}\n".encode())
    for entry in TRAINING_CODE:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def load_comparison(path: str | Path, base_overrides: list[str] = (), target_loss: float | None = None) -> Comparison:
    """Read and validate a comparison file; ``base_overrides`` (--set) apply to the base, ``target_loss`` to
    [compare]. Every mistake is a ValueError naming it, raised before anything runs."""
    path = Path(path)
    raw = read_toml(path, "comparison file")
    unknown = set(raw) - {"compare", "base", "arms"}
    if unknown:
        raise ValueError(f"{path.name}: unknown table [{sorted(unknown)[0]}]; allowed: compare, base, arms")
    opts = raw.get("compare", {})
    bad = set(opts) - set(COMPARE_KEYS)
    if bad:
        raise ValueError(f"{path.name}: unknown key compare.{sorted(bad)[0]}; allowed: {', '.join(COMPARE_KEYS)}")
    seeds = opts.get("seeds", [0, 1, 2])
    if not (isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ValueError(f"compare.seeds={seeds!r} is invalid: expected a list of integers >= 0, e.g. [0, 1, 2]")
    if not seeds:
        raise ValueError("compare.seeds=[] is invalid: at least one seed is needed (3 or more for a useful CI)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"compare.seeds={seeds!r} is invalid: seeds must be distinct")
    budget = opts.get("budget", "tokens")
    if budget not in BUDGETS:
        raise ValueError(f"compare.budget={budget!r} is invalid: expected one of {', '.join(BUDGETS)}")
    target = opts.get("target_loss", 0.0) if target_loss is None else target_loss
    if not (isinstance(target, (int, float)) and not isinstance(target, bool) and target >= 0):
        raise ValueError(f"target_loss={target!r} is invalid: expected a loss > 0 (or 0: the baseline's final loss)")
    watts = opts.get("watts_per_core", DEFAULT_WATTS_PER_CORE)
    if not (isinstance(watts, (int, float)) and not isinstance(watts, bool) and watts > 0):
        raise ValueError(f"compare.watts_per_core={watts!r} is invalid: expected a positive number of watts")
    price = opts.get("price_per_hour")
    if price is not None and not (isinstance(price, (int, float)) and not isinstance(price, bool) and price >= 0):
        raise ValueError(f"compare.price_per_hour={price!r} is invalid: expected dollars per device-hour >= 0")

    base = raw.get("base", {})
    if not isinstance(base, dict) or any(not isinstance(v, dict) for v in base.values()):
        raise ValueError(f"{path.name}: [base] must hold the tables [base.model], [base.data], [base.train]")
    base = {section: dict(values) for section, values in base.items()}
    for text in base_overrides:
        section, key, value = parse_override(text)
        base.setdefault(section, {})[key] = value
    base_cfg = RunConfig.from_dict(base, where="base")
    if base_cfg.train.max_time:
        raise ValueError(
            f"base train.max_time={base_cfg.train.max_time} is invalid in a comparison: every arm runs its full "
            "budget, so it must be 0"
        )

    arms = raw.get("arms", {})
    if not isinstance(arms, dict) or not arms:
        raise ValueError(f"{path.name}: no arms; add tables like [arms.baseline] and [arms.mhc]")
    for name, overrides in arms.items():
        _check_arm(name, overrides)
    baseline = opts.get("baseline", "baseline")
    if baseline not in arms:
        raise ValueError(f"compare.baseline={baseline!r} is not an arm; arms: {', '.join(arms)}")
    if len(arms) < 2:
        raise ValueError(f"{path.name}: only the baseline arm {baseline!r}; add at least one arm to compare with it")
    arms = {baseline: arms[baseline]} | {k: v for k, v in arms.items() if k != baseline}
    comparison = Comparison(
        path.stem, seeds, baseline, budget, float(target), float(watts), price, base_cfg.to_dict(), arms
    )
    reference = comparison.arm_config(baseline, seeds[0]).to_dict()
    for arm in arms:
        if arm != baseline and comparison.arm_config(arm, seeds[0]).to_dict() == reference:
            raise ValueError(f"arms.{arm} is identical to the baseline arm {baseline!r}: it would measure nothing")
    return comparison


def _check_arm(name: str, overrides: Any) -> None:
    if not _ARM_NAME.fullmatch(name):
        raise ValueError(f"arm name {name!r} is invalid: use letters, digits, '_', '-' or '.' (it names folders)")
    if not isinstance(overrides, dict) or any(not isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f'arms.{name}: overrides must be dotted keys like model.residual = "mhc"')
    for section, values in overrides.items():
        if section == "data":
            raise ValueError(f"arms.{name}: data.* is shared by all arms (same data); set it in [base.data]")
        for key in values:
            if key in SHARED_KEYS.get(section, ()):
                raise ValueError(
                    f"arms.{name}: {section}.{key} is shared by all arms (it fixes the budget, the seeds or the "
                    f"evaluations); set it in [base.{section}]"
                )
