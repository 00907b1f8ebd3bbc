"""Quantized panels (shard/models/qpanels.py, shard/csrc/qpanels.cpp): the packed layout
word by word; `qpanel_linear` gives x @ dequantized w exactly where float32 sums are exact
(small integers, power-of-two scales) and within float32 summation elsewhere, for bfloat16
and float32 rows, 1..256 of them, int8 per channel and in groups, int4 in groups of 32..128,
columns past a unit's end; quantized models take the panels (and `--no-pack-linear` keeps
the codes)."""

from __future__ import annotations

import logging

import pytest
import torch

from shard import cpu_kernels
from shard.models import qpanels
from shard.models.quant import (
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from tests.helpers import make_engine
from tests.test_quant import PROMPTS, _run, models  # noqa: F401 (a fixture)

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(
    not hasattr(KERNELS, "qpanel_linear"), reason="needs AVX-512 (F and BW)"
)
# float32 and bfloat16 rows with AVX-512 F and BW (bfloat16 by bf16 dot products where the
# CPU has them, else widened to float32)
DTYPES = getattr(KERNELS, "qpanel_dtypes", ())


def _takes(dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        pytest.skip(f"this build's panels take {', '.join(DTYPES)} rows, not {name}")


ROWS = [1, 2, 3, 7, 12, 13, 24, 25, 64, 256]


def _int8(n: int, k: int, group: int, gen: torch.Generator, exact: bool):
    """(packed args, dequantized w [N, K] float64) for random codes and scales."""
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = _scales(n, k // group, gen, exact)
    packed = qpanels.int8_panels(q, scales)
    return (*packed, None), dequantize_int8(q, scales).double()


def _int4(n: int, k: int, group: int, gen: torch.Generator, exact: bool):
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = _scales(n, k // group, gen, exact)
    mins = -8 * scales.float() if exact else torch.randn(n, k // group, generator=gen)
    packed = qpanels.int4_panels(codes, scales, mins)
    return packed, dequantize_int4(pack_int4(codes), scales, mins).double()


def _scales(n: int, groups: int, gen: torch.Generator, exact: bool) -> torch.Tensor:
    if exact:  # powers of two: every product and sum below stays an exact float32
        return (2.0 ** torch.randint(-3, 2, (n, groups), generator=gen)).half()
    return (torch.rand(n, groups, generator=gen) * 0.1 + 0.01).half()


FORMS = [("int8", 576), ("int8", 32), ("int8", 16), ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("method, group", FORMS)
def test_small_integers_give_exactly_the_rounded_sum(method, group, rows, dtype):
    """x in -4..4 and power-of-two scales: the float32 sums are exact, so the output is the
    float64 product rounded once to x's dtype, for every row count (float32: up to 4 rows
    converted in registers, more through the buffer) and a partial last unit."""
    _takes(dtype)
    gen = torch.Generator().manual_seed(rows * 7 + group)
    n, k = 70, 576 if group != 128 else 1024
    args, w = (_int8 if method == "int8" else _int4)(n, k, group, gen, exact=True)
    x = torch.randint(-4, 5, (rows, k), generator=gen).to(dtype)
    out = KERNELS.qpanel_linear(x, *args, n)
    assert out.dtype == dtype and out.shape == (rows, n)
    assert torch.equal(out, (x.double() @ w.T).to(dtype))


SHAPES = [(960, 576), (576, 1536), (33, 128)]  # SmolLM2's qkv and down; a partial unit
LAYERS = [(m, g, n, k) for m, g in FORMS for n, k in SHAPES if k % g == 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4, 9, 32, 100])
@pytest.mark.parametrize("method, group, n, k", LAYERS)
def test_random_values_are_within_float32_summation(method, group, n, k, rows, dtype):
    """Within float32 summation (bfloat16: and one rounding) of x @ dequantized w."""
    _takes(dtype)
    gen = torch.Generator().manual_seed(n + k + rows + group)
    args, w = (_int8 if method == "int8" else _int4)(n, k, group, gen, exact=False)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    expected = x.double() @ w.T
    rounding = 2**-8 if dtype == torch.bfloat16 else 0.0
    slack = rounding * expected.abs() + 1e-5 * (x.double().abs() @ w.abs().T)
    assert ((KERNELS.qpanel_linear(x, *args, n).double() - expected).abs() <= slack).all()


PAIRED = [(576, 70, 576), (32, 70, 576), (16, 33, 128), (130, 33, 130)]  # (group, n, k)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("group, n, k", PAIRED)
@pytest.mark.parametrize("exact", [True, False])
def test_few_bfloat16_int8_rows_multiply_alike_by_either_form(group, n, k, rows, exact):
    """Up to 4 bfloat16 rows of int8 take float32 multiply-adds in the codes' order
    (`paired`) where the CPU runs them faster than bf16 dot products: both forms give the
    float64 product rounded once where float32 sums are exact, and stay within float32
    summation elsewhere (per channel, groups of 32 and 16, an odd number of pairs, a
    partial unit); unset, the CPU's own choice runs."""
    _takes(torch.bfloat16)
    gen = torch.Generator().manual_seed(rows + group + n + k)
    args, w = _int8(n, k, group, gen, exact=exact)
    x = (
        torch.randint(-4, 5, (rows, k), generator=gen)
        if exact
        else torch.randn(rows, k, generator=gen)
    ).bfloat16()
    expected = x.double() @ w.T
    outs = {f: KERNELS.qpanel_linear(x, *args, n, paired=f) for f in (True, False)}
    for out in outs.values():
        if exact:
            assert torch.equal(out, expected.bfloat16())
        else:
            slack = 2**-8 * expected.abs() + 1e-5 * (x.double().abs() @ w.abs().T)
            assert ((out.double() - expected).abs() <= slack).all()
    assert isinstance(KERNELS.qpanel_paired(), bool)
    assert torch.equal(KERNELS.qpanel_linear(x, *args, n), outs[KERNELS.qpanel_paired()])


def test_the_int8_layout_word_by_word():
    q = torch.arange(70 * 8, dtype=torch.int32).remainder(251).sub(125).to(torch.int8).view(70, 8)
    codes, scales = qpanels.int8_panels(q, torch.ones(70, 1).half())
    assert codes.shape == (3, 4, 64) and scales.shape == (3, 1, 32)
    for u, p, panel, j, h in [(0, 0, 0, 0, 0), (0, 3, 1, 15, 1), (1, 2, 0, 7, 1), (2, 1, 0, 5, 0)]:
        assert codes[u, p, panel * 32 + 2 * j + h] == q[32 * u + 16 * panel + j, 2 * p + h]
    assert (codes[2, :, 12:] == 0).all() and (scales[2, 0, 6:] == 0).all()  # rows 70.. pad


def test_the_int4_layout_nibble_by_nibble():
    codes = torch.arange(40 * 8).remainder(16).to(torch.uint8).view(40, 8)
    scales, mins = torch.full((40, 1), 0.5).half(), torch.full((40, 1), 3.0)
    packed, s, m = qpanels.int4_panels(codes, scales, mins)
    assert packed.shape == (2, 2, 64) and packed.dtype == torch.uint8
    words = packed.view(torch.int16).int() & 0xFFFF  # [U, K / 4, 32] little-endian words
    for u, two, i in [(0, 0, 0), (0, 1, 31), (1, 0, 9), (1, 1, 14)]:
        for nibble, (pair, panel) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            row, col = 32 * u + 16 * panel + i // 2, 2 * (2 * two + pair) + i % 2
            want = codes[row, col] if row < 40 else 0  # rows 40.. pad
            assert (words[u, two, i] >> (4 * nibble)) & 15 == want
    assert torch.equal(m[0, 0, :8], torch.full((8,), 3.0).half()) and (m[1, 0, 8:] == 0).all()


def test_parameters_are_float16_where_every_one_is_a_float16_value():
    """GGUF's Q4_0 / Q4_1 / Q8_0 and on-the-fly quantization keep float16 (2 bytes a group
    and column); a float32 min that float16 would round (GPTQ's s z, Q4_K) keeps both float32
    and the values as given."""
    codes = torch.zeros(32, 64, dtype=torch.uint8)
    scales, mins = torch.full((32, 2), 0.1).half(), torch.full((32, 2), -0.75)
    _, s, m = qpanels.int4_panels(codes, scales, mins)
    assert s.dtype == m.dtype == torch.float16
    _, s, m = qpanels.int4_panels(codes, scales, mins + 1e-4)
    assert s.dtype == m.dtype == torch.float32 and torch.equal(m[0, 0, 0], mins[0, 0] + 1e-4)
    assert torch.equal(s[0, 0, 0], scales[0, 0].float())
    assert qpanels.int8_panels(codes.to(torch.int8), scales)[1].dtype == torch.float16
    q4k_scales = torch.full((32, 2), 0.1).half().float() * 37  # a float16 times a 6-bit scale
    assert qpanels.int8_panels(codes.to(torch.int8), q4k_scales)[1].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_float16_and_float32_parameters_give_the_same_products(method, rows, dtype):
    """The same float16 values in float32 panels: the products agree bit for bit (the mins'
    offset, m - 16 s, is taken in float32 either way)."""
    _takes(dtype)
    gen = torch.Generator().manual_seed(rows)
    scales = (torch.rand(96, 8, generator=gen) * 0.1 + 0.01).half()
    if method == "int8":
        q = torch.randint(-127, 128, (96, 256), generator=gen, dtype=torch.int8)
        (codes, scales), mins = qpanels.int8_panels(q, scales), None
    else:
        q = torch.randint(0, 16, (96, 256), generator=gen, dtype=torch.uint8)
        mins = torch.randn(96, 8, generator=gen).half()
        codes, scales, mins = qpanels.int4_panels(q, scales, mins)
    assert scales.dtype == torch.float16
    x = torch.randn(rows, 256, generator=gen).to(dtype)
    halves = KERNELS.qpanel_linear(x, codes, scales, mins, 96)
    singles = KERNELS.qpanel_linear(
        x, codes, scales.float(), None if mins is None else mins.float(), 96
    )
    assert torch.equal(halves, singles)


def test_refusals_name_what_is_wrong():
    args, _ = _int4(32, 64, 32, torch.Generator().manual_seed(0), exact=False)
    x = torch.randn(2, 64)
    refused = "bfloat16 or float32" if "bfloat16" in DTYPES else "bfloat16 rows need a CPU"
    with pytest.raises(RuntimeError, match=refused):
        KERNELS.qpanel_linear(x.half() if "bfloat16" in DTYPES else x.bfloat16(), *args, 32)
    with pytest.raises(RuntimeError, match="inputs"):
        KERNELS.qpanel_linear(torch.randn(2, 128), *args, 32)
    with pytest.raises(RuntimeError, match="mins"):
        KERNELS.qpanel_linear(x, args[0], args[1], None, 32)
    with pytest.raises(RuntimeError, match="past the packed"):
        KERNELS.qpanel_linear(x, *args, 33)
    with pytest.raises(RuntimeError, match="mins: shaped like scales, in their dtype"):
        KERNELS.qpanel_linear(x, args[0], args[1], args[2].half(), 32)
    with pytest.raises(RuntimeError, match="scales: float16 or float32"):
        KERNELS.qpanel_linear(x, args[0], args[1].double(), None, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_layer_in_panels_multiplies_as_its_codes_do(method, dtype):
    """`into_panels` repacks a layer (held once: its `weight` becomes the panels); its
    products equal the row-major codes' within float32 summation (bfloat16: and roundings)."""
    _takes(dtype)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(100, 576, generator=gen)
    layer = QuantLinear.quantize(weight, torch.randn(100).to(dtype), method, 64)
    codes = QuantLinear.quantize(weight, layer.bias, method, 64)
    if method == "int4":
        reference = dequantize_int4(layer.weight, *layer.qparams)
    else:
        reference = dequantize_int8(layer.weight, *layer.qparams)
    assert layer.into_panels() and layer.panels and not layer.into_panels()
    assert layer.weight.shape[0] == 4 and "quantized panels" in layer.kind
    for rows in (1, 5, 40):
        x = torch.randn(2, rows, 576, generator=gen).to(dtype)
        out, old = layer(x), codes(x)
        assert out.shape == old.shape == (2, rows, 100) and out.dtype == dtype
        product = x.double() @ reference.double().T  # rounded once, then the bias added
        expected = product + layer.bias.double()
        rounding = 2**-8 if dtype == torch.bfloat16 else 0.0
        slack = rounding * (product.abs() + expected.abs()) + 1e-5 * (
            x.double().abs() @ reference.abs().double().T
        )
        assert ((out.double() - expected).abs() <= slack).all()
        assert ((old.double() - expected).abs() <= slack).all()


def test_an_int4_layer_keeps_its_codes_for_groups_the_kernel_cannot_sum():
    q, scales = quantize_int8(torch.randn(32, 36), 4)  # int8 in groups of 4: pairs even
    assert QuantLinear("int8", q, (scales,)).into_panels()
    packed, scales, mins = quantize_int4(torch.randn(32, 64), 32)
    layer = QuantLinear("int4", packed, (scales, mins))
    layer.group_size = 8  # as a checkpoint's odd group would be
    assert not layer.into_panels() and unpack_int4(layer.weight).shape == (32, 64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_serves_through_the_panels(models, method, dtype):  # noqa: F811
    """Every quantized layer of a bfloat16 or float32 model (the head's int8 too) in panels,
    the tokens those of the same model on the row-major codes (`--no-pack-linear`)."""
    _takes(dtype)
    options = dict(dtype=dtype, quantize=method, quantize_group_size=32)
    paneled = make_engine(models["llama"], **options)
    model = paneled.runner.model
    assert all(x.qkv.panels and x.mlp.down.linear.panels for x in model.layers)
    assert model.lm_head.linear.panels
    assert "quantized panels" in paneled.runner.kernel_report()
    rows = make_engine(models["llama"], pack_linear=False, **options)
    assert not rows.runner.model.layers[0].qkv.panels
    got, want = _run(paneled), _run(rows)
    assert got[0] == want[0]
    for i in want[1]:
        assert max(abs(a - b) for a, b in zip(got[1][i], want[1][i], strict=True)) < 0.05


def test_a_bfloat16_model_takes_the_panels_where_the_build_multiplies_bfloat16(
    models,  # noqa: F811
    caplog,
):
    """Builds with AVX-512 F and BW take bfloat16 rows (by bf16 dot products, or widened to
    float32 without them: Skylake-SP, Cascade Lake, Ice Lake); a build whose panels took
    float32 rows only would keep a bfloat16 model's row-major codes and say in the start-up
    log that --dtype float32 takes the panels."""
    with caplog.at_level(logging.WARNING, logger="shard"):
        engine = make_engine(models["llama"], dtype="bfloat16", quantize="int8")
    assert engine.runner.model.layers[0].qkv.panels == ("bfloat16" in DTYPES)
    warned = "with --dtype float32 they take our quantized panels" in caplog.text
    assert warned == ("bfloat16" not in DTYPES)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shard"):
        make_engine(models["llama"], dtype="float32", quantize="int8")
    assert "quantized panels" not in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(
    "avx512_bf16" not in cpu_kernels.cpu_flags().split(),
    reason="no bf16 dot products here: the other tests run the build without them already",
)
def test_the_build_without_bf16_dot_products_on_a_cpu_with_them():
    """CPUs with AVX-512 but no bf16 dot products multiply bfloat16 rows widened to float32
    (panels, quantized panels, prefill attention); that build is made here too
    (PYTGI_CPU_KERNEL_CFLAGS=-mno-avx512bf16, a module of its own) and this file's tests, the
    plain panels', the prefill attention's and the C++ step's run against it in a fresh
    process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTGI_CPU_KERNEL_CFLAGS": "-mno-avx512bf16"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k",
         "not without_bf16_dot_products", "tests/test_qpanels.py", "tests/test_panel_linear.py",
         "tests/test_prefill_attention.py", "tests/test_cpu_step.py"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
    # the bfloat16 cases ran, widened: none skipped for want of bfloat16 panels
    assert not any(
        skip in result.stdout
        for skip in ("not bfloat16", "no panels for torch.bfloat16", "bfloat16 prefills")
    )
    probe = "from shard import cpu_kernels as c; k = c.load(); print(k.panel_widens_bfloat16, "
    probe += "'bfloat16' in k.panel_dtypes, 'bfloat16' in k.qpanel_dtypes, "
    probe += "'bfloat16' in k.prefill_dtypes)"
    built = subprocess.run(
        [sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], env=env,
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert built.stdout.split() == ["True"] * 4


AMX = getattr(KERNELS, "amx_qpanel_rows", 0) > 0 and KERNELS.amx_ready()


@pytest.mark.skipif(not AMX, reason="no AMX tiles here: every row takes the bf16 dot products")
@pytest.mark.parametrize("rows", [7, 8, 13, 16, 17, 33, 100])
@pytest.mark.parametrize("method, group", [("int8", 576), ("int8", 32), ("int8", 16),
                                           ("int4", 32), ("int4", 64), ("int4", 128)])  # fmt: skip
def test_amx_tiles_and_dot_products_round_alike_but_for_rare_ties(method, group, rows):
    """From amx_qpanel_rows (8) bfloat16 rows multiply on AMX tiles (codes converted into a
    chunk's bfloat16 pairs, two groups' tile sums scaled a pass where the chunk holds an even
    number, else one: int4 groups of 64 over 576 inputs end on a chunk of one group; int8
    per channel is one group a chunk): within a few float32 ulps of the
    dot products' sums, about one output in 10^4 a neighbouring bfloat16; 7 rows, and
    groups of 16 inputs (not a whole tile product), stay on the dot products bit for bit."""
    gen = torch.Generator().manual_seed(rows + group)
    n, k = 960, 576 if group != 128 else 1536
    args, w = (_int8 if method == "int8" else _int4)(n, k, group, gen, exact=False)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    tiled, dotted = (KERNELS.qpanel_linear(x, *args, n, tiles=t).double() for t in (True, False))
    magnitude = x.double().abs() @ w.abs().T
    assert bool(((tiled - dotted).abs() <= 2**-7 * dotted.abs() + 1e-6 * magnitude).all())
    differ = float((tiled != dotted).double().mean())
    assert differ < 1e-3
    if rows < KERNELS.amx_qpanel_rows or group == 16:
        assert differ == 0


@pytest.mark.skipif(not AMX, reason="no AMX tiles here: every row takes the bf16 dot products")
def test_an_amx_cpu_takes_the_tiles_for_a_batch():
    """The tiles are really taken: 64 rows of a SmolLM2 gate_up in int8 per channel (one
    segment of 576 inputs: the tile unit's additions and the dot products' part ways) round
    some outputs otherwise (exact inputs stay exact on both:
    test_small_integers_give_exactly_the_rounded_sum)."""
    gen = torch.Generator().manual_seed(3)
    args, _ = _int8(3072, 576, 576, gen, exact=False)
    x = torch.randn(64, 576, generator=gen).bfloat16()
    tiled, dotted = (KERNELS.qpanel_linear(x, *args, 3072, tiles=t) for t in (True, False))
    assert not torch.equal(tiled, dotted)
