"""The run config: one TOML file with a section per part, each section the dataclass of the part that owns it.

    [model]   nanoseek.model.config.ModelConfig      the transformer, its residual connections and FFN
    [data]    nanoseek.data.config.DataConfig        the corpus and the tokenizer
    [train]   nanoseek.train.config.TrainConfig      the engine: batch, optimizer, schedule, precision, ...
    [task]    nanoseek.data.tasks.TaskConfig         reasoning stages: the problems and how they are put to a model
    [sft]     nanoseek.train.sft.SFTConfig           what SFT learns from (the task's examples, or a JSONL file)
    [grpo]    nanoseek.rl.grpo.GRPOConfig            GRPO's own hyper-parameters
    [distill] nanoseek.rl.distill.DistillConfig      how a teacher's knowledge reaches a student

A config is read from a preset (TOML shipped in the package), then ``--config`` files in order, then ``--set
section.key=value`` overrides; invalid values fail before any work, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import tomli_w

from nanoseek.data.config import DataConfig
from nanoseek.data.tasks import TaskConfig
from nanoseek.model.config import ModelConfig
from nanoseek.rl.distill import DistillConfig
from nanoseek.rl.grpo import GRPOConfig
from nanoseek.schema import build_section, field_docs, parse_override, read_toml
from nanoseek.train.config import TrainConfig
from nanoseek.train.sft import SFTConfig

PRESETS = "nanoseek.presets"


@dataclass
class RunConfig:
    """Everything a run needs. The optional sections are None when the file has none, so a pretraining
    checkpoint's config stays what it was."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    task: TaskConfig | None = None
    sft: SFTConfig | None = None
    grpo: GRPOConfig | None = None
    distill: DistillConfig | None = None

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "task": TaskConfig,
        "sft": SFTConfig,
        "grpo": GRPOConfig,
        "distill": DistillConfig,
    }
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data", "train")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in self.SECTIONS if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        """Build and validate; unknown sections or keys and values of the wrong type are errors naming them."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a table of sections")
        unknown = set(raw) - set(cls.SECTIONS)
        if unknown:
            raise ValueError(f"{where}: unknown section [{sorted(unknown)[0]}]; allowed: {', '.join(cls.SECTIONS)}")
        parts = {
            name: build_section(section, raw.get(name, {}), name, where)
            for name, section in cls.SECTIONS.items()
            if name in raw or name in cls.REQUIRED
        }
        return cls(**parts)


def load_run_config(
    files: list[str | Path] = (), overrides: list[str] = (), base: dict[str, Any] | None = None
) -> RunConfig:
    """Merge TOML files in order, then ``--set`` overrides, onto ``base`` and validate the result."""
    raw: dict[str, Any] = {k: dict(v) for k, v in (base or {}).items()}
    for path in files:
        loaded = read_toml(path, "config file")
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section].update(values)
            else:
                raw[section] = values
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ValueError(f"--set {text!r}: [{section}] is not a table")
        raw[section][key] = value
    return RunConfig.from_dict(raw)


# ---------------------------------------------------------------------------------------------------------------------
# Presets: TOML files shipped inside the package (nanoseek/presets/...), read with importlib.resources


def preset_names(kind: str = "") -> list[str]:
    folder = resources.files(PRESETS).joinpath(kind) if kind else resources.files(PRESETS)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")) if folder.is_dir() else []


def preset_text(name: str, kind: str = "") -> str:
    """The text of preset ``name`` (``kind``: '' for run configs, 'sft', 'grpo', 'compare', ...)."""
    folder = resources.files(PRESETS).joinpath(kind) if kind else resources.files(PRESETS)
    path = folder.joinpath(f"{name}.toml")
    if not path.is_file():
        where = f"{kind} presets" if kind else "presets"
        raise ValueError(f"--preset {name!r} not found among the {where}; available: {', '.join(preset_names(kind))}")
    return path.read_text(encoding="utf-8")


def preset_path(name: str, kind: str = "") -> Path:
    """A preset as a file path (presets ship as ordinary files inside the package)."""
    preset_text(name, kind)  # the error for an unknown name
    folder = resources.files(PRESETS).joinpath(kind) if kind else resources.files(PRESETS)
    return Path(str(folder.joinpath(f"{name}.toml")))


def checkpoint_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The run config saved in a checkpoint (or a run folder's newest), with ``--set`` overrides applied; for a
    Hugging Face model (``hf:DIR``) its [model] and [data] with defaults for the rest."""
    from nanoseek.interop.hf_import import hf_folder, run_config_tables
    from nanoseek.train.checkpoint import find_checkpoint

    hf = hf_folder(path)
    if hf is not None:
        return load_run_config([], overrides, base=run_config_tables(hf))
    folder = find_checkpoint(path, log=lambda message: None)  # load_checkpoint warns when it falls back
    return load_run_config([], overrides, base=read_toml(folder / "config.toml", "checkpoint config"))


# ---------------------------------------------------------------------------------------------------------------------
# Describing a config: `nanoseek config`


def describe(cfg: RunConfig, width: int = 100) -> str:
    """The resolved config as TOML, every key preceded by its docstring as a comment."""
    out = []
    for name, values in cfg.to_dict().items():
        section = getattr(cfg, name)
        cls = type(section)
        out.append(f"[{name}]  # {cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__}")
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            doc = docs.get(field.name)
            if doc:
                out.extend(_wrap(doc, width))
            out.append(tomli_w.dumps({field.name: values[field.name]}).rstrip())
        out.append("")
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent="# ", subsequent_indent="# ")
