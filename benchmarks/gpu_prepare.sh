#!/usr/bin/env bash
# Run HERE (the development machine) before the device call: puts what the GPU machine lacks
# into ignored folders that the call carries.
#   .whl/  the router's HTTP packages and everything they need (fastapi needs opentelemetry-api
#          since 0.16x) and llguidance (grammars), as Python 3.12 wheels at this machine's
#          versions
#   .gpu/tokenizer/  SmolLM2's tokenizer files (the random-weight models use them)
#   common/pb/generate_pb2*.py  gRPC stubs, free of generator-version guards
# Then: device run(command="bash benchmarks/gpu_check.sh $OUT", timeout_s=520,
#   carry=[".whl", ".gpu", "common/pb/generate_pb2.py", "common/pb/generate_pb2_grpc.py"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "from common import protogen; protogen.generate()"
rm -rf .whl && mkdir -p .whl .gpu/tokenizer
version() { $PY -m pip show "$1" | awk '/^Version/{print $2}'; }
python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "fastapi==$(version fastapi)" "starlette==$(version starlette)" \
  "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "uvicorn==$(version uvicorn)" "llguidance==$(version llguidance)"
model=$($PY -m shard.cli default-model)
for f in tokenizer.json tokenizer_config.json special_tokens_map.json; do
  cp "$model/$f" .gpu/tokenizer/
done

du -sh .whl .gpu
