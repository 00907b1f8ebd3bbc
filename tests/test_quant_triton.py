"""The Triton kernels of the int8 / int4 layers on CUDA (shard/models/quant_triton.py), run
on CPU under TRITON_INTERPRET=1: each equals x @ dequantize(w) (float64) within float32
rounding for float32 inputs, and x @ dequantize(w).to(bfloat16) for bfloat16 ones, at every
row count around its tiles, every group size, outputs that do not fill a tile."""

from __future__ import annotations

import pytest
import torch

from shard.models.quant import (
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)

pytest.importorskip("triton")
import triton  # noqa: E402

from shard.models import quant_triton  # noqa: E402
from shard.models.quant_triton import TritonQuant, q4_linear, q8_linear  # noqa: E402

# (in, out): a SmolLM2 layer's share at 3 shards, a tile-straddling output count, a tiny one
SHAPES = [(192, 160), (96, 100), (64, 128)]
ROWS = [1, 2, 3, 4, 5, 16, 17, 70]  # 1-4: the CUDA-core kernels; 5-16: tl.dot's decode tile


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _case(k: int, n: int, rows: int):
    gen = torch.Generator().manual_seed(k * n + rows)
    return torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("group", [None, 16, 32])  # per output channel; Q6_K's, Q8_0's
def test_int8_kernel_multiplies_by_the_dequantized_weights(k, n, rows, group):
    weight, x = _case(k, n, rows)
    q, scales = quantize_int8(weight, group)
    expected = x.double() @ dequantize_int8(q, scales).double().T
    out = q8_linear(x, q, scales)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert _relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k, n, group", [(k, n, g) for k, n in SHAPES for g in (32, 64, 128)
                                         if k % g == 0])  # fmt: skip
def test_int4_kernel_multiplies_by_the_dequantized_weights(k, n, rows, group):
    weight, x = _case(k, n, rows)
    packed, scales, mins = quantize_int4(weight, group)
    expected = x.double() @ dequantize_int4(packed, scales, mins).double().T
    assert _relative_error(q4_linear(x, packed, scales, mins), expected) < 1e-5


@pytest.mark.parametrize("rows", [1, 17])
def test_int4_kernel_takes_float32_scales(rows):
    """GGUF's Q4_K groups carry float32 scales (a float16 times a 6-bit integer)."""
    weight, x = _case(256, 96, rows)
    packed, scales, mins = quantize_int4(weight, 32)
    wide = scales.float() * torch.randint(1, 64, scales.shape, generator=torch.Generator())
    expected = x.double() @ dequantize_int4(packed, wide, mins).double().T
    assert _relative_error(q4_linear(x, packed, wide, mins), expected) < 1e-5


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_bfloat16_inputs_take_bfloat16_weights(method):
    """As the dequantized path: weights rounded to bfloat16, products summed in float32."""
    weight, x = _case(128, 96, 5)
    x = x.bfloat16()
    if method == "int8":
        q, scales = quantize_int8(weight)
        out, w = q8_linear(x, q, scales), dequantize_int8(q, scales)
    else:
        packed, scales, mins = quantize_int4(weight, 128)
        out, w = q4_linear(x, packed, scales, mins), dequantize_int4(packed, scales, mins)
    expected = x.double() @ w.bfloat16().double().T
    # 1e-2: Triton's interpreter truncates float32 to bfloat16 (a GPU rounds to nearest)
    assert out.dtype == torch.bfloat16 and _relative_error(out, expected) < 1e-2


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_layer_with_the_triton_kernels_serves_any_row_count(method):
    """QuantLinear as on CUDA (its kernels Triton's): 70 rows go through the kernel too."""
    weight, x = _case(96, 100, 70)
    layer = QuantLinear.quantize(weight, torch.ones(100), method, 32)
    expected = layer(x)  # the CPU path (dequantized tiles at 70 rows), bias added
    layer.kernels = TritonQuant()
    assert _relative_error(layer(x), expected.double()) < 1e-5
    assert "Triton" in layer.kind


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("split", [2, 3])
def test_slices_of_k_add_up_to_the_whole_product(rows, split):
    """K split across programs (few-row decode steps on a large GPU): float32 partial sums,
    added in one more launch; the last slice shorter than the others."""
    weight, x = _case(1024 + 256, 48, rows)
    q, scales = quantize_int8(weight, 32)
    expected = x.double() @ dequantize_int8(q, scales).double().T
    assert _relative_error(q8_linear(x, q, scales, split=split), expected) < 1e-5
    packed, scales, mins = quantize_int4(weight, 64)
    expected = x.double() @ dequantize_int4(packed, scales, mins).double().T
    assert _relative_error(q4_linear(x, packed, scales, mins, split=split), expected) < 1e-5


