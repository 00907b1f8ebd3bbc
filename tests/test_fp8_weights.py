"""fp8 layers (shard/models/fp8.py): `--quantize fp8` and fp8 checkpoints served as stored on
GPUs with fp8 products. CPUs have none worth using, so the shard refuses `--quantize fp8`
there; these tests run the same code on CPU through PyTorch's own (slow) fp8 products, with
the capability check answered yes."""

from __future__ import annotations

import pytest
import torch

from shard.errors import ModelLoadError
from shard.models.fp8 import FP8, Fp8Linear, dequantize_fp8, quantize_rows
from tests.helpers import make_engine, run_to_end, spec
from tests.test_prequantized import _convert_compressed, _store, tiny  # noqa: F401

PROMPTS = ["The quick brown fox jumps", "Once upon a time there", "1 2 3 4 5 6 7 8"]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("k, n", [(576, 192), (64, 128)])
def test_a_layer_multiplies_its_quantized_rows_by_its_quantized_weights(k, n, rows):
    """out = (xq sx) @ (wq sw)^T, summed in float32, plus the bias."""
    gen = torch.Generator().manual_seed(k + n + rows)
    weight, x, bias = (
        torch.randn(n, k, generator=gen),
        torch.randn(rows, k, generator=gen),
        torch.randn(n, generator=gen),
    )
    layer = Fp8Linear.quantize(weight, bias)
    assert layer.weight.dtype == FP8 and layer.nbytes == n * k + 4 * n
    xq, sx = quantize_rows(x)
    expected = (
        dequantize_fp8(xq, sx).double() @ dequantize_fp8(layer.weight, layer.scales).double().T
    )
    assert _relative_error(layer(x), expected + bias.double()) < 1e-5
    # the quantization itself: within e4m3's half-step of 2^-4 relative
    assert _relative_error(layer(x), x.double() @ weight.double().T + bias.double()) < 0.05


def test_rows_scale_to_the_largest_value():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [448.0, 1.0, -3.0]])
    q, scales = quantize_rows(x)
    assert scales.view(-1).tolist() == pytest.approx([2 / 448, 1e-12 / 448, 1.0])
    assert torch.equal(dequantize_fp8(q, scales)[[0, 2]], x[[0, 2]])  # representable values
    assert not dequantize_fp8(q, scales)[1].any()


def test_per_tensor_scales_of_fused_parts_become_per_channel():
    gen = torch.Generator().manual_seed(1)
    parts = [(torch.randn(32, 64, generator=gen) * 50).to(FP8) for _ in range(2)]
    layer = Fp8Linear(
        torch.cat(parts), torch.cat([torch.full((32, 1), 0.5), torch.full((32, 1), 2.0)])
    )
    assert layer.scales.shape == (1, 64) and layer.scales[0, :32].eq(0.5).all()
    with pytest.raises(ModelLoadError, match="multiples of 16"):
        Fp8Linear(parts[0][:, :40], torch.tensor(1.0))


@pytest.mark.parametrize("scale_kind", ["tensor", "channel", "block"])
def test_a_store_gives_fp8_weights_as_stored_where_they_are_multiplied(tmp_path, scale_kind):
    gen = torch.Generator().manual_seed(4)
    n, k = 200, 256
    fp8 = (torch.randn(n, k, generator=gen) * 40).to(FP8)
    scales = {"tensor": torch.tensor(0.75), "channel": torch.rand(n, 1, generator=gen) + 0.5,
              "block": torch.rand(2, 2, generator=gen) + 0.5}  # fmt: skip
    name = "weight_scale_inv" if scale_kind == "block" else "weight_scale"
    tensors = {"weight": fp8, name: scales[scale_kind]}
    store = _store(tmp_path, tensors, {"method": "fp8", "block": [128, 128]})
    store.fp8_products = True
    form = store.packed("layer.weight")
    if scale_kind == "block":  # no row-wise form: multiplied out
        assert form is None
        return
    method, weight, (row_scales,), order = form
    assert (
        method == "fp8"
        and order is None
        and torch.equal(weight.view(torch.uint8), fp8.view(torch.uint8))
    )
    assert torch.equal(row_scales, scales[scale_kind].expand(n, 1))


