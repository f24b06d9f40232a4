# nanoseek: `make test` and `make demo` set everything up in .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build on this machine's disk only when no torch is installed yet; a user with a GPU
# brings their own torch and it is kept.
TORCH_PIN := torch==2.13.0

.PHONY: venv test test-fast lint format bench demo train-demo reason-demo r1-demo chat-demo clean

DEMO_OUT := runs/demo-$(shell date +%Y%m%d-%H%M%S)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev,serve]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check nanoseek tests benchmarks
	$(PY) -m ruff format --check nanoseek tests benchmarks

format: venv
	$(PY) -m ruff format nanoseek tests benchmarks
	$(PY) -m ruff check --fix nanoseek tests benchmarks

# The full suite (CI runs this); `make test-fast` leaves out the end-to-end runs marked slow.
test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest

test-fast: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -m "not slow"

# Train the demo model on the embedded Python docs (about 8 minutes on 2 cores), then print samples
# (prompt + new tokens must fit the demo's 128-byte context).
train-demo: venv
	$(PY) -m nanoseek train --preset demo --out $(DEMO_OUT)
	$(PY) -m nanoseek sample --ckpt $(DEMO_OUT) --prompt "The with statement" --num-samples 2 --max-new-tokens 100

# Every benchmark at its default size (about 20 minutes on 2 idle cores), waiting for a quiet machine, then the table
# in docs/BENCHMARKS.md. The optional peers (TRL, transformers) come with: .venv/bin/pip install -e ".[bench]" torch==2.13.0
bench: venv
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) .pytest_cache runs

# Reasoning by RL at laptop scale: SFT cold start, evaluate, GRPO vs an extra-SFT control, evaluate, 3 seeds.
reason-demo: venv
	OMP_NUM_THREADS=1 $(PY) -m nanoseek reason-demo --out runs/reason-demo-$(shell date +%Y%m%d-%H%M%S)

# The R1 pipeline at laptop scale, each claim against its control, 3 seeds (≈ 30 minutes on 2 idle cores). Finished
# runs are cached in runs/r1-demo, so a second `make r1-demo` only rebuilds the report.
r1-demo: venv
	OMP_NUM_THREADS=1 $(PY) -m nanoseek r1-demo --preset demo --out runs/r1-demo

# The efficiency table: plain + AdamW vs HC, mHC and Muon, 3 seeds each (≤ 20 minutes on 2 idle cores). Finished
# runs are cached in runs/compare-demo, so a second `make demo` only prints the table again.
demo: venv
	$(PY) -m nanoseek compare --preset demo --out runs/compare-demo

# Something to talk to in a few minutes: the reasoning demo's SFT cold start (a tiny byte model taught to think
# before answering 1-digit sums like 3+4-2, about 4 minutes on 2 cores), trained once into runs/chat-demo, then
# served with the web chat at http://127.0.0.1:8000/ (rm -rf runs/chat-demo to train it again).
chat-demo: venv
	[ -e runs/chat-demo/summary.json ] || $(PY) -m nanoseek sft --preset demo --out runs/chat-demo
	$(PY) -m nanoseek serve --ckpt runs/chat-demo
