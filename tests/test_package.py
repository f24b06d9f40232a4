"""nanoseek as a package: its layers import only downward, it installs as a wheel and runs its presets from any
folder, and `nanoseek config` documents every key."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nanoseek
from nanoseek.cli import main

ROOT = Path(nanoseek.__file__).resolve().parent


def imports_of(path: Path) -> set[str]:
    """Every nanoseek module or torch.distributed a file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith(("nanoseek", "torch.distributed"))}


def part_imports(part: str) -> dict[str, set[str]]:
    files = sorted((ROOT / part).rglob("*.py")) if (ROOT / part).is_dir() else [ROOT / f"{part}.py"]
    return {str(f.relative_to(ROOT)): imports_of(f) for f in files}


def offenders(part: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f} imports {m}" for f, ms in part_imports(part).items() for m in sorted(ms) if m.startswith(forbidden)]


def test_the_layers_import_only_downward():
    model_forbidden = ("nanoseek.train", "nanoseek.data", "nanoseek.rl", "nanoseek.measure", "nanoseek.cli",
                       "nanoseek.serve", "torch.distributed", "nanoseek.config")  # fmt: skip
    assert offenders("model", model_forbidden) == []
    assert (
        offenders("data", ("nanoseek.model", "nanoseek.train", "nanoseek.rl", "nanoseek.measure", "nanoseek.cli")) == []
    )
    assert offenders("train", ("nanoseek.measure", "nanoseek.rl", "nanoseek.cli", "nanoseek.config")) == []
    importers_of_cli = [f for f in ROOT.rglob("*.py") if "nanoseek.cli" in imports_of(f) and f.name != "__main__.py"]
    assert importers_of_cli == []


def test_the_import_checker_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nanoseek.train.engine import Engine\n    import torch.distributed as dist\n")
    assert imports_of(probe) == {"nanoseek.train.engine", "nanoseek.train.engine.Engine", "torch.distributed"}


def test_config_prints_every_key_with_its_docstring(capsys):
    assert main(["config", "--preset", "grpo/demo", "--set", "grpo.mu=2"]) == 0
    out = capsys.readouterr().out
    assert "[grpo]" in out and "mu = 2" in out and "[task]" in out and "max_new_tokens = 48" in out
    assert "# Optimizer updates per sampled batch" in out  # mu's docstring, as a comment above it
    assert main(["config", "--all"]) == 0
    out = capsys.readouterr().out
    for section in ("[model]", "[data]", "[train]", "[task]", "[grpo]"):
        assert section in out
    assert main(["config", "--list"]) == 0
    assert "compare: demo, recipe, smoke" in capsys.readouterr().out
    assert main(["config", "--preset", "nope"]) == 2
    assert "--preset 'nope' not found among the presets; available: demo, gpu-small, tiny" in capsys.readouterr().err


def test_data_flag_trains_on_a_folder_of_text(tmp_path, text_file, capsys):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "a.txt").write_text(text_file.read_text()[:30_000])
    (corpus / "b.md").write_bytes(text_file.read_bytes()[30_000:] + b"\xff\xfe invalid utf-8")
    args = ["train", "--preset", "tiny", "--no-progress", "--set", "train.steps=2", "--set", "train.warmup_steps=1"]
    assert main([*args, "--data", str(corpus), "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["corpus"] == str(corpus) and run["data"]["corpus_documents"] == 2
    assert run["data"]["invalid_utf8_bytes"] == 2
    assert main([*args, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "is neither 'python-docs' nor an existing file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wheel_installs_and_runs_presets_from_another_folder(tmp_path):
    """Build the wheel, install it (without dependencies: this environment already has them) into a folder of its
    own, and run presets from an unrelated folder: the installed copy — not this checkout — must do the work."""
    checkout = ROOT.parent
    wheel_cmd = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(checkout)]
    built = subprocess.run([sys.executable, "-m", *wheel_cmd], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("nanoseek-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def nanoseek(*args):
        done = subprocess.run([sys.executable, "-m", "nanoseek", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import nanoseek; print(nanoseek.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert where.startswith(str(site))
    nanoseek("train", "--preset", "tiny", "--no-progress", "--out", "tiny")
    assert json.loads((elsewhere / "tiny" / "summary.json").read_text())["step"] == 8
    assert "| **Compute** to reach quality |" in nanoseek("compare", "--preset", "smoke", "--no-progress")
