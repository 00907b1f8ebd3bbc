"""The Triton kernels compile to machine code for Hopper (sm_90) and Ampere (sm_80).

No GPU is needed: Triton lowers to PTX in-process and assembles it with the ptxas its wheel
ships. The interpreter tests (test_attention_backends) check the kernels' arithmetic; only
compiling finds what the interpreter lets through (tl.dot's shape and dtype rules, layouts,
shared memory), so this is the CPU's check that a GPU accepts the kernels we launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from shard.models.quant_triton import GEMV_ROWS  # noqa: E402
from tests.triton_compile_probe import (  # noqa: E402
    ARCHS,
    DTYPES,
    FP8_QUERIES,
    QUANT_ROWS,
    SHAPES,
)

SHARED_MEMORY_LIMIT = 163 * 1024  # bytes per block on an A100 (an H100 allows 227 KiB)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Every case compiled once, without TRITON_INTERPRET and with an empty cache (so each
    case is really compiled): one process per arch at once (each one's lowering and ptxas
    take turns on one core)."""
    probe = Path(__file__).with_name("triton_compile_probe.py")
    procs = []
    for arch in ARCHS:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp(f"triton-cache-{arch}"))
        procs.append(subprocess.Popen([sys.executable, str(probe), str(arch)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    results: dict = {}
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            results.update(json.loads(out))
    finally:
        for proc in procs:
            proc.kill()
    return results


ATTENTION = ["paged_decode", "paged_decode_split", "paged_prefill"]  # tl.dot kernels


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("kernel", [*ATTENTION, "merge_splits"])
def test_kernel_compiles(compiled, kernel, model, dtype, arch):
    case = compiled[f"{kernel}/{model}/{dtype}/sm_{arch}"]
    assert "error" not in case, case.get("error")
    assert case["cubin_bytes"] > 0 and case["ptx_target"].startswith(f".target sm_{arch}")
    assert case["shared"] <= SHARED_MEMORY_LIMIT
    if kernel in ATTENTION:
        assert case["shared"] > 0  # tl.dot tiles are staged in shared memory
        # float32 caches take full-precision products: no tf32 tensor-core instruction
        assert case["tf32"] == (dtype != "fp32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", SHAPES)
def test_write_kv_compiles(compiled, model, dtype):
    case = compiled[f"write_kv/{model}/{dtype}/sm_90"]
    assert "error" not in case, case.get("error")
    assert case["cubin_bytes"] > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", FP8_QUERIES)
@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("kernel", [*ATTENTION, "write_kv"])
def test_fp8_cache_kernels_compile(compiled, kernel, model, dtype, arch):
    """--kv-cache-dtype fp8_e4m3fn: Hopper and Ampere alike (no fp8 instruction is used)."""
    case = compiled[f"{kernel}/{model}/fp8-{dtype}/sm_{arch}"]
    assert "error" not in case, case.get("error")
    assert case["cubin_bytes"] > 0 and case["ptx_target"].startswith(f".target sm_{arch}")
    assert case["shared"] <= SHARED_MEMORY_LIMIT
    if kernel in ATTENTION:  # fp8 values are exact in tf32; float32 queries are not
        assert case["tf32"] == (dtype != "fp32")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("kernel", ["rms_norm", "add_rms_norm", "rotary", "silu_mul"])
def test_layer_kernel_compiles(compiled, kernel, model, dtype, arch):
    """The fused layer kernels (shard/models/fused.py): element-wise, no shared-memory tiles
    beyond the norm's reduction. Rotary has no fma: torch rounds each product before the sum."""
    case = compiled[f"{kernel}/{model}/{dtype}/sm_{arch}"]
    assert "error" not in case, case.get("error")
    assert case["cubin_bytes"] > 0 and case["ptx_target"].startswith(f".target sm_{arch}")
    assert case["shared"] <= SHARED_MEMORY_LIMIT
    if kernel == "rotary" and arch == 90:  # sm_80 has no bf16 mul/add: single-rounding fmas
        assert not case["fma"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", FP8_QUERIES)
@pytest.mark.parametrize("rows", QUANT_ROWS)
@pytest.mark.parametrize("kernel", ["q8_linear", "q8g_linear", "q4_linear", "q4k_linear"])
def test_quantized_layer_kernels_compile(compiled, kernel, rows, dtype, arch):
    """--quantize int8 / int4 on CUDA (shard/models/quant_triton.py), Llama-1B's layers, by
    the CUDA-core kernels (up to GEMV_ROWS rows) and tl.dot's; q8g: int8 in GGUF Q6_K's
    groups of 16; q4k: int4 with GGUF Q4_K's float32 scales."""
    case = compiled[f"{kernel}_{rows}/llama-1b/{dtype}/sm_{arch}"]
    assert "error" not in case, case.get("error")
    assert case["cubin_bytes"] > 0 and case["ptx_target"].startswith(f".target sm_{arch}")
    if rows <= GEMV_ROWS:  # products on the CUDA cores: no tensor-core instruction
        assert case["shared"] <= SHARED_MEMORY_LIMIT and not case["tf32"]
        return
    assert 0 < case["shared"] <= SHARED_MEMORY_LIMIT  # tl.dot tiles
    assert case["tf32"] == (dtype != "fp32")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", FP8_QUERIES)
@pytest.mark.parametrize("kernel", ["sum_splits", "fp8_rows", "greedy_pieces", "greedy_merge"])
def test_split_sums_fp8_rows_and_greedy_compile(compiled, kernel, dtype, arch):
    """The split-K partial sums' adder, fp8 layers' activation quantization (a Hopper `cvt`
    to e4m3 on sm_90; sm_80 has none and never serves fp8 layers) and the greedy choice's
    two kernels (over bfloat16 or float32 logits)."""
    case = compiled[f"{kernel}/llama-1b/{dtype}/sm_{arch}"]
    if kernel == "fp8_rows" and arch < 89:  # no e4m3 there: fp8 layers are refused (fp8.py)
        assert "fp8e4nv not supported" in case["error"]
        return
    assert "error" not in case, case.get("error")
    assert case["cubin_bytes"] > 0 and case["ptx_target"].startswith(f".target sm_{arch}")