def _nan_after(t: torch.Tensor) -> torch.Tensor:
    """t's values in a buffer whose next elements are NaN: a read past t's end shows."""
    buffer = torch.full((t.numel() + 256,), float("nan"), dtype=t.dtype)
    buffer[: t.numel()] = t.flatten()
    return buffer[: t.numel()].view(t.shape)


@pytest.mark.parametrize("group", [32, None])  # a scale per 32 inputs; per output channel
def test_a_split_past_k_reads_no_scale_beyond_the_last(group):
    """The last slice of a split K runs past K (1280 inputs in 3 slices of 448): its steps
    there read no scale or min (the last output's would lie past the tensors' ends; found
    as a NaN in the last output of the test above, once in a full run)."""
    weight, x = _case(1024 + 256, 48, 1)
    q, scales = quantize_int8(weight, group)
    expected = x.double() @ dequantize_int8(q, scales).double().T
    out = q8_linear(x, q, _nan_after(scales), split=3)
    assert _relative_error(out, expected) < 1e-5
    packed, scales, mins = quantize_int4(weight, 64 if group else 1280)
    expected = x.double() @ dequantize_int4(packed, scales, mins).double().T
    out = q4_linear(x, packed, _nan_after(scales), _nan_after(mins), split=3)
    assert _relative_error(out, expected) < 1e-5


def test_k_is_split_until_the_gpu_has_enough_programs():
    """On one multiprocessor (the interpreter's count) 8 programs are enough; many rows'
    partial sums limit the split."""
    from shard.models.quant_triton import split_k

    cpu = torch.device("cpu")
    assert split_k(1, 1, 2048, 256, cpu) == (8, 256)  # one program: eight slices
    assert split_k(4, 1, 2048, 256, cpu) == (2, 1024)
    assert split_k(8, 1, 2048, 256, cpu) == (1, 2048)  # enough programs: K whole
    assert split_k(2, 1, 1000, 256, cpu) == (4, 256)  # 4 steps of 256 (the last one short)
    assert split_k(1, 64, 2048, 32, cpu) == (4, 512)  # 64 rows: 4 slices' sums = the weight


def test_fp8_rows_quantize_as_the_torch_form():
    """fp8 layers' activations: the one-launch row quantization gives quantize_rows' codes
    and scales (an all-zero row keeps the smallest scale)."""
    from shard.kv_cache import FP8_MAX
    from shard.models import fp8
    from shard.models.quant_triton import fp8_rows

    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    x[2] = 0
    q, scales = fp8_rows(x, FP8_MAX, fp8._TINY)
    ref_q, ref_scales = fp8.quantize_rows(x)
    assert torch.equal(scales, ref_scales)
    # Triton's interpreter drops the carry when rounding up crosses a power of two (124.3 ->
    # 64, not 128); there the codes differ. tests/test_gpu.py checks every code on a GPU.
    ours, theirs = q.float(), ref_q.float()
    carry = (theirs.abs() == 2 ** theirs.abs().clamp(min=1).log2().round()) & (ours != theirs)
    assert torch.equal(torch.where(carry, theirs, ours), theirs)
    assert carry.sum() < 0.05 * x.numel()


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_a_few_rows_take_the_cuda_core_kernels(rows):
    """Up to GEMV_ROWS rows no tl.dot (whose smallest tile pads to 16 rows): the GEMV kernels,
    every row in one program; more rows, the tile kernels."""
    for kind, groups in (("int8", 1), ("int4", 64)):
        c = quant_triton.constants(kind, rows, 2048, groups, torch.bfloat16)
        gemv = rows <= quant_triton.GEMV_ROWS
        assert ("ROWS" in c) == gemv and ("BLOCK_M" in c) != gemv
        assert (quant_triton.kernel_for(kind, c).fn.__name__.endswith("_gemv_kernel")) == gemv
        if gemv:
            assert c["ROWS"] >= rows and c["BLOCK_K"] % 32 == 0 and not c["ROUND"]
            assert not c["KEEP"]  # a small layer: wide steps, sums reduced per step
    big = quant_triton.constants("int8", rows, 2048, 1, torch.bfloat16, n=16384)
    assert big.get("KEEP", False) == (rows <= quant_triton.GEMV_ROWS)  # per-input sums kept
    grouped = quant_triton.constants("int8", rows, 2048, 64, torch.bfloat16, n=16384)
    assert not grouped.get("KEEP")  # a scale per 32 inputs: scaled per step


