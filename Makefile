# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast test-all lint format services-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole story on the embedded defaults (~15 min on 2 CPU cores the first time; a rerun reuses the experts).
demo: install
	$(BIN)/elmreg demo

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -x -q

test-all: install
	$(BIN)/pytest -m ""

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

services-down: install
	$(BIN)/elmreg services down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
