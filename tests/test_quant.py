"""Weight-only quantization on load (--quantize int8 | int4): each layer's product equals
x @ dequantize(w) within float32 rounding; known values survive quantization exactly; a
quantized model serves the tokens of the same model with its weights dequantized (float32),
at 1 and 2 shards; unsupported methods and splits are one clear line."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shard.errors import ModelLoadError
from shard.models.quant import (
    QuantLinear,
    dequantize,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from tests.conftest import build_tiny_model
from tests.helpers import make_engine, run_to_end, spec
from tests.test_families import CASES
from tests.test_tensor_parallel import ShardGroup

# (in, out) of the supported families' layers: SmolLM2's, a Llama-1B's, the tiny models'
SHAPES = [(576, 1536), (1536, 576), (2048, 512), (64, 128)]
PROMPTS = ["The quick brown fox jumps", "Once upon a time there", "1 2 3 4 5 6 7 8"]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


METHODS = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
LAYERS = [(m, g, k, n) for m, g in METHODS for k, n in SHAPES if not g or k % g == 0]


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64, 256])
@pytest.mark.parametrize("method, group, k, n", LAYERS)  # groups tile the inputs
def test_a_layer_multiplies_by_its_dequantized_weights(method, group, k, n, rows):
    gen = torch.Generator().manual_seed(k + n + rows)
    weight = torch.randn(n, k, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    layer = QuantLinear.quantize(weight, None, method, group or 128)
    expected = x.double() @ dequantize(weight, method, group or 128).double().T
    assert _relative_error(layer(x), expected) < 1e-5
    if method == "int4":  # the packed form: half a byte per weight
        assert layer.weight.numel() * layer.weight.element_size() == n * k // 2


@pytest.mark.parametrize("rows", [1, 5, 8, 13, 64])
@pytest.mark.parametrize("group", [16, 32, 64])  # 16: GGUF's Q6_K; 32: Q8_0
@pytest.mark.parametrize("k, n", [(576, 40), (1536, 17)])
def test_a_grouped_int8_layer_multiplies_by_its_dequantized_weights(k, n, group, rows):
    """int8 with a scale per group of inputs (GGUF's blocks), through the few-row products
    (one dot per group, scaled as it is added) and the many-row panel."""
    gen = torch.Generator().manual_seed(k + n + rows + group)
    weight, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
    q, scales = quantize_int8(weight, group)
    layer = QuantLinear("int8", q, (scales,))
    expected = x.double() @ dequantize_int8(q, scales).double().T
    assert _relative_error(layer(x), expected) < 1e-5


@pytest.mark.parametrize("rows", [9, 13, 64])
@pytest.mark.parametrize(
    "method, group, k",
    [("int8", 0, 576), ("int8", 0, 1536), ("int8", 16, 576), ("int8", 32, 2048),
     ("int4", 32, 576), ("int4", 64, 1536), ("int4", 128, 2048)],
)  # fmt: skip
def test_bfloat16_inputs_of_many_rows_give_the_exact_products_rounded_once(method, group, k, rows):
    """bfloat16 inputs of many rows (on CPUs with bf16 dot products: codes and inputs exact
    in bfloat16, products exact, float32 sums, scales per group; per-channel int8 over two
    1024-input chunks; groups of 16 to 128): x @ dequantized w in float64, rounded once to
    bfloat16, within float32 summation."""
    gen = torch.Generator().manual_seed(k + rows + group)
    weight = torch.randn(40, k, generator=gen)
    if method == "int8":
        q, scales = quantize_int8(weight, group or None)
        layer, reference = QuantLinear("int8", q, (scales,)), dequantize_int8(q, scales)
    else:
        packed, scales, mins = quantize_int4(weight, group)
        layer = QuantLinear("int4", packed, (scales, mins))
        reference = dequantize_int4(packed, scales, mins)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = x.double() @ reference.double().T
    slack = 2**-8 * expected.abs() + 1e-5 * (x.double().abs() @ reference.double().abs().T)
    assert ((out.double() - expected).abs() <= slack).all()


def test_the_kernels_take_every_row_count_where_their_avx512_forms_outrun_the_tiles():
    """An AVX-512 build multiplies prefill chunks too (shard/csrc/quant.h: 2x the tiles'
    speed at 128 rows on a Zen 5); an AVX2 build hands more than 64 rows to the tiles."""
    import os

    from shard import cpu_kernels

    layer = QuantLinear.quantize(torch.randn(64, 64), None, "int4", 32)
    assert layer.kernel_rows == layer.kernels.max_rows
    flags = set(cpu_kernels.cpu_flags().split())
    avx512 = {"avx512f", "avx512bw"} <= flags and "-mno-avx512f" not in os.environ.get(
        "PYTGI_CPU_KERNEL_CFLAGS", ""
    )
    assert layer.kernel_rows == (1 << 30 if avx512 else 64)
    x = torch.randn(300, 64)
    expected = x.double() @ dequantize_int4(layer.weight, *layer.qparams).double().T
    assert _relative_error(layer(x), expected) < 1e-5


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("method, group", [("int8", 32), ("int8", 576), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_and_the_tiled_path_agree_in_each_dtype(method, group, rows, dtype):
    """Grouped int8 (GGUF's Q8_0) and int4, through the kernel rows and the dequantized
    tiles, with float32 and bfloat16 inputs; output in the input's dtype."""
    gen = torch.Generator().manual_seed(rows + group)
    weight = torch.randn(1536, 576, generator=gen)
    if method == "int8":
        q, scales = quantize_int8(weight, group)
        layer = QuantLinear("int8", q, (scales,))
        reference = dequantize_int8(q, scales)
    else:
        packed, scales, mins = quantize_int4(weight, group)
        layer = QuantLinear("int4", packed, (scales, mins))
        reference = dequantize_int4(packed, scales, mins)
    assert layer.kernels is not None and layer.group_size == group
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    expected = x.double() @ reference.double().T
    assert _relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_known_values_quantize_exactly():
    q = torch.tensor([[-127, -1, 0, 5, 127, 64]], dtype=torch.int8).repeat(3, 1)
    scales = torch.tensor([0.5, 0.25, 2.0])
    weight = q.float() * scales[:, None]
    got_q, got_scales = quantize_int8(weight)
    assert torch.equal(got_q, q) and torch.equal(got_scales.float(), scales[:, None])
    assert torch.equal(dequantize_int8(got_q, got_scales), weight)
    # int4: in each group of 32, min + s * codes with s, min per group (float16 values)
    codes = torch.arange(64).remainder(16).view(1, 64).repeat(2, 1).to(torch.uint8)
    s = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    low = torch.tensor([[-4.0, 1.0], [0.0, -8.0]])
    weight = (codes.view(2, 2, 32).float() * s[..., None] + low[..., None]).view(2, 64)
    packed, scales, mins = quantize_int4(weight, 32)
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(scales.float(), s) and torch.equal(mins.float(), low)
    assert torch.equal(dequantize_int4(packed, scales, mins), weight)
    # GGML's block layout: byte j of a block holds inputs j (low nibble) and j + 16 (high)
    assert packed[0, 0].item() == 0 | (0 << 4) and packed[0, 1].item() == 1 | (1 << 4)
    shifted = torch.roll(codes, 1, dims=1)
    assert pack_int4(shifted)[0, 0].item() == 15 | (15 << 4)


def _dequantized_copy(model_dir, target, method: str, group: int):
    """The model with each decoder linear weight replaced by what `method` multiplies by,
    and its (untied) LM head by int8's."""
    shutil.copytree(model_dir, target)
    tensors = load_file(str(target / "model.safetensors"))
    assert "lm_head.weight" in tensors  # an untied head: the embedding stays as it is
    for name, w in tensors.items():
        linear = ".layers." in name and name.endswith("proj.weight") or ".experts." in name
        if linear and w.dim() == 2:
            tensors[name] = dequantize(w, method, group).contiguous()
        elif name == "lm_head.weight":
            tensors[name] = dequantize(w, "int8").contiguous()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def models(smollm_dir, tmp_path_factory):
    """A Llama-shaped and a mixture-of-experts tiny model, with MLPs wide enough to group."""
    root = tmp_path_factory.mktemp("quant")
    llama = build_tiny_model(root / "llama", smollm_dir, "llama", intermediate_size=256)
    model_type, overrides = CASES["mixtral"]
    moe = build_tiny_model(root / "moe", smollm_dir, model_type, **{**overrides,
                           "intermediate_size": 64})  # fmt: skip
    return {"llama": llama, "mixtral": moe}


def _run(engine) -> tuple[dict, dict]:
    specs = [spec(i, p, 8, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    result = run_to_end(engine, 1, specs)
    return result.tokens, result.logprobs


def _assert_same(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    """Equal tokens; log-probabilities equal up to the order products are summed in."""
    assert got[0] == want[0]
    for i in want[1]:
        worst = max(abs(a - b) for a, b in zip(got[1][i], want[1][i], strict=True))
        assert worst < 1e-4, worst


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("method, group", [("int8", 128), ("int4", 32), ("int4", 64)])
def test_a_quantized_model_serves_its_dequantized_twin_s_tokens(
    models, family, method, group, tmp_path
):
    twin = _dequantized_copy(models[family], tmp_path / "twin", method, group)
    quantized = make_engine(models[family], quantize=method, quantize_group_size=group)
    assert method in quantized.runner.kernel_report()
    _assert_same(_run(quantized), _run(make_engine(twin)))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_disable_custom_kernels_dequantizes_quantized_layers_per_call(models, method):
    """--disable-custom-kernels: PyTorch's ops only, quantized layers too (the same tokens)."""
    plain = make_engine(models["llama"], quantize=method, disable_custom_kernels=True)
    layers = plain.runner.model.layers
    assert all(x.qkv.kernels is None and x.mlp.down.linear.kernels is None for x in layers)
    assert "dequantized per call" in plain.runner.kernel_report()
    _assert_same(_run(plain), _run(make_engine(models["llama"], quantize=method)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_over_two_shards(models, method, tmp_path):
    """int8 scales cover whole rows on every rank; int4 groups split at their boundaries."""
    twin = _dequantized_copy(models["llama"], tmp_path / "twin", method, 32)
    expected = _run(make_engine(twin))
    args = ["--quantize", method, "--quantize-group-size", "32"]
    group = ShardGroup(models["llama"], 2, tmp_path, args)
    try:
        got = group.generate(PROMPTS, 8)
    finally:
        group.stop()
    _assert_same(got, expected)


def test_a_group_that_does_not_tile_a_shard_s_inputs_is_refused(models):
    with pytest.raises(ModelLoadError, match="not a multiple of the group size 128"):
        make_engine(models["llama"], quantize="int4", quantize_group_size=128)


def test_unsupported_methods_are_refused(smollm_dir):
    from common.config import ShardConfig
    from shard.engine import ShardEngine

    with pytest.raises(ModelLoadError, match="--quantize marlin is not supported yet"):
        ShardEngine(ShardConfig(model_dir=str(smollm_dir), quantize="marlin"))
    with pytest.raises(ModelLoadError, match="this checkpoint has no awq quantization_config"):
        ShardEngine(ShardConfig(model_dir=str(smollm_dir), quantize="awq"))


def _english_text(tokenizer, tokens: int = 2000) -> list[int]:
    """The first `tokens` tokens of CPython's LICENSE.txt (shipped with every CPython: the
    history of the software, then the licenses), as fixed English text."""
    import sys
    from pathlib import Path

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    text = (Path(sys.base_prefix) / "lib" / version / "LICENSE.txt").read_text()
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) >= tokens
    return ids[:tokens]


def _perplexity(engine, ids: list[int]) -> float:
    request = spec(1, "", 1, ignore_eos=True, input_ids=ids, prefill_logprobs=True, chunk_len=256)
    first = run_to_end(engine, 1, [request]).generations[1][0]
    logprobs = first.prefill_tokens.logprobs[1:]  # the first token has no context
    return float(torch.tensor(logprobs).mean().neg().exp())


@pytest.mark.slow
def test_smollm2_perplexity_with_int8_and_int4(smollm_dir):
    """SmolLM2 on 2,000 tokens of English: int8 within 1% of the float32 model's perplexity,
    int4 (groups of 32, the default) within 8%. (The embedded SmolLM2 comes from a Q4_1
    GGUF, whose groups of 32 int4 reproduces: larger groups re-quantize it, measured in the
    quantization issue's note.)"""
    options = dict(kv_bytes=256 << 20, max_total=2100)
    base = make_engine(smollm_dir, **options)
    ids = _english_text(base.tokenizer)
    reference = _perplexity(base, ids)
    int8 = _perplexity(make_engine(smollm_dir, quantize="int8", **options), ids)
    int4 = _perplexity(make_engine(smollm_dir, quantize="int4", **options), ids)
    print(f"perplexity float32 {reference:.3f}, int8 {int8:.3f}, int4 {int4:.3f}")
    assert reference < 30  # the model reads English
    assert abs(int8 / reference - 1) < 0.01
    assert abs(int4 / reference - 1) < 0.08


def _write_gguf(path, tensors: dict, heads: int = 2, kv_heads: int = 1) -> None:
    """A Llama GGUF file holding `tensors`: name -> (uint8 blocks [N, bytes], type)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.attention.head_count", heads)
    writer.add_uint32("llama.attention.head_count_kv", kv_heads)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _blocks(kind: str, d, m, codes) -> torch.Tensor:
    """GGML blocks of 32 inputs [N, K / 32, bytes] from float16 d (and m) [N, K / 32] and codes
    [N, K]: Q8_0 int8 codes; Q4_x codes 0..15, byte j holding inputs j and j + 16."""
    n, k = codes.shape
    head = [d.half().view(torch.uint8).view(n, k // 32, 2)]
    if kind == "Q4_1":
        head.append(m.half().view(torch.uint8).view(n, k // 32, 2))
    if kind == "Q8_0":
        body = codes.to(torch.int8).view(torch.uint8).view(n, k // 32, 32)
    else:
        c = codes.to(torch.uint8).view(n, k // 32, 2, 16)
        body = c[:, :, 0] | (c[:, :, 1] << 4)
    return torch.cat([*head, body], dim=-1).reshape(n, -1)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_packed_from_known_values_unpack_to_them(kind, tmp_path):
    """Blocks the test packs from known codes and float16 scales (and mins) come back as
    exactly those weights, packed for the kernels without requantizing; q and k rows in
    Hugging Face's order (llama.cpp interleaves them per head)."""
    from shard.gguf import GgufStore, unpermute_rows

    n, k = 8, 64  # 2 heads of 4 for q; 1 KV head of 8 rows for k
    gen = torch.Generator().manual_seed(len(kind))
    low, high = (-127, 128) if kind == "Q8_0" else (0, 16)
    codes = torch.randint(low, high, (n, k), generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) + 0.5).half().float()
    m = (torch.randn(n, k // 32, generator=gen)).half().float()
    step = codes.view(n, 2, 32).float() * d[..., None]
    expected = {"Q8_0": step, "Q4_0": (codes.view(n, 2, 32).float() - 8) * d[..., None],
                "Q4_1": step + m[..., None]}[kind].reshape(n, k)  # fmt: skip
    blocks = _blocks(kind, d, m, codes).numpy()
    _write_gguf(tmp_path / "m.gguf", {
        "blk.0.ffn_down.weight": (blocks, kind),
        "blk.0.attn_q.weight": (blocks, kind),
    })  # fmt: skip
    store = GgufStore(tmp_path / "m.gguf")
    down, q = "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    method, packed, params, order = store.packed(down)
    assert order is None
    assert method == ("int8" if kind == "Q8_0" else "int4")
    got = dequantize_int8(packed, *params) if method == "int8" else dequantize_int4(packed, *params)
    assert torch.equal(got, expected) and torch.equal(store.get(down), expected)
    assert torch.equal(store.get(q), expected[unpermute_rows(n, 2)])
    assert unpermute_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    layer = QuantLinear(method, packed, params)
    x = torch.randn(3, k, generator=gen)
    assert _relative_error(layer(x), x.double() @ expected.double().T) < 1e-6


def test_the_embedded_gguf_is_read_as_transformers_converted_it(smollm_dir):
    """Every tensor of the packaged Q4_1 file, read by pytgi (dequantized, and packed then
    dequantized), equals the safetensors transformers converted from it."""
    from shard.embedded import find_gguf, gguf_source
    from shard.gguf import GgufStore
    from shard.loader import WeightStore

    assert gguf_source(smollm_dir) == (find_gguf(), False)
    store, converted = GgufStore(find_gguf()), WeightStore(smollm_dir)
    names = [n for n in converted._file_of if n in store]
    assert len(names) == len(converted._file_of) == 272
    for name in names[:60] + ["model.embed_tokens.weight"]:
        want = converted.get(name)
        assert torch.equal(store.get(name), want), name
        form = store.packed(name)
        if form is not None:
            method, packed, params, _ = form
            unpack = dequantize_int8 if method == "int8" else dequantize_int4
            assert torch.equal(unpack(packed, *params), want), name


def test_the_default_model_serves_its_gguf_blocks_with_int4(smollm_dir):
    """--quantize int4 on the embedded SmolLM2 serves its Q4_1 layers and Q8_0 head as
    stored: the tokens of the float32 model converted from the same file."""
    quantized = make_engine(smollm_dir, quantize="int4")
    layer = quantized.runner.model.layers[0].qkv
    assert layer.method == "int4" and layer.group_size == 32
    assert quantized.runner.model.lm_head.linear.group_size == 32  # Q8_0's blocks
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    specs = [spec(i, p, 12, ignore_eos=True) for i, p in enumerate(prompts)]
    got = run_to_end(quantized, 1, specs)
    specs = [spec(i, p, 12, ignore_eos=True) for i, p in enumerate(prompts)]
    want = run_to_end(make_engine(smollm_dir), 1, specs)
    _assert_same((got.tokens, got.logprobs), (want.tokens, want.logprobs))


@pytest.mark.slow
def test_the_default_model_s_gguf_blocks_over_three_shards(smollm_dir, tmp_path):
    """Each rank cuts its rows, and its columns at group boundaries, from the packed blocks
    (SmolLM2's 9 heads and 3 KV heads split over 1 or 3 shards)."""
    expected = _run(make_engine(smollm_dir, quantize="int4"))
    group = ShardGroup(smollm_dir, 3, tmp_path, ["--quantize", "int4"])
    try:
        got = group.generate(PROMPTS, 8)
    finally:
        group.stop()
    _assert_same(got, expected)


def test_a_gguf_file_as_model_id_serves_its_blocks(tmp_path, monkeypatch, smollm_dir):
    """`--model-id file.gguf`: the launcher has its config and tokenizer read once (in a
    child; no weights copied), and the shard serves the file's own blocks: the tokens of the
    default model with --quantize int4, the same blocks."""
    import os

    from launcher.supervisor import resolve_model
    from shard.embedded import find_gguf

    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path))
    link = tmp_path / "smol.gguf"
    os.symlink(find_gguf(), link)
    model_dir = resolve_model(str(link))
    assert model_dir.parent == tmp_path / "gguf"
    assert not list(model_dir.glob("*.safetensors"))
    assert resolve_model(str(link)) == model_dir  # prepared once
    served = make_engine(model_dir)
    assert served.runner.model.layers[3].qkv.method == "int4"
    want = _run(make_engine(smollm_dir, quantize="int4"))
    _assert_same(_run(served), want)