def _gemv(
    kind: str, x: torch.Tensor, tensors, groups: int, rounded: bool, keep: bool = False
) -> torch.Tensor:
    """The GEMV kernel (every row in one program) with ROUND and KEEP set, K whole in each
    program."""
    n, k = tensors[0].shape[0], x.shape[1]
    c = {**quant_triton.constants(kind, 1, k, groups, x.dtype), "ROUND": rounded, "KEEP": keep,
         "ROWS": triton.next_power_of_2(x.shape[0])}  # fmt: skip
    out = x.new_empty(x.shape[0], n)
    per = -(-k // c["BLOCK_K"]) * c["BLOCK_K"]
    grid = (-(-n // c["BLOCK_N"]), 1)
    quant_triton.kernel_for(kind, c)[grid](x, *tensors, out, x.shape[0], n, k, k, n, per, **c)
    return out


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("group", [None, 16])  # int8 per channel (scaled after the sums); Q6_K
def test_gemv_kernels_rounded_or_not_multiply_by_the_dequantized_weights(rounded, group):
    """ROUND: each weight rounded to x's dtype before its product (the tile kernels' rule);
    unrounded: the products of x and the float32 weights (scales applied to the sums of a
    block where one scale covers it). float32 inputs: both are x @ dequantize(w) within
    float32 rounding; bfloat16 inputs within bfloat16 rounding of either reference (the
    interpreter truncates, so these bounds cannot tell the two roundings apart: the sweep
    on a GPU times them, tests/test_gpu.py checks the shipped form)."""
    weight, x = _case(256, 96, 3)
    q, scales = quantize_int8(weight, group)
    w = dequantize_int8(q, scales)
    assert _relative_error(_gemv("int8", x, (q, scales), scales.shape[1], rounded),
                           x.double() @ w.double().T) < 1e-5  # fmt: skip
    if group is None and not rounded:  # KEEP: per-input sums, one scale at the end
        out = _gemv("int8", x, (q, scales), 1, False, keep=True)
        assert _relative_error(out, x.double() @ w.double().T) < 1e-5
    packed, s4, m4 = quantize_int4(weight, 32)
    w4 = dequantize_int4(packed, s4, m4)
    assert _relative_error(_gemv("int4", x, (packed, s4, m4), s4.shape[1], rounded),
                           x.double() @ w4.double().T) < 1e-5  # fmt: skip
    xb = x.bfloat16()
    for kind, tensors, weights in (("int8", (q, scales), w), ("int4", (packed, s4, m4), w4)):
        out = _gemv(kind, xb, tensors, tensors[1].shape[1], rounded)
        as_rounded = xb.double() @ weights.bfloat16().double().T
        exact = xb.double() @ weights.double().T
        # the interpreter truncates to bfloat16 (a GPU rounds to nearest): 1e-2 either way
        assert _relative_error(out, as_rounded if rounded else exact) < 1e-2
        if not rounded:  # the output's own rounding to bfloat16 alone
            assert _relative_error(out, exact) < 2**-8


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_large_layer_at_one_row(method):
    """Past SMALL_LAYER outputs one row takes the narrow tiles: int8 per channel keeps its
    sums per input (KEEP) and scales them once; int4 the wide steps as every layer."""
    n = quant_triton.SMALL_LAYER + 8
    weight, x = _case(64, n, 1)
    if method == "int8":
        q, scales = quantize_int8(weight)
        out, w = q8_linear(x, q, scales), dequantize_int8(q, scales)
    else:
        packed, scales, mins = quantize_int4(weight, 32)
        out, w = q4_linear(x, packed, scales, mins), dequantize_int4(packed, scales, mins)
    assert _relative_error(out, x.double() @ w.double().T) < 1e-5
