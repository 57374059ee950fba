# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create and use .venv; the CPU build of torch is pinned here only (pyproject keeps ranges).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench

$(BIN)/moeut: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/moeut

install: $(BIN)/moeut

demo: install
	$(BIN)/moeut demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/model.py
