"""Products of several rows with weights packed in panels (shard/csrc/panels.cpp:
`pack_panels`, `panel_linear`): float32 with AVX-512, bfloat16 by bf16 dot products, and the
linear layers that take them."""

from __future__ import annotations

import pytest
import torch

from shard import cpu_kernels
from shard.models.linear import Linear

kernels = cpu_kernels.load()
DTYPES = [
    pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            str(dtype).removeprefix("torch.") not in getattr(kernels, "panel_dtypes", ()),
            reason=f"no panels for {dtype} in this CPU's build ({need}): its layers keep "
            "oneDNN's packed weights (bfloat16 without bf16 instructions: widened to float32)",
        ),
    )
    for dtype, need in [(torch.float32, "AVX-512"), (torch.bfloat16, "avx512_bf16")]
]
# tiles of 12 rows (vector forms), 16 and 32 (AMX) and their remainders
ROWS = [1, 2, 11, 12, 13, 16, 17, 24, 25, 64, 130]
# (outputs, inputs): blocks of 32 outputs and partial ones; 2 to 1538 inputs (AMX tiles take
# bfloat16 inputs in multiples of 32; others stay on the dot products)
SHAPES = [(1, 2), (15, 64), (16, 30), (17, 576), (33, 128), (100, 1538)]
AMX = getattr(kernels, "amx_rows", 0) > 0 and kernels.amx_ready()
# `tiles`: whether bfloat16 products may take AMX tiles; without them in this build (or
# Linux's leave) both are the dot products, checked once
TILES = [
    True,
    pytest.param(False, marks=pytest.mark.skipif(not AMX, reason="no AMX tiles here: the "
                 "products of tiles=True are the dot products already")),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_panels_hold_each_outputs_inputs(dtype):
    """Panel q, word p, lane j: output 16 q + j's input p (bfloat16: inputs 2p and 2p + 1,
    low half first); outputs past N zero."""
    w = torch.arange(35 * 6, dtype=torch.float32).view(35, 6).to(dtype)  # exact either way
    packed = kernels.pack_panels(w)
    words = 6 if dtype == torch.float32 else 3
    assert packed.shape == (4, words, 16)  # 35 outputs: 2 blocks of 2 panels
    if dtype == torch.float32:
        padded = torch.cat([w, torch.zeros(64 - 35, 6)])
        assert torch.equal(packed, padded.view(4, 16, 6).transpose(1, 2))
        return
    bits = w.view(torch.int16).to(torch.int64) & 0xFFFF
    lanes = packed.to(torch.int64) & 0xFFFFFFFF
    for q in range(4):
        for j in range(16):
            n = 16 * q + j
            for p in range(3):
                expected = int(bits[n, 2 * p] | bits[n, 2 * p + 1] << 16) if n < 35 else 0
                assert int(lanes[q, p, j]) == expected, (q, p, j)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("outputs,inputs", SHAPES)
@pytest.mark.parametrize("tiles", TILES)
def test_small_integers_give_the_exact_sums(dtype, rows, outputs, inputs, tiles):
    """Integers in [-8, 8]: every product and partial sum is exact in float32, so each
    output is the exact sum (bfloat16: rounded once), whatever the order of the sums."""
    gen = torch.Generator().manual_seed(rows * 1000 + outputs)
    w = torch.randint(-8, 9, (outputs, inputs), generator=gen).to(dtype)
    x = torch.randint(-8, 9, (rows, inputs), generator=gen).to(dtype)
    out = kernels.panel_linear(x, kernels.pack_panels(w), outputs, tiles=tiles)
    assert out.shape == (rows, outputs) and out.dtype == dtype
    assert torch.equal(out, (x.double() @ w.double().T).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("outputs,inputs", SHAPES)
@pytest.mark.parametrize("tiles", TILES)
def test_products_within_float32_sums_and_the_rounding(dtype, rows, outputs, inputs, tiles):
    gen = torch.Generator().manual_seed(rows * 7 + inputs)
    w = torch.randn(outputs, inputs, generator=gen).to(dtype)
    x = torch.randn(rows, inputs, generator=gen).to(dtype)
    out = kernels.panel_linear(x, kernels.pack_panels(w), outputs, tiles=tiles).double()
    exact = x.double() @ w.double().T
    rounding = 2**-8 if dtype == torch.bfloat16 else 0.0
    bound = rounding * exact.abs() + 1e-6 * (x.double().abs() @ w.double().abs().T)
    assert bool(((out - exact).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_a_wider_tensor_and_the_checks(dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=gen).to(dtype)
    packed = kernels.pack_panels(w)
    wide = torch.randn(5, 100, generator=gen).to(dtype)
    assert torch.equal(
        kernels.panel_linear(wide[:, :64], packed, 40),
        kernels.panel_linear(wide[:, :64].contiguous(), packed, 40),
    )
    with pytest.raises(RuntimeError, match="inputs"):
        kernels.panel_linear(wide[:, :62], packed, 40)
    with pytest.raises(RuntimeError, match="past the packed columns"):
        kernels.panel_linear(wide[:, :64], packed, 65)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="panel_linear: x"):
        kernels.panel_linear(wide[:, :64].to(other), packed, 40)
    with pytest.raises(RuntimeError, match="pack_panels"):
        kernels.pack_panels(torch.randn(4, 6).half())
    if dtype == torch.bfloat16:
        with pytest.raises(RuntimeError, match="even number of inputs"):
            kernels.pack_panels(torch.randn(4, 5).bfloat16())


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_take_the_panels_past_one_row(dtype):
    """A layer packs its panels instead of oneDNN's layout: several rows go through them,
    each with the bias added after; one row through the single-row kernel on a plain copy
    (float32), or through the panels too (bfloat16, as fast: no plain copy kept), as without
    the copy (--no-cpu-gemv). Unpacked layers and bfloat16 with an odd number of inputs keep
    their paths."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(50, 64, generator=gen).to(dtype)
    bias = torch.randn(50, generator=gen).to(dtype)
    layer = Linear(w, bias, gemv=True)
    assert layer.panels is not None and not layer.is_packed
    x = torch.randn(2, 3, 64, generator=gen).to(dtype)
    panels = kernels.panel_linear(x.view(6, 64), layer.panels, 50) + bias
    assert torch.equal(layer(x), panels.view(2, 3, 50))
    one = x[0, :1]
    if dtype == torch.float32:
        assert layer.plain is layer.weight
        assert torch.equal(layer(one), kernels.linear_small(one, w) + bias)
    else:
        assert layer.plain is None and layer.weight is layer.panels
        assert torch.equal(layer(one), kernels.panel_linear(one, layer.panels, 50) + bias)
    lean = Linear(w, bias, gemv=False)
    assert lean.plain is None and lean.panels is not None
    assert torch.equal(lean(one), kernels.panel_linear(one, lean.panels, 50) + bias)
    assert Linear(w, pack=False, gemv=True).panels is None
    odd = Linear(torch.randn(8, 5, generator=gen).to(dtype), gemv=True)
    assert (odd.panels is None) == (dtype == torch.bfloat16)
    assert odd(torch.randn(3, 5, generator=gen).to(dtype)).shape == (3, 8)


def test_a_cpu_with_amx_multiplies_bfloat16_on_its_tiles():
    """Where the CPU has AMX with bf16 (Sapphire Rapids and later) the native build holds the
    tiles' path and Linux lets the process use them; elsewhere the build says it has none."""
    flags = set(cpu_kernels.cpu_flags().split())
    amx = {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags
    if not amx or "-mno-" in " ".join(cpu_kernels.FLAGS):
        assert not AMX
        pytest.skip("no AMX with bf16 here (or a build without it): the dot products serve")
    assert kernels.amx_rows >= 1
    if not kernels.amx_ready():
        pytest.skip("Linux did not grant this process the tile state: the dot products serve")


@pytest.mark.skipif(not AMX, reason="no AMX tiles here: bfloat16 takes the dot products")
@pytest.mark.parametrize("rows", [1, 15, 16, 33, 200])
def test_tiles_and_dot_products_round_alike_but_for_rare_ties(rows):
    """The tile unit rounds its float32 additions its own way: about one output in 10^4
    rounds to a neighbouring bfloat16 of the dot products' (float32 sums a few ulps apart
    of the sum of |products|); inputs not a multiple of 32 stay on the dot products, bit
    for bit."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(3072, 576, generator=gen).bfloat16()
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    packed = kernels.pack_panels(w)
    tiled, dotted = (kernels.panel_linear(x, packed, 3000, tiles=t).double() for t in (1, 0))
    magnitude = x.double().abs() @ w[:3000].double().abs().T
    assert bool(((tiled - dotted).abs() <= 2**-7 * dotted.abs() + 1e-6 * magnitude).all())
    assert float((tiled != dotted).double().mean()) < 1e-3
    odd = torch.randn(rows, 34, generator=gen).bfloat16()
    packed = kernels.pack_panels(torch.randn(40, 34, generator=gen).bfloat16())
    assert torch.equal(
        kernels.panel_linear(odd, packed, 40), kernels.panel_linear(odd, packed, 40, tiles=False)
    )
