#!/usr/bin/env bash
# pytgi's GPU check: one script, under 8 minutes on one H100/H200 with no network.
#   bash benchmarks/gpu_check.sh OUT_DIR
# Prepare first on the development machine: bash benchmarks/gpu_prepare.sh (its header
# gives the device call). Steps, each time-boxed so a slow one cannot eat the rest:
#   1. versions of what the machine has; carried wheels installed; stubs import
#   2. random-weight models of real shapes: SmolLM2-135M, Llama-3.2-1B, Qwen3-0.6B
#   3. tests marked gpu (backends vs transformers, CUDA graphs, kernels, Info fields) and the
#      fused layer kernels compiled (tests/test_fused_ops.py)
#   4. decode step in-process: eager vs CUDA graphs (fused or torch element-wise ops) vs
#      transformers vs the HBM bound (1B; then Qwen3-0.6B, a second family)
#   5. pytgi-benchmark against a 1B shard, batch 1..256
#   6. load generator (compare.py): pytgi vs transformers static batches, 1B, varied workload,
#      concurrency 64 and 1; then the shards' step ahead on and off (step_ahead.py), 1B
#   7. where a batch-1 step's time goes (profiler); the quantized layers' kernels alone at
#      the 1B's shapes; the step with fp8 / int8 / int4 weights and an fp8 KV cache
#   8. a random-weight Llama-3.1-8B, its decode step, and that step per weight format (last:
#      the goals need only the 1B)
# The whole script keeps to BUDGET seconds (default 460): a step gets at most its own limit
# and what is left of the budget, and a step with under 20 s left is skipped (and listed).
# STEPS="models compare ..." runs only the named steps (step names as the log prints them;
# a rerun of what failed); GPU_TESTS="lossy" only the GPU tests pytest -k selects. Every
# output lands in OUT_DIR (log, JSON, Markdown summary); exit status 1 if a step failed or
# was skipped.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
START=$(date +%s)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTGI_TEST_DEVICE=cuda PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
MODELS=${MODELS:-/tmp/pytgi-models}
BUDGET=${BUDGET:-460}
source benchmarks/gpu_steps.sh  # step, left, check; FAILED and SKIPPED

step versions
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)
echo "gpu $GPU"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
{ echo "gpu $GPU"; $PY - <<'PYEOF'; } | tee "$OUT/versions.txt"
import importlib, platform
print("python", platform.python_version())
for name in ["torch", "triton", "transformers", "grpc", "google.protobuf", "tokenizers",
             "safetensors", "fastapi", "uvicorn", "pydantic", "flash_attn"]:
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", type(exc).__name__, exc)
import common.pb.generate_pb2_grpc  # stubs must import under this protobuf/grpcio
print("stubs import: ok")
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "!!! the environment is not usable"; exit 1; }
# What comes back from OUT is at most 8 files: versions.txt, gpu_check.log, gpu_tests.xml,
# decode_1b.json, benchmark_1b.json, compare_1b.json, decode_8b.json, summary.md (the
# profile's tables are in the log).

check models 60 $PY benchmarks/gpu_models.py "$MODELS" --tokenizer .gpu/tokenizer \
  --models smollm2-135m,llama-1b,qwen3-0.6b
ls -la "$MODELS"/*

check gpu-tests 150 env PYTGI_GPU_MODEL_DIR="$MODELS/smollm2-135m" \
  PYTGI_GPU_FAMILY_DIR="$MODELS/qwen3-0.6b" $PY -m pytest ${GPU_TESTS:+-k "$GPU_TESTS"} \
  -m "gpu or not gpu" -q -p no:cacheprovider tests/test_gpu.py tests/test_fused_ops.py \
  --junitxml="$OUT/gpu_tests.xml"

check decode-1b 90 $PY benchmarks/gpu_decode.py "$MODELS/llama-1b" --batch 1,8,64 \
  --json "$OUT/decode_1b.json"

check decode-qwen3 60 $PY benchmarks/gpu_decode.py "$MODELS/qwen3-0.6b" --batch 1,8,64 \
  --steps 32

if ! wanted benchmark; then
  :
elif (( $(left) >= 60 )); then
  step "shard for pytgi-benchmark (1B)"
  UDS=/tmp/pytgi-gpu-bench
  $PY -m shard.cli serve "$MODELS/llama-1b" --uds-path $UDS --cuda-memory-fraction 0.5 \
    > /tmp/bench_shard.log 2>&1 &
  SHARD=$!
  for _ in $(seq 120); do [ -S $UDS-0 ] && break; sleep 0.5; done
  check benchmark 90 $PY -m pytgi_benchmark.cli --tokenizer-name "$MODELS/llama-1b" \
    --uds-path $UDS -b 1 -b 2 -b 4 -b 8 -b 16 -b 32 -b 64 -b 128 -b 256 -s 128 -d 32 -r 2 \
    -w 1 --json "$OUT/benchmark_1b.json"
  kill $SHARD 2>/dev/null; wait $SHARD 2>/dev/null
  echo "--- the shard's log, last lines"; tail -15 /tmp/bench_shard.log
else
  step "benchmark skipped: $(left) s of the ${BUDGET} s budget left"; SKIPPED+=(benchmark)
fi

check compare 200 $PY benchmarks/compare.py --model-dir "$MODELS/llama-1b" --device cuda \
  --dtype bfloat16 --workload varied --concurrency 64 --concurrency 1 --requests 64 --no-cb \
  --launcher-arg=--cuda-memory-fraction --launcher-arg=0.5 --json "$OUT/compare_1b.json"

check step-ahead 150 $PY benchmarks/step_ahead.py --model-id "$MODELS/llama-1b" \
  --dtype bfloat16 --concurrency 1 --concurrency 16 --rounds 1 --new 64 \
  --launcher-arg=--cuda-memory-fraction --launcher-arg=0.5 \
  --launcher-arg=--step-ahead-rows --launcher-arg=0

check profile-1b 60 $PY benchmarks/gpu_profile.py "$MODELS/llama-1b" --steps 20

check quant-kernels 150 $PY benchmarks/gpu_quant_kernels.py

check quant-1b 90 $PY benchmarks/gpu_decode.py "$MODELS/llama-1b" --batch 1,8,64 --steps 32 \
  --quantized

check model-8b 60 $PY benchmarks/gpu_models.py "$MODELS" --tokenizer .gpu/tokenizer \
  --models llama-8b
if [ -f "$MODELS/llama-8b/config.json" ]; then
  check decode-8b 90 $PY benchmarks/gpu_decode.py "$MODELS/llama-8b" --batch 1,8,64 \
    --no-transformers --json "$OUT/decode_8b.json"
  check quant-8b 200 $PY benchmarks/gpu_decode.py "$MODELS/llama-8b" --batch 1,8,64 \
    --steps 32 --quantized
else
  for name in decode-8b quant-8b; do wanted $name && SKIPPED+=($name); done
fi

step summary
{
  echo "# gpu_check $(date -u +%F) on $GPU"
  echo; echo "failed steps: ${FAILED[*]:-none}; skipped (budget): ${SKIPPED[*]:-none}"; echo
  grep -E "^(\||[a-z0-9.-]+ on |machine:|[0-9]+ (passed|failed))" "$OUT/gpu_check.log" || true
} > "$OUT/summary.md"
cat "$OUT/summary.md"
step "done in $(( $(date +%s) - START )) s"
[ ${#FAILED[@]} = 0 ] && [ ${#SKIPPED[@]} = 0 ]
