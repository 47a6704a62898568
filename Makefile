# Two entry points: `make train` (set up, then run the main job) and `make test` (set up, then lint and test).
# VENV may point anywhere; CI uses a fresh one per run. OMNIGLOT is the folder with the Omniglot zips.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch first, pinned to the CPU build on this machine's disk; pyproject.toml only asks for torch>=2.3.
TORCH ?= torch==2.13.0
OMNIGLOT ?= ../shared/data/omniglot

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,trainers,cpu,cluster]'
	touch $@

.PHONY: setup train test lint bench
setup: $(BIN)/.installed

# The main job, short: 200 episode batches of Omniglot on the embedded memory (about 3 minutes on 2 cores).
train: setup
	$(BIN)/python -m lifelong_memory.trainers.omniglot --data $(OMNIGLOT) --episode-batches 200 \
		--evaluation-episodes 100 --out-dir runs/omniglot-short

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/bench_memory.py
