"""GPTQ (act-order included) and AWQ checkpoints: tensors the test packs from known codes,
zeros and scales, in each method's published layout, unpack to exactly s (q - z); a tiny
model in each format serves the tokens of the same model with those weights in float32, at
1 and 2 shards; what cannot be served is one clear line."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shard.errors import ModelLoadError
from shard.loader import WeightStore
from shard.prequantized import AWQ_ORDER, PrequantizedStore
from tests.conftest import build_tiny_model
from tests.helpers import make_engine, run_to_end, spec
from tests.test_tensor_parallel import ShardGroup

PROMPTS = ["The quick brown fox jumps", "Once upon a time there", "1 2 3 4 5 6 7 8"]
SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}  # fmt: skip


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 -> int32 words, the first value in the low bits."""
    shifted = nibbles.to(torch.int64) << (4 * torch.arange(8))
    return torch.from_numpy(shifted.sum(-1).numpy().astype(np.uint32).view(np.int32))


def gptq_tensors(codes, zeros, scales, g_idx, minus_one=True) -> dict:
    """codes [K, N], zeros [G, N] (0..15), scales [G, N], g_idx [K] in GPTQ's layout."""
    k, n = codes.shape
    stored = zeros - 1 if minus_one else zeros
    return {
        "qweight": _words(codes.view(k // 8, 8, n).transpose(1, 2)),  # 8 inputs per word
        "qzeros": _words(stored.view(-1, n // 8, 8)),  # 8 outputs per word
        "scales": scales.half(),
        "g_idx": g_idx.to(torch.int32),
    }


def awq_tensors(codes, zeros, scales) -> dict:
    """codes [K, N], zeros [G, N], scales [G, N] in AWQ's GEMM layout."""
    order = list(AWQ_ORDER)
    k, n = codes.shape
    return {
        "qweight": _words(codes.view(k, n // 8, 8)[..., order]),
        "qzeros": _words(zeros.view(-1, n // 8, 8)[..., order]),
        "scales": scales.half(),
    }


def _known(k: int, n: int, group: int, seed: int, act_order: bool):
    """Codes, zeros (1..15: GPTQ v1 stores zero - 1), float16-exact scales, g_idx, and the
    weight [N, K] they mean: w[n, k] = s[g, n] (q[k, n] - z[g, n]), g = g_idx[k]."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(1, 16, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.05 + 0.01).half().float()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    weight = scales[g_idx] * (codes - zeros[g_idx])  # [K, N]
    return codes, zeros, scales, g_idx, weight.t().contiguous()


def _store(tmp_path, tensors: dict, settings: dict) -> PrequantizedStore:
    save_file({f"layer.{k}": v for k, v in tensors.items()}, str(tmp_path / "w.safetensors"))
    return PrequantizedStore(WeightStore(tmp_path), settings)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("minus_one", [True, False])  # checkpoint_format gptq (v1) and v2
def test_gptq_tensors_unpack_to_the_known_weights(tmp_path, act_order, minus_one):
    codes, zeros, scales, g_idx, weight = _known(128, 64, 32, 1, act_order)
    tensors = gptq_tensors(codes, zeros, scales, g_idx, minus_one)
    store = _store(tmp_path, tensors, {"method": "gptq", "zeros_minus_one": minus_one})
    assert store.shape("layer.weight") == [64, 128] and "layer.weight" in store
    assert torch.equal(store.get("layer.weight"), weight)
    method, q, params, order = store.packed("layer.weight")
    assert (order is not None) == act_order
    from shard.models.quant import QuantLinear

    x = torch.randn(3, 128)
    out = QuantLinear(method, q, params, order=order)(x)
    assert ((out.double() - x.double() @ weight.double().T).norm() / out.norm()) < 1e-6


def test_awq_tensors_unpack_to_the_known_weights(tmp_path):
    codes, zeros, scales, _, weight = _known(96, 32, 32, 2, act_order=False)
    store = _store(tmp_path, awq_tensors(codes, zeros, scales), {"method": "awq"})
    assert store.shape("layer.weight") == [32, 96]
    assert torch.equal(store.get("layer.weight"), weight)
    assert store.packed("layer.weight")[3] is None


def _convert(model_dir, target, method: str, act_order: bool = False):
    """(the model with its decoder layers in `method`'s tensors, the twin with the weights
    they mean in float32)."""
    quantized, twin = target / method, target / f"{method}-twin"
    for d in (quantized, twin):
        shutil.copytree(model_dir, d)
    tensors = load_file(str(model_dir / "model.safetensors"))
    packed, plain = {}, {}
    for i, (name, w) in enumerate(sorted(tensors.items())):
        if ".layers." not in name or not name.endswith("proj.weight"):
            packed[name] = plain[name] = w
            continue
        n, k = w.shape
        codes, zeros, scales, g_idx, weight = _known(k, n, 32, i, False)
        if act_order:  # one order for the layers that share an input (q/k/v, gate/up)
            shared = f"{name.split('.')[2]}-{SHARED_INPUT[name.split('.')[-2]]}"
            gen = torch.Generator().manual_seed(zlib.crc32(shared.encode()))
            g_idx = (torch.arange(k) // 32)[torch.randperm(k, generator=gen)]
            weight = (scales[g_idx] * (codes - zeros[g_idx])).t().contiguous()
        base = name.removesuffix(".weight")
        if method == "gptq":
            parts = gptq_tensors(codes, zeros, scales, g_idx)
        else:
            parts = awq_tensors(codes, zeros, scales)
        packed.update({f"{base}.{key}": value for key, value in parts.items()})
        plain[name] = weight
    save_file(packed, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, str(twin / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 32,
                                     "desc_act": act_order, "version": "gemm"}  # fmt: skip
    (quantized / "config.json").write_text(json.dumps(config))
    return quantized, twin


@pytest.fixture(scope="module")
def tiny(smollm_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("prequant"), smollm_dir, "llama",
                            intermediate_size=128)  # fmt: skip


def _run(engine):
    result = run_to_end(engine, 1, [spec(i, p, 8, ignore_eos=True) for i, p in enumerate(PROMPTS)])
    return result.tokens, result.logprobs


def _assert_same(got, want):
    assert got[0] == want[0]
    for i in want[1]:
        assert max(abs(a - b) for a, b in zip(got[1][i], want[1][i], strict=True)) < 1e-4


@pytest.mark.parametrize("method, act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_a_prequantized_model_serves_the_tokens_of_its_weights(tiny, tmp_path, method, act_order):
    quantized, twin = _convert(tiny, tmp_path, method, act_order)
    engine = make_engine(quantized)
    layer = engine.runner.model.layers[0].qkv
    assert layer.method == "int4" and (layer.order is not None) == act_order
    _assert_same(_run(engine), _run(make_engine(twin)))
    assert _run(make_engine(quantized, quantize=method))[0] == _run(engine)[0]  # flag agrees
    with pytest.raises(ModelLoadError, match=f"this checkpoint is {method}-quantized"):
        make_engine(quantized, quantize="int8")


def test_gptq_on_an_unquantized_checkpoint_is_refused(tiny):
    with pytest.raises(ModelLoadError, match="has no gptq quantization_config"):
        make_engine(tiny, quantize="gptq")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_prequantized_over_two_shards(tiny, tmp_path, method):
    quantized, twin = _convert(tiny, tmp_path, method)
    expected = _run(make_engine(twin))
    group = ShardGroup(quantized, 2, tmp_path, [])
    try:
        got = group.generate(PROMPTS, 8)
    finally:
        group.stop()
    _assert_same(got, expected)


def test_act_order_split_by_columns_is_refused(tiny, tmp_path):
    """A row-parallel layer's columns cannot be cut from groups that span all inputs."""
    from shard.models.weights import Loader, Param, Split
    from shard.parallel import Parallel

    quantized, _ = _convert(tiny, tmp_path, "gptq", act_order=True)
    store = PrequantizedStore(WeightStore(quantized), {"method": "gptq", "zeros_minus_one": True})
    loader = Loader(store, Parallel(rank=0, world_size=2), 16, torch.float32, torch.device("cpu"))
    name = "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(ModelLoadError, match="act-order .desc_act. GPTQ groups span the inputs"):
        loader.linear(Param.of(name, split=Split.COLS))


def compressed_tensors(codes, scales) -> dict:
    """Signed codes [N, K] in -8..7, scales [N, G] in compressed-tensors' pack-quantized form."""
    n, k = codes.shape
    return {
        "weight_packed": _words((codes + 8).view(n, k // 8, 8)),
        "weight_scale": scales.to(torch.bfloat16),
        "weight_shape": torch.tensor([n, k]),
    }


def test_compressed_tensors_int4_unpacks_to_the_known_weights(tmp_path):
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (32, 128), generator=gen)
    scales = (torch.rand(32, 4, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
    weight = (codes.view(32, 4, 32) * scales[..., None]).view(32, 128)
    settings = {"method": "compressed-tensors", "weights": "int4"}
    store = _store(tmp_path, compressed_tensors(codes, scales), settings)
    assert store.shape("layer.weight") == [32, 128]
    assert torch.equal(store.get("layer.weight"), weight)


@pytest.mark.parametrize("scale_kind", ["tensor", "channel", "block"])
def test_fp8_weights_are_multiplied_out_exactly(tmp_path, scale_kind):
    """float8_e4m3fn values times their scales: per tensor and per channel (compressed-tensors,
    FBGEMM), per 128 x 128 block (`weight_scale_inv`, transformers' fp8)."""
    gen = torch.Generator().manual_seed(4)
    n, k = 200, 256
    fp8 = (torch.randn(n, k, generator=gen) * 40).to(torch.float8_e4m3fn)
    if scale_kind == "block":
        scale = torch.rand(2, 2, generator=gen) + 0.5
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
        tensors = {"weight": fp8, "weight_scale_inv": scale}
    else:
        scale = (
            torch.rand(n, 1, generator=gen) + 0.5 if scale_kind == "channel" else torch.tensor(0.75)
        )
        full = scale
        tensors = {"weight": fp8, "weight_scale": scale, "input_scale": torch.tensor(1.0)}
    store = _store(tmp_path, tensors, {"method": "fp8", "block": [128, 128]})
    assert store.packed("layer.weight") is None
    assert torch.equal(store.get("layer.weight"), fp8.float() * full)
    assert torch.equal(store.get_slice("layer.weight", 0, 10, 20), (fp8.float() * full)[10:20])


def _convert_compressed(model_dir, target, weights: str):
    """The model in compressed-tensors (int4 pack-quantized or fp8 per channel) and its twin."""
    quantized, twin = target / f"ct-{weights}", target / f"ct-{weights}-twin"
    for d in (quantized, twin):
        shutil.copytree(model_dir, d)
    tensors = load_file(str(model_dir / "model.safetensors"))
    packed, plain = {}, {}
    gen = torch.Generator().manual_seed(5)
    for name, w in sorted(tensors.items()):
        if ".layers." not in name or not name.endswith("proj.weight"):
            packed[name] = plain[name] = w
            continue
        n, k = w.shape
        base = name.removesuffix(".weight")
        if weights == "int4":
            codes = torch.randint(-8, 8, (n, k), generator=gen)
            scales = (
                (torch.rand(n, k // 32, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
            )
            plain[name] = (codes.view(n, -1, 32) * scales[..., None]).view(n, k)
            packed.update(
                {f"{base}.{key}": v for key, v in compressed_tensors(codes, scales).items()}
            )
        else:
            fp8 = (w * 100).to(torch.float8_e4m3fn)
            scale = torch.full((n, 1), 0.01)
            plain[name] = fp8.float() * scale
            packed.update({name: fp8, f"{base}.weight_scale": scale})
    save_file(packed, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, str(twin / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    scheme = {
        "type": "int",
        "num_bits": 4,
        "symmetric": True,
        "strategy": "group",
        "group_size": 32,
    }
    if weights == "fp8":
        scheme = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "channel"}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if weights == "int4" else "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme}},
        "ignore": ["lm_head"],
    }
    (quantized / "config.json").write_text(json.dumps(config))
    return quantized, twin


@pytest.mark.parametrize("weights", ["int4", "fp8"])
def test_a_compressed_tensors_model_serves_the_tokens_of_its_weights(tiny, tmp_path, weights):
    quantized, twin = _convert_compressed(tiny, tmp_path, weights)
    engine = make_engine(quantized)
    layer = engine.runner.model.layers[0].qkv
    assert getattr(layer, "method", None) == ("int4" if weights == "int4" else None)
    _assert_same(_run(engine), _run(make_engine(twin)))


def test_an_unserved_compressed_tensors_scheme_is_refused_by_what_it_is(tiny, tmp_path):
    quantized, _ = _convert_compressed(tiny, tmp_path, "int4")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="pack-quantized; weights .*int.*8.*is not served"):
        make_engine(quantized)
