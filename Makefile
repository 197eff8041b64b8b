# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch: an unpinned `torch` would download a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test test-all demo bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[export,bench,dev]"
	touch $(STAMP)

install: $(STAMP)

test: install  ## unit and integration tests (tiny models built in-process)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install  ## also the slow real-model tests
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install  ## build the embedded SmolLM2, resize it at ratio 0.3, print before/after
	$(BIN)/python examples/demo.py

bench: install  ## every method row of benchmarks/methods.py at ratios 0.1-0.5 on SmolLM2 -> benchmarks/results.md, .png
	$(BIN)/python benchmarks/run.py --readme README.md $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check graphresize passes tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
