"""benchmarks/cpu_limits.py on a tiny model for a few seconds: every figure measured, every
bound and ratio filled, the CPU named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shard import cpu_kernels
from tests.conftest import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_limits.py"


@pytest.mark.slow
def test_cpu_limits_fills_every_column(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model-id", str(tiny_model_dir), "--scale", "0.06",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "cores" in lines[0] and "float32" in lines[0] and "failures 0" in lines[0]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "---" not in line]
    figures = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}
    assert len(figures) == 24
    for load in ("c=1", "c=32"):  # the serving path split by the router's metrics
        assert sum(f", {load} (" in name for name in figures) == 3, load
        served = figures[f"shard step served, {load} (forward + token choice, mean)"][0]
        assert float(served.split()[0]) > 0, served  # the router's histograms were read
    # the in-process step split: its weight products alone (timed, against the bound) and
    # the rest of the step
    products = figures["its weight products alone, back to back"]
    assert float(products[0].split()[0]) > 0 and products[1][0].isdigit(), products
    assert products[2][0].isdigit(), products
    for name, (measured, bound, ratio, goal) in figures.items():
        # the serving path is TPOT minus the in-process step: on a loaded machine the step
        # measured alone can take longer than a served one, so its sign is not fixed; nor
        # is a p50 gap less a mean call's, or the step less its products timed apart
        signed = name.startswith(("serving path", "router between", "the rest"))
        assert measured and measured.lstrip("-" if signed else "")[0].isdigit(), name
        if name.startswith(("TPOT", "decode step", "prefill")):
            assert bound[0].isdigit() and ratio[0].isdigit(), name
            assert goal or name.startswith("decode step in-process"), name
    for name in ("decode step of 32, roofline", "prefill of 8, roofline"):
        measured, bound, ratio, note = figures[name]
        assert ratio.endswith("% of roofline") and note.split("-")[0] in ("memory", "compute")
        assert "reads" in note and note.split(" MB")[0].split()[-1].isdigit(), note
    notes = {figures[name][3] for name in figures if name.startswith("matmul rate")}
    forms = {"F.linear", "oneDNN packed", "our panels"}
    assert all(set(note.split(" / ")) <= forms for note in notes), notes


def test_the_rate_bound_counts_the_shard_s_own_packed_products():
    """The matrix-multiply rate is the fastest of `F.linear`, oneDNN's linear on weights
    packed once and (bfloat16, with bf16 dot products) our panels of input pairs, as the
    shard multiplies (a bound from `F.linear` alone read 204% at c=32)."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    import cpu_limits as module

    weight, x = torch.randn(24, 40), torch.randn(3, 40)
    forms = module._linear_forms(weight)
    kernels = cpu_kernels.load()
    panels = "our panels" in forms
    assert panels == ("float32" in getattr(kernels, "panel_dtypes", ()))
    if torch.backends.mkldnn.is_available():
        assert set(forms) - {"our panels"} == {"F.linear", "oneDNN packed"}
    for name, form in forms.items():
        torch.testing.assert_close(form(x), x @ weight.T, msg=name)
    shapes = module.Shapes(layer=[(40, 24)], layers=1, head=(40, 8))
    rate, form = module.matmul_rate(shapes, 4, torch.float32, 1)
    assert rate > 0 and form in forms
    half, xh = weight.bfloat16(), x.bfloat16()
    forms = module._linear_forms(half)
    assert ("our panels" in forms) == ("bfloat16" in getattr(kernels, "panel_dtypes", ()))
    for name, form in forms.items():
        exact = xh.double() @ half.double().T
        torch.testing.assert_close(form(xh).double(), exact, rtol=2**-7, atol=1e-5, msg=name)


def test_where_onednn_packs_no_bfloat16_the_other_forms_remain(monkeypatch):
    """On AVX2-only CPUs oneDNN refuses to pack bfloat16 weights (it wants avx512bw/vl/dq or
    avx_ne_convert): the layer keeps its weight unpacked and the rate bound measures the
    forms that are left, instead of failing (as `cpu_limits.py --dtype bfloat16` did there)."""
    import torch

    from shard.models.linear import Linear

    sys.path.insert(0, str(SCRIPT.parent))
    import cpu_limits as module

    def refuse(weight, hint):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    weight, x = torch.randn(24, 40).bfloat16(), torch.randn(3, 40).bfloat16()
    forms = module._linear_forms(weight)
    assert "F.linear" in forms and "oneDNN packed" not in forms
    layer = Linear(weight, panels=False)
    assert not layer.is_packed and layer.weight is weight
    torch.testing.assert_close(layer(x), x @ weight.T)


def test_the_roofline_takes_the_slower_of_arithmetic_and_reads():
    """A step's roofline bound is the larger of its FLOPs over the rate and the bytes it must
    read over the bandwidth; the reads are every weight once and, for a decode step, each
    request's cached K/V (both K and V of every layer) at its context."""
    sys.path.insert(0, str(SCRIPT.parent))
    import cpu_limits as module

    shapes = module.Shapes(layer=[(40, 24)], layers=2, head=(40, 8), kv_elements=2 * 2 * 3 * 4)
    assert shapes.params == 2 * 40 * 24 + 40 * 8
    # a decode step multiplies the head on every row, a prefill on its last token only
    assert shapes.flops(3) == 2 * 3 * (2 * 40 * 24 + 40 * 8)
    assert shapes.prefill_flops(3) == 2 * (3 * 2 * 40 * 24 + 40 * 8)
    assert shapes.step_bytes(2, 0, 0) == shapes.params * 2
    assert shapes.step_bytes(4, 32, 100.5) == (shapes.params + 32 * 100.5 * 48) * 4
    name, measured, bound, ratio, note = module._roofline("step", 0.020, 0.004, 0.016, 4e8)
    assert (measured, bound, ratio) == ("20.0 ms", "16.0 ms", "80% of roofline")
    assert note.startswith("memory-bound") and "400 MB" in note
    assert module._roofline("p", 0.05, 0.03, 0.01, 1e8)[4].startswith("compute-bound")


def test_model_shapes_count_the_cache_a_token_keeps(tmp_path):
    """K and V of every layer, per KV head, of head_dim (given, or hidden / heads)."""
    import json

    sys.path.insert(0, str(SCRIPT.parent))
    import cpu_limits as module

    config = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8,
              "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 100}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert module.model_shapes(tmp_path).kv_elements == 4 * 2 * 2 * 8  # head_dim 64 / 8
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 16}))
    assert module.model_shapes(tmp_path).kv_elements == 4 * 2 * 2 * 16
    del config["num_key_value_heads"]  # multi-head attention: a KV head per head
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert module.model_shapes(tmp_path).kv_elements == 4 * 2 * 8 * 8
