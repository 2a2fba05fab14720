# One entry point for developers and CI (.ci/run calls `make test`).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test test-fast lint typecheck bench bench-server loadtest clean

# The venv is rebuilt when pyproject.toml changes. Installing torch from this machine's local
# wheels takes about 2 minutes; the Dockerfile runs the same pip command.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[serve,llm,otel,dev,loadtest,ray,interactive]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m app

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# The suite without the tests marked slow (real servers, load runs): a quick check while editing.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/pool_bench.py

bench-server: $(VENV)/.installed
	$(BIN)/python benchmarks/server_bench.py

loadtest: $(VENV)/.installed
	$(BIN)/python -m loadtest.compare $(ARGS)

clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache
