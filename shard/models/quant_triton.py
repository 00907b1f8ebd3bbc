"""Triton kernels for the weight-only int8 / int4 layers on CUDA (shard/models/quant.py's
forms, which every source is repacked into at load: on-the-fly, GGUF, GPTQ, AWQ).

out [M, N] = x [M, K] @ dequantize(w)^T in x's dtype (bfloat16, float16 or float32). One
program per (BLOCK_M rows, BLOCK_N outputs) walks K in blocks of 32 inputs (a GGML block;
every group size is a multiple), dequantizes its weight tile in float32 (w = s q for int8,
w = s q + m for int4), rounds it to x's dtype as `x @ dequantize(w).to(x.dtype)` would, and
multiplies with tl.dot into a float32 accumulator. Operands go to tl.dot as float32 (values
of x's dtype): tf32 holds bfloat16 and float16 values exactly, and "ieee" products keep
float32 inputs whole. int4 bytes hold inputs j (low nibble) and
j + 16 (high) of their block, so each block is two 16-input products, x's halves against
the low and the high nibbles: no shuffle of the weights in registers.

They run on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (how CI checks them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 32  # inputs per step: one GGML block
BLOCK_N = 64


@triton.jit
def _q8_kernel(
    x_ptr,
    q_ptr,  # int8 [N, K]
    s_ptr,  # float16 [N, G]
    out_ptr,
    M,
    N,
    K,
    stride_x,
    stride_out,
    GROUPS: tl.constexpr,  # G: scales per row
    GROUP: tl.constexpr,  # K / G inputs per scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 x (tf32 would round it), else "tf32"
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + (start + k)[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        dtype = x.dtype
        q = tl.load(q_ptr + cols[:, None].to(tl.int64) * K + (start + k)[None, :],
                    mask=col_ok[:, None], other=0)  # fmt: skip
        s = tl.load(s_ptr + cols * GROUPS + start // GROUP, mask=col_ok, other=0.0)
        w = (q.to(tl.float32) * s.to(tl.float32)[:, None]).to(dtype).to(tl.float32)
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision=PRECISION)
    out = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _q4_kernel(
    x_ptr,
    q_ptr,  # uint8 [N, K / 2], GGML block layout
    s_ptr,  # float16 [N, G]
    m_ptr,  # float32 [N, G]
    out_ptr,
    M,
    N,
    K,
    stride_x,
    stride_out,
    GROUPS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 16)  # byte j of a block: inputs j and j + 16
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, 32):
        packed = tl.load(q_ptr + cols[:, None].to(tl.int64) * (K // 2) + (start // 2 + j)[None, :],
                         mask=col_ok[:, None], other=0)  # fmt: skip
        group = cols * GROUPS + start // GROUP
        s = tl.load(s_ptr + group, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        m = tl.load(m_ptr + group, mask=col_ok, other=0.0)[:, None]
        x_row = x_ptr + rows[:, None] * stride_x + start
        x_low = tl.load(x_row + j[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, 16]
        x_high = tl.load(x_row + 16 + j[None, :], mask=row_ok[:, None], other=0.0)
        dtype = x_low.dtype
        w_low = ((packed & 15).to(tl.float32) * s + m).to(dtype).to(tl.float32)  # [BLOCK_N, 16]
        w_high = ((packed >> 4).to(tl.float32) * s + m).to(dtype).to(tl.float32)
        acc += tl.dot(x_low.to(tl.float32), tl.trans(w_low), input_precision=PRECISION)
        acc += tl.dot(x_high.to(tl.float32), tl.trans(w_high), input_precision=PRECISION)
    out = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def constants(rows: int, k: int, groups: int, dtype: torch.dtype) -> dict:
    """Compile-time constants of both kernels (tests compile them for CUDA with these)."""
    return {
        "GROUPS": groups,
        "GROUP": k // groups,
        "BLOCK_M": 16 if rows <= 16 else 64,  # 16: tl.dot's smallest tile (decode steps)
        "BLOCK_N": BLOCK_N,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _launch(kernel, x: torch.Tensor, n: int, k: int, tensors, groups: int, **extra):
    x = x.contiguous()
    out = x.new_empty(x.shape[0], n)
    c = constants(x.shape[0], k, groups, x.dtype)
    grid = (triton.cdiv(x.shape[0], c["BLOCK_M"]), triton.cdiv(n, BLOCK_N))
    kernel[grid](x, *tensors, out, x.shape[0], n, k, x.stride(0), out.stride(0), **c, **extra)
    return out


def q8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (s q)^T: q int8 [N, K], scales float16 [N, G] -> [M, N] in x's dtype."""
    n, k = q.shape
    return _launch(_q8_kernel, x, n, k, (q, scales), scales.shape[1], BLOCK_K=BLOCK_K)


def q4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> torch.Tensor:
    """x [M, K] @ (s q + m)^T: packed uint8 [N, K / 2] (GGML blocks), scales float16 and
    mins float32 [N, G] -> [M, N] in x's dtype."""
    n, k = packed.shape[0], packed.shape[1] * 2
    return _launch(_q4_kernel, x, n, k, (packed, scales, mins), scales.shape[1])


class TritonQuant:
    """What QuantLinear calls on CUDA: the kernels above for any number of rows."""

    max_rows = 1 << 62  # no row limit: the kernels tile M too
    name = "pytgi's Triton kernels"
    q8_linear = staticmethod(q8_linear)
    q4_linear = staticmethod(q4_linear)
