# Set-up and entry points. `make demo` and `make test` each install what they
# need into .venv on first use.
#
# TORCH picks the torch build: the default is the CPU wheel this project is tested
# with; on a CUDA machine use e.g. `make TORCH=torch demo`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: a bare torch requirement would pull a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/dflow demo

# everything; test-fast: the unit tier, without real processes or wall-clock runs
test: $(VENV)/.installed
	$(BIN)/python -m pytest

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python .ci/lint_imports.py