@pytest.fixture
def fp8_device(monkeypatch):
    """The shard's capability check answers as a GPU with fp8 products would."""
    monkeypatch.setattr("shard.runner.fp8_products", lambda device: True)


def _first_tokens(engine, batch):
    specs = [spec(i, p, 1, ignore_eos=True, top_n_tokens=3) for i, p in enumerate(PROMPTS)]
    done = run_to_end(engine, batch, specs)
    return {i: done.generations[i][0].top_tokens[0] for i in range(len(PROMPTS))}


def _assert_close(got, want, tolerance):
    """Each first token one of the reference's top 3, its log-prob within `tolerance`."""
    for i, top in want.items():
        logprobs = dict(zip(top.ids, top.logprobs, strict=True))
        assert got[i].ids[0] in logprobs
        assert abs(got[i].logprobs[0] - logprobs[got[i].ids[0]]) < tolerance


def test_quantize_fp8_on_load(tiny, fp8_device):  # noqa: F811
    engine = make_engine(tiny, quantize="fp8")
    layer = engine.runner.model.layers[0].qkv
    assert isinstance(layer, Fp8Linear)
    assert "fp8 weights and activations" in engine.runner.kernel_report()
    assert not isinstance(engine.runner.model.lm_head.linear, Fp8Linear)  # the head stays
    _assert_close(_first_tokens(engine, 1), _first_tokens(make_engine(tiny), 2), 0.05)


def test_an_fp8_checkpoint_is_served_as_stored(tiny, tmp_path, fp8_device):  # noqa: F811
    quantized, twin = _convert_compressed(tiny, tmp_path, "fp8")
    engine = make_engine(quantized)
    layer = engine.runner.model.layers[0].qkv
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8
    _assert_close(_first_tokens(engine, 1), _first_tokens(make_engine(twin), 2), 0.05)
    assert isinstance(make_engine(quantized, quantize="fp8").runner.model.layers[0].qkv, Fp8Linear)


def test_quantize_fp8_is_refused_without_fp8_products(tiny):  # noqa: F811
    with pytest.raises(ModelLoadError, match="--quantize fp8 needs a GPU with fp8 products"):
        make_engine(tiny, quantize="fp8")


@pytest.mark.parametrize("rank", [0, 1])
def test_shards_cut_fp8_weights_by_rows_with_their_scales_and_by_any_columns(tmp_path, rank):
    from shard.models.weights import Loader, Param, Split
    from shard.parallel import Parallel

    gen = torch.Generator().manual_seed(6)
    fp8 = (torch.randn(64, 96, generator=gen) * 40).to(FP8)
    scales = torch.rand(64, 1, generator=gen) + 0.5
    store = _store(tmp_path, {"weight": fp8, "weight_scale": scales}, {"method": "fp8"})
    store.fp8_products = True
    loader = Loader(store, Parallel(rank, 2), 16, torch.float32, torch.device("cpu"))
    rows = loader.linear(Param.of("layer.weight", split=Split.ROWS))
    half = slice(32 * rank, 32 * rank + 32)
    assert torch.equal(rows.weight.view(torch.uint8), fp8[half].view(torch.uint8))
    assert torch.equal(rows.scales, scales[half].view(1, -1))
    cols = loader.linear(Param.of("layer.weight", split=Split.COLS)).linear
    columns = slice(48 * rank, 48 * rank + 48)  # 48: not a multiple of any group
    assert torch.equal(cols.weight.view(torch.uint8), fp8[:, columns].view(torch.uint8))
    assert torch.equal(cols.scales, scales.view(1, -1))
