"""Triton kernels for the weight-only int8 / int4 layers on CUDA (shard/models/quant.py's
forms, which every source is repacked into at load: on-the-fly, GGUF, GPTQ, AWQ), and the
per-row fp8 quantization of activations for fp8 layers (shard/models/fp8.py).

out [M, N] = x [M, K] @ dequantize(w)^T in x's dtype (bfloat16, float16 or float32). One
program per (BLOCK_M rows, BLOCK_N outputs, one of SPLIT slices of K) walks its slice in
steps of BLOCK_K inputs (a multiple of 32: a GGML block; int4 groups are whole blocks, and
int8 groups narrower than a step, GGUF Q6_K's 16, take a scale per input), dequantizes its
weight tile in float32 (w = s q for int8, w = s q + m for int4), rounds it to x's dtype as
`x @ dequantize(w).to(x.dtype)` would, and multiplies with tl.dot into a float32
accumulator. Operands go to tl.dot as float32 (values of x's dtype): tf32 holds bfloat16
and float16 values exactly, and "ieee" products keep float32 inputs whole. int4 bytes hold
inputs j (low nibble) and j + 16 (high) of their block, so each step is two products, x's
low and high halves of each block against the low and the high nibbles: no shuffle of the
weights in registers.

Decode steps have few rows, and the weights are all the bytes: a kernel there is as fast as
the loads it keeps in flight. Where outputs alone make too few programs to fill the GPU (a
2048-output layer: 64 at int8's 32-output tiles), K is split too (SPLIT slices, float32
partial sums, one more launch adds them up in x's dtype); `constants` gives the tiles.

One row (GEMV_ROWS) goes to the CUDA-core kernels instead: no tl.dot (whose smallest tile
pads one row to 16 and stages both operands in shared memory), codes turned into float32
by their bits (2^23 + code as an integer, less 2^23: no conversion instruction, a quarter
of the multiply rate on Hopper), each code multiplied by x in float32 and the scale (and
int4's min, times the block's sum of x) applied to a block's sum. Their weights are
dequantize(w) in float32, not rounded to x's dtype: the more exact product, and on an H200
(16 x 512 tiles, the 1B's layers) int8 1.4-2.2x faster than with the rounding (a conversion
per weight; int4 0.96-1.07x).

They run on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (how CI checks them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PROGRAMS_PER_SM = 8  # programs to keep in flight per multiprocessor before splitting K
FEW_ROWS = 16  # up to here: tl.dot's smallest row tile and the decode-step tiles
# Up to GEMV_ROWS rows: the CUDA-core kernels (_q8_gemv_kernel, _q4_gemv_kernel), with the
# tiles gemv_tiles chooses. On an H200 (2026-12-01, gpu_quant_kernels.py, the 1B's layers)
# one row took 0.55-0.69x (int8) and 0.59-0.88x (int4) of the tl.dot kernels' time in the
# same run, and 2 and 4 rows longer than 8 rows through tl.dot: hence one row.
GEMV_ROWS = 1
# (BLOCK_N, BLOCK_K, warps), the fastest measured there (three sweeps of 13 tiles): int4
# layers and int8 ones of at most SMALL_LAYER inputs and outputs take WIDE; larger int8
# layers NARROW, their sums kept per input where one scale covers a row (KEEP)
GEMV_WIDE = (8, 2048, 4)
GEMV_NARROW = (8, 256, 1)
SMALL_LAYER = 4096


@triton.jit
def _q8_kernel(
    x_ptr,
    q_ptr,  # int8 [N, K]
    s_ptr,  # float16 [N, G]
    out_ptr,  # [M, N] in x's dtype, or float32 partial sums [SPLIT, M, N]
    M,
    N,
    K,
    stride_x,
    stride_out,
    k_per_split,  # inputs per slice of K, a multiple of BLOCK_K
    GROUPS: tl.constexpr,  # G: scales per row
    GROUP: tl.constexpr,  # K / G inputs per scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 x (tf32 would round it), else "tf32"
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(2) * k_per_split
    k = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(first, first + k_per_split, BLOCK_K):
        k_ok = (start + k) < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + (start + k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        q = tl.load(q_ptr + cols[:, None].to(tl.int64) * K + (start + k)[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0)  # fmt: skip
        if GROUP % BLOCK_K == 0:  # one scale per output across the step (none past K: the
            # last slice of a split K may run past it, and 0 x what lies beyond can be NaN)
            in_k = col_ok & (cols * 0 + start < K)
            s = tl.load(s_ptr + cols * GROUPS + start // GROUP, mask=in_k, other=0.0)
            w = q.to(tl.float32) * s.to(tl.float32)[:, None]
        else:
            s = tl.load(s_ptr + cols[:, None] * GROUPS + ((start + k) // GROUP)[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            w = q.to(tl.float32) * s.to(tl.float32)
        w = w.to(x.dtype).to(tl.float32)
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision=PRECISION)
    out = out_ptr + tl.program_id(2) * M * stride_out + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _q4_kernel(
    x_ptr,
    q_ptr,  # uint8 [N, K / 2], GGML block layout
    s_ptr,  # float16 (or float32) [N, G]
    m_ptr,  # float32 [N, G]
    out_ptr,  # [M, N] in x's dtype, or float32 partial sums [SPLIT, M, N]
    M,
    N,
    K,
    stride_x,
    stride_out,
    k_per_split,
    GROUPS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(2) * k_per_split
    byte = tl.arange(0, BLOCK_K // 2)  # the step's bytes: byte j of block b holds
    block = byte // 16  # inputs 32 b + j (low nibble) and 32 b + j + 16 (high)
    low = block * 32 + byte % 16
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(first, first + k_per_split, BLOCK_K):
        k_ok = (start + low) < K  # K is whole blocks: a block is in or out
        row_bytes = q_ptr + cols[:, None].to(tl.int64) * (K // 2)
        packed = tl.load(row_bytes + (start // 2 + byte)[None, :],
                         mask=col_ok[:, None] & k_ok[None, :], other=0)  # fmt: skip
        if GROUP % BLOCK_K == 0:  # one scale and min per output across the step
            group = cols * GROUPS + start // GROUP
            ok = col_ok & (cols * 0 + start < K)  # none past K, as the int8 kernel
            s = tl.load(s_ptr + group, mask=ok, other=0.0).to(tl.float32)[:, None]
            m = tl.load(m_ptr + group, mask=ok, other=0.0)[:, None]
        else:
            group = cols[:, None] * GROUPS + ((start + block * 32) // GROUP)[None, :]
            ok = col_ok[:, None] & k_ok[None, :]
            s = tl.load(s_ptr + group, mask=ok, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + group, mask=ok, other=0.0)
        x_row = x_ptr + rows[:, None] * stride_x + start
        x_ok = row_ok[:, None] & k_ok[None, :]
        x_low = tl.load(x_row + low[None, :], mask=x_ok, other=0.0)  # [BLOCK_M, BLOCK_K / 2]
        x_high = tl.load(x_row + 16 + low[None, :], mask=x_ok, other=0.0)
        dtype = x_low.dtype
        w_low = ((packed & 15).to(tl.float32) * s + m).to(dtype).to(tl.float32)
        w_high = ((packed >> 4).to(tl.float32) * s + m).to(dtype).to(tl.float32)
        acc += tl.dot(x_low.to(tl.float32), tl.trans(w_low), input_precision=PRECISION)
        acc += tl.dot(x_high.to(tl.float32), tl.trans(w_high), input_precision=PRECISION)
    out = out_ptr + tl.program_id(2) * M * stride_out + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _int8_float(q):
    """int8 codes -> their exact float32 values without the conversion unit (a quarter of
    the multiply rate on a GPU): 2^23 + (q + 128) by its bits, less 2^23 + 128."""
    biased = q.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x80
    return (biased | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _nibble_float(n):
    """uint32 values 0..15 -> exact float32, as _int8_float."""
    return (n | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _q8_gemv_kernel(
    x_ptr,
    q_ptr,  # int8 [N, K] (or, for a benchmark's baseline, x's dtype: scales of 1)
    s_ptr,  # float16 [N, G]
    out_ptr,  # [M, N] in x's dtype, or float32 partial sums [SPLIT, M, N]
    M,
    N,
    K,
    stride_x,
    stride_out,
    k_per_split,
    GROUPS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,  # M rounded up to a power of two (every row in one program)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROUND: tl.constexpr,  # weights rounded to x's dtype first, as the tl.dot kernel
    KEEP: tl.constexpr,  # one scale per output for all of K, unrounded: sums kept per input
):
    """A few rows: products on the CUDA cores, no tl.dot (no padding to 16 rows, no tiles
    staged in shared memory). acc [ROWS, BLOCK_N] += sum over the step's inputs of
    x [ROWS, 1, BLOCK_K] * codes [1, BLOCK_N, BLOCK_K], times the outputs' scales where one
    covers the step; else each code scaled first. KEEP: x * codes added into a
    [ROWS, BLOCK_N, BLOCK_K] sum (no reduction across threads per step), reduced and scaled
    once at the end."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * k_per_split
    rows = tl.arange(0, ROWS)
    k = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    kept = tl.zeros([ROWS, BLOCK_N, BLOCK_K if KEEP else 1], tl.float32)
    for start in range(first, first + k_per_split, BLOCK_K):
        k_ok = (start + k) < K
        q = tl.load(q_ptr + cols[:, None].to(tl.int64) * K + (start + k)[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0)  # fmt: skip
        x = tl.load(x_ptr + rows[:, None] * stride_x + (start + k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        w = _int8_float(q) if q_ptr.dtype.element_ty == tl.int8 else q.to(tl.float32)
        if KEEP:
            kept += x.to(tl.float32)[:, None, :] * w[None, :, :]
        elif GROUP % BLOCK_K == 0 and not ROUND:  # one scale per output across the step
            in_k = col_ok & (cols * 0 + start < K)  # none past K (see _q8_kernel)
            s = tl.load(s_ptr + cols * GROUPS + start // GROUP, mask=in_k, other=0.0)
            part = tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
            acc += part * s.to(tl.float32)[None, :]
        else:
            s = tl.load(s_ptr + cols[:, None] * GROUPS + ((start + k) // GROUP)[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            w = w * s.to(tl.float32)
            if ROUND:
                w = w.to(x.dtype).to(tl.float32)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if KEEP:
        s = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        acc = tl.sum(kept, axis=2) * s.to(tl.float32)[None, :]
    out = out_ptr + tl.program_id(1) * M * stride_out + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _q4_gemv_kernel(
    x_ptr,
    q_ptr,  # uint8 [N, K / 2], GGML block layout
    s_ptr,  # float16 (or float32) [N, G]
    m_ptr,  # float32 [N, G]
    out_ptr,  # [M, N] in x's dtype, or float32 partial sums [SPLIT, M, N]
    M,
    N,
    K,
    stride_x,
    stride_out,
    k_per_split,
    GROUPS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 32: NB = BLOCK_K / 32 whole blocks a step
    ROUND: tl.constexpr,
    KEEP: tl.constexpr,  # unused: a block's scale and min meet its sums each step
):
    """int4 for a few rows, as _q8_gemv_kernel. A step's bytes are [BLOCK_N, NB, 16]
    (output, block, byte): a block's scale and min are one value broadcast along its 16
    bytes. Unrounded: sum_j x_j (s q_j + m) = s sum_j x_j q_j + m sum_j x_j, so the codes
    meet x alone and the scale and min once per block and output."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * k_per_split
    rows = tl.arange(0, ROWS)
    b = tl.arange(0, BLOCK_K // 32)  # the step's blocks (NB)
    j = tl.arange(0, 16)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    for start in range(first, first + k_per_split, BLOCK_K):
        b_ok = (start + b * 32) < K  # K is whole blocks: a block is in or out
        w_ok = col_ok[:, None, None] & b_ok[None, :, None]
        byte = cols[:, None, None].to(tl.int64) * (K // 2) + start // 2 + b[None, :, None] * 16
        packed = tl.load(q_ptr + byte + j[None, None, :], mask=w_ok, other=0).to(tl.uint32)
        group = cols[:, None] * GROUPS + ((start + b * 32) // GROUP)[None, :]  # [BLOCK_N, NB]
        g_ok = col_ok[:, None] & b_ok[None, :]
        s = tl.load(s_ptr + group, mask=g_ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + group, mask=g_ok, other=0.0)
        x_at = x_ptr + rows[:, None, None] * stride_x + start + b[None, :, None] * 32
        x_ok = row_ok[:, None, None] & b_ok[None, :, None]
        x_low = tl.load(x_at + j[None, None, :], mask=x_ok, other=0.0)  # [ROWS, NB, 16]
        x_high = tl.load(x_at + 16 + j[None, None, :], mask=x_ok, other=0.0)
        low, high = _nibble_float(packed & 15), _nibble_float(packed >> 4)  # [BLOCK_N, NB, 16]
        xl, xh = x_low.to(tl.float32)[:, None], x_high.to(tl.float32)[:, None]
        if ROUND:
            w_low = (low * s[:, :, None] + m[:, :, None]).to(x_low.dtype).to(tl.float32)
            w_high = (high * s[:, :, None] + m[:, :, None]).to(x_low.dtype).to(tl.float32)
            part = tl.sum(xl * w_low[None] + xh * w_high[None], axis=3)  # [ROWS, BLOCK_N, NB]
            acc += tl.sum(part, axis=2)
        else:
            codes = tl.sum(xl * low[None] + xh * high[None], axis=3)  # [ROWS, BLOCK_N, NB]
            sums = tl.sum(x_low.to(tl.float32) + x_high.to(tl.float32), axis=2)  # [ROWS, NB]
            acc += tl.sum(codes * s[None] + sums[:, None, :] * m[None], axis=2)
    out = out_ptr + tl.program_id(1) * M * stride_out + rows[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, count, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out [count] = the sum of partial [SPLIT, count] (float32), rounded once to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    total = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(SPLIT):
        total += tl.load(partial_ptr + i * count + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_rows_kernel(
    x_ptr,
    q_ptr,  # float8 e4m3fn [M, K]
    s_ptr,  # float32 [M]
    K,
    stride_x,
    FP8_MAX: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= K
):
    """Row m of x -> (fp8 codes, scale): scale = max(max|x_m|, TINY) / FP8_MAX, codes =
    x_m / scale rounded to nearest (fp8.quantize_rows in one launch)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), TINY) / FP8_MAX
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: splits still happen on small tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_tiles(kind: str, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) of the CUDA-core kernel for an [n, k] layer."""
    small = n <= SMALL_LAYER and k <= SMALL_LAYER
    return GEMV_WIDE if kind == "int4" or small else GEMV_NARROW


def constants(
    kind: str, rows: int, k: int, groups: int, dtype: torch.dtype, n: int = SMALL_LAYER
) -> dict:
    """Compile-time constants of the `kind` ("int8" / "int4") kernel for `rows` rows of an
    [n, k] layer (tests compile them for CUDA with these); `kernel_for` says which kernel
    takes them. Up to GEMV_ROWS rows, the CUDA-core kernels (gemv_tiles). Beyond, tl.dot's
    tiles as measured fastest at one row on an H200 (2026-11-29): int8 32 outputs x 256
    inputs (per-channel scales: one per output across a step); int4 64 x 32, one GGML block
    a step (its scales and mins gathered per block across wider steps ran 3-6x slower).
    Groups narrower than a step (GGUF Q6_K's 16) are gathered per input."""
    group = k // groups
    if rows <= GEMV_ROWS:
        tiles = gemv_tiles(kind, n, k)
        block_n, block_k, _ = tiles
        return {
            "GROUPS": groups,
            "GROUP": group,
            "ROWS": triton.next_power_of_2(rows),
            "BLOCK_N": block_n,
            "BLOCK_K": max(32, min(block_k, triton.next_power_of_2(k))),
            "ROUND": False,
            "KEEP": tiles == GEMV_NARROW and groups == 1,  # int8 alone takes NARROW
        }
    if rows > FEW_ROWS:
        block_n, block_k = 64, 32
    elif kind == "int8" and group % 256 == 0:
        block_n, block_k = 32, min(256, triton.next_power_of_2(k))
    else:
        block_n, block_k = (32 if kind == "int8" else 64), 32
    return {
        "GROUPS": groups,
        "GROUP": group,
        "BLOCK_M": 16 if rows <= FEW_ROWS else 64,  # 16: tl.dot's smallest tile
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def kernel_for(kind: str, c: dict):
    """The kernel that takes constants `c` (constants' choice for its rows)."""
    if "ROWS" in c:
        return _q8_gemv_kernel if kind == "int8" else _q4_gemv_kernel
    return _q8_kernel if kind == "int8" else _q4_kernel


def split_k(
    programs: int, rows: int, k: int, block_k: int, device: torch.device
) -> tuple[int, int]:
    """(slices, inputs per slice): K split until PROGRAMS_PER_SM programs per multiprocessor
    are in flight, or every slice is one step, or the float32 partial sums (written and read
    back: 8 bytes a row per slice and output) would outweigh an int8 weight (K bytes)."""
    steps = triton.cdiv(k, block_k)
    wanted = PROGRAMS_PER_SM * _multiprocessors(device) // programs
    wanted = max(1, min(steps, wanted, k // (8 * rows)))
    per = triton.cdiv(steps, wanted) * block_k
    return triton.cdiv(k, per), per


def _launch(kind: str, x: torch.Tensor, n: int, k: int, tensors, groups: int, split=None):
    """`split`: slices of K (tests); None: split_k's choice."""
    x = x.contiguous()
    rows = x.shape[0]
    out = x.new_empty(rows, n)
    if rows == 0:
        return out
    c = constants(kind, rows, k, groups, x.dtype, n)
    grid_mn = (triton.cdiv(rows, c.get("BLOCK_M", rows)), triton.cdiv(n, c["BLOCK_N"]))
    if split is None:
        slices, per = split_k(grid_mn[0] * grid_mn[1], rows, k, c["BLOCK_K"], x.device)
    else:
        per = triton.cdiv(triton.cdiv(k, c["BLOCK_K"]), split) * c["BLOCK_K"]
        slices = triton.cdiv(k, per)
    target = out if slices == 1 else x.new_empty(slices, rows, n, dtype=torch.float32)
    # the CUDA-core kernels hold every row in one program: a grid of (outputs, slices)
    grid = (grid_mn[1], slices) if "ROWS" in c else (*grid_mn, slices)
    warps = gemv_tiles(kind, n, k)[2] if "ROWS" in c else 4
    kernel_for(kind, c)[grid](x, *tensors, target, rows, n, k, x.stride(0), n, per, **c,
                              num_warps=warps)  # fmt: skip
    if slices > 1:
        count = rows * n
        _sum_splits_kernel[(triton.cdiv(count, 1024),)](target, out, count, SPLIT=slices,
                                                        BLOCK=1024)  # fmt: skip
    return out


def q8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, split=None) -> torch.Tensor:
    """x [M, K] @ (s q)^T: q int8 [N, K], scales float16 [N, G] -> [M, N] in x's dtype."""
    n, k = q.shape
    return _launch("int8", x, n, k, (q, scales), scales.shape[1], split)


def q4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, split=None
) -> torch.Tensor:
    """x [M, K] @ (s q + m)^T: packed uint8 [N, K / 2] (GGML blocks), scales float16 and
    mins float32 [N, G] -> [M, N] in x's dtype."""
    n, k = packed.shape[0], packed.shape[1] * 2
    return _launch("int4", x, n, k, (packed, scales, mins), scales.shape[1], split)


def fp8_rows(x: torch.Tensor, fp8_max: float, tiny: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 e4m3fn [M, K], float32 scales [M, 1]), one launch."""
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(k)
        _fp8_rows_kernel[(rows,)](x, q, scales, k, x.stride(0), FP8_MAX=fp8_max, TINY=tiny,
                                  BLOCK=block, num_warps=4 if block <= 2048 else 8)  # fmt: skip
    return q, scales


class TritonQuant:
    """What QuantLinear calls on CUDA: the kernels above for any number of rows."""

    max_rows = 1 << 62  # no row limit: the kernels tile M too
    name = "pytgi's Triton kernels"
    q8_linear = staticmethod(q8_linear)
    q4_linear = staticmethod(q4_linear)
