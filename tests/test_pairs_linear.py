"""bfloat16 products by bf16 dot products on weights packed in panels of input pairs
(shard/csrc/pairs.cpp: `pack_pairs`, `pairs_linear`) and the linear layers that take them."""

from __future__ import annotations

import pytest
import torch

from shard import cpu_kernels
from shard.models.linear import Linear

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(
    kernels is None or not hasattr(kernels, "pairs_linear"),
    reason="no bf16 dot products in this CPU's build (avx512_bf16): bfloat16 layers keep "
    "oneDNN's packed weights, or widen to float32 without bf16 instructions",
)
ROWS = [1, 2, 11, 12, 13, 24, 25, 64, 130]  # tiles of 12 rows and their remainders
# (outputs, inputs): blocks of 32 outputs and partial ones; 2 to 1538 inputs
SHAPES = [(1, 2), (15, 64), (16, 30), (17, 576), (33, 128), (100, 1538)]


def test_the_panels_hold_each_outputs_pairs_of_inputs():
    w = torch.arange(35 * 6, dtype=torch.float32).view(35, 6).bfloat16()  # exact in bfloat16
    packed = kernels.pack_pairs(w)
    assert packed.shape == (4, 3, 16) and packed.dtype == torch.int32  # 35 outputs: 2 blocks
    bits = w.view(torch.int16).to(torch.int64) & 0xFFFF
    lanes = packed.to(torch.int64) & 0xFFFFFFFF
    for q in range(4):
        for j in range(16):
            n = 16 * q + j
            for p in range(3):
                expected = int(bits[n, 2 * p] | bits[n, 2 * p + 1] << 16) if n < 35 else 0
                assert int(lanes[q, p, j]) == expected, (q, p, j)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("outputs,inputs", SHAPES)
def test_small_integers_give_the_exact_sum_rounded_once(rows, outputs, inputs):
    """Integers in [-8, 8]: every product and partial sum is exact in float32, so each
    output must be the exact sum rounded once to bfloat16, whatever the order of the sums."""
    gen = torch.Generator().manual_seed(rows * 1000 + outputs)
    w = torch.randint(-8, 9, (outputs, inputs), generator=gen).bfloat16()
    x = torch.randint(-8, 9, (rows, inputs), generator=gen).bfloat16()
    out = kernels.pairs_linear(x, kernels.pack_pairs(w), outputs)
    assert out.shape == (rows, outputs) and out.dtype == torch.bfloat16
    assert torch.equal(out, (x.double() @ w.double().T).bfloat16())


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("outputs,inputs", SHAPES)
def test_products_within_float32_sums_and_one_rounding(rows, outputs, inputs):
    gen = torch.Generator().manual_seed(rows * 7 + inputs)
    w = torch.randn(outputs, inputs, generator=gen).bfloat16()
    x = torch.randn(rows, inputs, generator=gen).bfloat16()
    out = kernels.pairs_linear(x, kernels.pack_pairs(w), outputs).double()
    exact = x.double() @ w.double().T
    bound = 2**-8 * exact.abs() + 1e-6 * (x.double().abs() @ w.double().abs().T)
    assert bool(((out - exact).abs() <= bound).all())


def test_rows_of_a_wider_tensor_and_the_checks():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=gen).bfloat16()
    packed = kernels.pack_pairs(w)
    wide = torch.randn(5, 100, generator=gen).bfloat16()
    assert torch.equal(
        kernels.pairs_linear(wide[:, :64], packed, 40),
        kernels.pairs_linear(wide[:, :64].contiguous(), packed, 40),
    )
    with pytest.raises(RuntimeError, match="even number of inputs"):
        kernels.pack_pairs(torch.randn(4, 5).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.pack_pairs(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.pairs_linear(wide[:, :64].float(), packed, 40)
    with pytest.raises(RuntimeError, match="inputs"):
        kernels.pairs_linear(wide[:, :62], packed, 40)
    with pytest.raises(RuntimeError, match="past the packed columns"):
        kernels.pairs_linear(wide[:, :64], packed, 65)


def test_bfloat16_layers_take_the_panels_past_one_row():
    """A bfloat16 layer packs its pairs instead of oneDNN's layout: several rows go through
    them and one row through the single-row kernel, each with the bias added after; without
    the row-major copy (--no-cpu-gemv) one row goes through the panels too. float32 layers,
    unpacked layers and odd input counts keep their paths."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(50, 64, generator=gen).bfloat16()
    bias = torch.randn(50, generator=gen).bfloat16()
    layer = Linear(w, bias, gemv=True)
    assert layer.pairs is not None and not layer.is_packed and layer.plain is layer.weight
    x = torch.randn(2, 3, 64, generator=gen).bfloat16()
    panels = kernels.pairs_linear(x.view(6, 64), layer.pairs, 50) + bias
    assert torch.equal(layer(x), panels.view(2, 3, 50))
    one = x[0, :1]
    assert torch.equal(layer(one), kernels.linear_small(one, w) + bias)
    lean = Linear(w, bias, gemv=False)
    assert lean.plain is None and lean.pairs is not None
    assert torch.equal(lean(one), kernels.pairs_linear(one, lean.pairs, 50) + bias)
    assert Linear(w.float(), gemv=True).pairs is None
    assert Linear(w, pack=False, gemv=True).pairs is None
    odd = Linear(torch.randn(8, 5, generator=gen).bfloat16(), gemv=True)
    assert odd.pairs is None
    assert odd(torch.randn(3, 5, generator=gen).bfloat16()).shape == (3, 8)
