"""Compiles the Triton kernels for CUDA targets on a machine without a GPU; prints JSON.

Run by test_triton_compile.py in a fresh process: Triton's interpreter mode (which the test
session turns on) changes module state at import and cannot compile.
    python tests/triton_compile_probe.py [ARCH ...]  ->  {"<kernel>/<model>/<dtype>/sm_<arch>": {...}}
(every arch of ARCHS by default; the test runs one process per arch, side by side)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shard import sampling_triton  # noqa: E402
from shard.attention import triton_kernels as tk  # noqa: E402
from shard.models import fused, quant_triton  # noqa: E402

# (heads, KV heads, head_dim) of the models gpu_check.sh runs
SHAPES = {"smollm2-135m": (9, 3, 64), "llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}
# (hidden, intermediate) of the same models, for the fused layer kernels
LAYERS = {"smollm2-135m": (576, 1536), "llama-1b": (2048, 8192), "llama-8b": (4096, 14336)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# queries' dtypes compiled over an fp8 cache (its bytes: "*u8"), cases named "fp8-<dtype>"
FP8_QUERIES = ("bf16", "fp32")
ARCHS = (90, 80)
# a decode step of one row (quant_triton.GEMV_ROWS: the CUDA-core kernels), of 4 and 16
# (tl.dot's decode tile) and a prefill's (64)
QUANT_ROWS = (1, 4, 16, 64)


def compile_kernel(
    kernel, signature: dict, constants: dict, arch: int, options: dict | None = None
) -> dict:
    assert list(signature) + list(constants) == kernel.arg_names, kernel.arg_names
    source = ASTSource(
        fn=kernel,
        signature={**signature, **dict.fromkeys(constants, "constexpr")},
        constexprs=constants,
    )
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        return {"error": f"{type(exc).__name__}: {exc}"}
    ptx = compiled.asm["ptx"]
    return {
        "cubin_bytes": len(compiled.asm["cubin"]),
        "ptx_target": next(line for line in ptx.splitlines() if line.startswith(".target")),
        "shared": compiled.metadata.shared,
        "tf32": "tf32" in ptx,
        "fma": "fma." in ptx,
    }


def decode_signature(pointer: str, split: bool, cache: str | None = None) -> dict:
    return {
        "q_ptr": pointer,
        "k_cache_ptr": cache or pointer,
        "v_cache_ptr": cache or pointer,
        "table_ptr": "*i32",
        "context_ptr": "*i32",
        "out_ptr": "*fp32" if split else pointer,  # split: float32 partial outputs
        "lse_ptr": "*fp32",
        "scale": "fp32",
        "stride_q_row": "i32",
        "stride_q_head": "i32",
        "stride_out_row": "i32",
        "stride_out_head": "i32",
        "stride_table": "i32",
        "split_len": "i32",
        "window": "i32",
        "softcap": "fp32",
        "v_scale": "fp32",
    }


def prefill_signature(pointer: str, cache: str | None = None) -> dict:
    return {
        "q_ptr": pointer,
        "k_cache_ptr": cache or pointer,
        "v_cache_ptr": cache or pointer,
        "table_ptr": "*i32",
        "program_ptr": "*i32",
        "out_ptr": pointer,
        "scale": "fp32",
        "stride_q_row": "i32",
        "stride_q_head": "i32",
        "stride_out_row": "i32",
        "stride_out_head": "i32",
        "stride_table": "i32",
        "window": "i32",
        "softcap": "fp32",
        "v_scale": "fp32",
    }


def merge_signature(pointer: str) -> dict:
    return {
        "partial_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "out_ptr": pointer,
        "stride_out_row": "i32",
        "stride_out_head": "i32",
        "num_splits": "i32",
    }


def write_signature(pointer: str, cache: str | None = None) -> dict:
    return {
        **dict.fromkeys(("k_ptr", "v_ptr"), pointer),
        **dict.fromkeys(("k_cache_ptr", "v_cache_ptr"), cache or pointer),
        "slot_ptr": "*i64",
        "stride_k": "i32",
        "stride_v": "i32",
        "inv_k": "fp32",
        "inv_v": "fp32",
    }


def main(archs: tuple[int, ...]) -> None:
    results = {}
    for model, (heads, kv_heads, head_dim) in SHAPES.items():
        for name, dtype in DTYPES.items():
            pointer = f"*{name}"
            decode = tk.decode_constants(heads, kv_heads, head_dim, 16, dtype)
            for arch in archs:
                for split in (False, True):
                    kernel = "paged_decode_split" if split else "paged_decode"
                    results[f"{kernel}/{model}/{name}/sm_{arch}"] = compile_kernel(
                        tk._paged_decode_kernel,
                        decode_signature(pointer, split),
                        {**decode, "FP8": False, "SPLIT": split},
                        arch,
                    )
                results[f"paged_prefill/{model}/{name}/sm_{arch}"] = compile_kernel(
                    tk._paged_prefill_kernel,
                    prefill_signature(pointer),
                    {**tk.prefill_constants(decode, heads // kv_heads), "FP8": False},
                    arch,
                )
                if name in FP8_QUERIES:
                    results.update(compile_fp8(model, name, decode, heads // kv_heads, arch))
                constants = tk.merge_constants(heads, head_dim, tk.MAX_SPLITS)
                results[f"merge_splits/{model}/{name}/sm_{arch}"] = compile_kernel(
                    tk._merge_splits_kernel, merge_signature(pointer), constants, arch
                )
            constants = tk.write_kv_constants(kv_heads, head_dim)
            if 90 in archs:
                results[f"write_kv/{model}/{name}/sm_90"] = compile_kernel(
                    tk._write_kv_kernel, write_signature(pointer), constants, 90
                )
            if name in FP8_QUERIES:
                for arch in archs:
                    results[f"write_kv/{model}/fp8-{name}/sm_{arch}"] = compile_kernel(
                        tk._write_kv_kernel,
                        write_signature(pointer, "*u8"),
                        tk.write_kv_constants(kv_heads, head_dim, fp8=True),
                        arch,
                    )
            for arch in archs:
                results.update(compile_layer_kernels(model, name, pointer, head_dim, arch))
                if model == "llama-1b" and name in FP8_QUERIES:
                    results.update(compile_quant_kernels(model, name, arch))
                    results.update(compile_greedy_kernels(model, name, arch))
    print(json.dumps(results))


def compile_quant_kernels(model: str, dtype: str, arch: int) -> dict:
    """shard/models/quant_triton.py's int8 (per output channel) and int4 (groups of 32, float16
    scales, and float32 ones as GGUF's Q4_K has) kernels at this model's hidden size, for a
    decode step's rows and a prefill's."""
    hidden = LAYERS[model][0]
    pointer = f"*{dtype}"
    sizes = dict.fromkeys(["M", "N", "K", "stride_x", "stride_out", "k_per_split"], "i32")
    q8 = {"x_ptr": pointer, "q_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": pointer, **sizes}
    q4 = {"x_ptr": pointer, "q_ptr": "*u8", "s_ptr": "*fp16", "m_ptr": "*fp32",
          "out_ptr": pointer, **sizes}  # fmt: skip
    results = {}
    for rows in QUANT_ROWS:
        c8 = quant_triton.constants("int8", rows, hidden, 1, DTYPES[dtype])
        c8g = quant_triton.constants("int8", rows, hidden, hidden // 16, DTYPES[dtype])
        c4 = quant_triton.constants("int4", rows, hidden, hidden // 32, DTYPES[dtype])
        q8_kernel, q4_kernel = (quant_triton.kernel_for(kind, c) for kind, c in
                                (("int8", c8), ("int4", c4)))  # fmt: skip
        results[f"q8_linear_{rows}/{model}/{dtype}/sm_{arch}"] = compile_kernel(
            q8_kernel, q8, c8, arch
        )
        results[f"q8g_linear_{rows}/{model}/{dtype}/sm_{arch}"] = compile_kernel(
            q8_kernel, q8, c8g, arch
        )  # GGUF Q6_K: a scale per 16 inputs, gathered across a step
        results[f"q4_linear_{rows}/{model}/{dtype}/sm_{arch}"] = compile_kernel(
            q4_kernel, q4, c4, arch
        )
        results[f"q4k_linear_{rows}/{model}/{dtype}/sm_{arch}"] = compile_kernel(
            q4_kernel, {**q4, "s_ptr": "*fp32"}, c4, arch
        )  # GGUF Q4_K: float32 scales
    results[f"sum_splits/{model}/{dtype}/sm_{arch}"] = compile_kernel(
        quant_triton._sum_splits_kernel,
        {"partial_ptr": "*fp32", "out_ptr": pointer, "count": "i32"},
        {"SPLIT": 8, "BLOCK": 1024},
        arch,
    )
    results[f"fp8_rows/{model}/{dtype}/sm_{arch}"] = compile_kernel(
        quant_triton._fp8_rows_kernel,
        {"x_ptr": pointer, "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32", "stride_x": "i32"},
        {"FP8_MAX": 448.0, "TINY": 1e-12, "BLOCK": 8192},
        arch,
    )
    return results


def compile_greedy_kernels(model: str, dtype: str, arch: int) -> dict:
    """shard/sampling_triton.py: a row of logits in pieces, then the pieces merged."""
    pieces = {"logits_ptr": f"*{dtype}", "stride_row": "i32", "V": "i32", "top_ptr": "*fp32",
              "index_ptr": "*i32", "total_ptr": "*fp32", "C": "i32"}  # fmt: skip
    merge = {"top_ptr": "*fp32", "index_ptr": "*i32", "total_ptr": "*fp32", "C": "i32",
             "ids_ptr": "*i64", "logprobs_ptr": "*fp32"}  # fmt: skip
    return {
        f"greedy_pieces/{model}/{dtype}/sm_{arch}": compile_kernel(
            sampling_triton._pieces_kernel, pieces, {"CHUNK": sampling_triton.CHUNK}, arch,
            {"num_warps": 8},
        ),
        f"greedy_merge/{model}/{dtype}/sm_{arch}": compile_kernel(
            sampling_triton._merge_kernel, merge, {"BLOCK": 32}, arch, {"num_warps": 1}
        ),
    }  # fmt: skip


def compile_fp8(model: str, dtype: str, decode: dict, group: int, arch: int) -> dict:
    """The attention kernels over an fp8 cache (bytes decoded with integer operations, so
    sm_80 too) with `dtype` queries."""
    pointer = f"*{dtype}"
    results = {}
    for split in (False, True):
        kernel = "paged_decode_split" if split else "paged_decode"
        results[f"{kernel}/{model}/fp8-{dtype}/sm_{arch}"] = compile_kernel(
            tk._paged_decode_kernel,
            decode_signature(pointer, split, "*u8"),
            {**decode, "FP8": True, "SPLIT": split},
            arch,
        )
    results[f"paged_prefill/{model}/fp8-{dtype}/sm_{arch}"] = compile_kernel(
        tk._paged_prefill_kernel,
        prefill_signature(pointer, "*u8"),
        {**tk.prefill_constants(decode, group), "FP8": True},
        arch,
    )
    return results


def compile_layer_kernels(model: str, dtype: str, pointer: str, head_dim: int, arch: int):
    """shard/models/fused.py's kernels at this model's sizes."""
    hidden, inter = LAYERS[model]
    norm = {
        **dict.fromkeys(["x_ptr", "delta_ptr", "weight_ptr", "sum_ptr", "out_ptr"], pointer),
        "eps": "fp32",
        **dict.fromkeys(["stride_x", "stride_delta", "stride_sum", "stride_out"], "i32"),
    }
    rotary = {"x_ptr": pointer, "positions_ptr": "*i64", "cos_ptr": pointer,
              "sin_ptr": pointer, "stride_token": "i32", "stride_head": "i32"}  # fmt: skip
    silu = {"gate_up_ptr": pointer, "out_ptr": pointer, "stride_in": "i32", "stride_out": "i32"}
    block = triton.next_power_of_2(hidden)
    half = head_dim // 2
    cases = {
        "rms_norm": (fused._rms_norm_kernel, norm, {"N": hidden, "BLOCK": block, "ADD": False}, None),
        "add_rms_norm": (fused._rms_norm_kernel, norm, {"N": hidden, "BLOCK": block, "ADD": True}, None),
        "rotary": (fused._rotary_kernel, rotary,
                   {"HALF": half, "BLOCK": triton.next_power_of_2(half)}, fused.ROTARY_OPTIONS),
        "silu_mul": (fused._silu_mul_kernel, silu, {"INTER": inter, "BLOCK": fused.SILU_BLOCK}, None),
    }  # fmt: skip
    return {
        f"{name}/{model}/{dtype}/sm_{arch}": compile_kernel(kernel, sig, consts, arch, options)
        for name, (kernel, sig, consts, options) in cases.items()
    }


if __name__ == "__main__":
    main(tuple(int(arch) for arch in sys.argv[1:]) or ARCHS)
