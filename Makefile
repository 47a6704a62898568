# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then lint and test).
# VENV may point anywhere; CI uses a fresh one per run.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch first, pinned to the CPU build on this machine's disk; pyproject.toml only asks for torch>=2.3.
TORCH ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,trainers]'
	touch $@

.PHONY: setup demo test lint bench
setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m lifelong_memory.trainers.demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/bench_memory.py
