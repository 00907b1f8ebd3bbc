"""--kv-cache-dtype fp8_e4m3fn: the encoding (PyTorch, Triton and the C++ kernel agree bit
for bit), every attention backend reading an fp8 cache with per-tensor scales, the engine's
invariants over it, its memory, and the flag from the launcher to the shard."""

from __future__ import annotations

import pytest
import torch

from shard.attention import get_backend
from shard.kv_cache import FP8, FP8_MAX, KVCache, KVScales, readable, to_fp8
from tests.helpers import make_engine, run_to_end, spec
from tests.test_engine_tiny import PROMPTS

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from shard.attention.triton_kernels import fp8_decode, fp8_encode  # noqa: E402
from tests.test_attention_backends import (  # noqa: E402, F401 (fake_flash: a fixture)
    BLOCK,
    _brute_force,
    _mixed_batch,
    _relative_error,
    fake_flash,
)

SCALES = KVScales(0.5, 0.125)  # not 1: the scales must be applied, each to its own pool


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, fp8_encode(x), mask=offs < n)


@triton.jit
def _decode_kernel(b_ptr, out_ptr, n, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(b_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, fp8_decode(b), mask=offs < n)


def _values() -> torch.Tensor:
    """float32 values over e4m3's whole range: random magnitudes, every code's value and the
    midpoints between neighbours (ties round to even), saturation, zeros, subnormals."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    finite = codes[codes.isfinite()].unique()
    midpoints = (finite[1:] + finite[:-1]) / 2
    random = torch.randn(4000, generator=gen) * torch.logspace(-12, 10, 4000, base=2)
    edges = torch.tensor([0.0, -0.0, FP8_MAX, -FP8_MAX, 449.0, 1e6, -1e6, 2**-10, 2**-9, 1e-30])
    return torch.cat([finite, midpoints, -midpoints, random, edges])


def test_triton_encoding_is_pytorchs_bit_for_bit():
    x = _values()
    out = torch.empty(x.shape, dtype=torch.uint8)
    _encode_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK_N=256)
    expected = to_fp8(x, 1.0).view(torch.uint8)
    assert torch.equal(out, expected)
    assert to_fp8(torch.tensor([1e6, -1e6]), 1.0).float().tolist() == [FP8_MAX, -FP8_MAX]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_encoding_is_pytorchs_bit_for_bit(dtype):
    """The C++ store (shard/csrc/cpu_kernels.cpp) over every test value, as K and V rows."""
    from shard import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip("no C++ compiler here: the CPU kernel is not built")
    x = _values().to(dtype)
    x = x[: x.numel() // 64 * 64].view(-1, 1, 64)  # [T, KVH=1, D=64]
    caches = [torch.zeros(x.shape[0] + 1, 1, 1, 64, dtype=FP8) for _ in range(2)]
    slots = torch.arange(1, x.shape[0] + 1)
    slots[3] = -1  # skipped
    cpu_kernels.store_fp8(*caches, x, x * 3, slots, SCALES)
    for cache, values, scale in ((caches[0], x, SCALES.k), (caches[1], x * 3, SCALES.v)):
        expected = to_fp8(values, scale).view(torch.uint8).view(-1, 64)
        stored = cache.view(torch.uint8).view(-1, 64)
        keep = slots >= 0
        assert torch.equal(stored[slots[keep]], expected[keep])
        assert not stored[4].any()  # slot 4 was the skipped row's


def test_cpu_kernel_reads_every_code():
    """A one-key context per code: attention returns that key's value (times v_scale)."""
    from shard import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip("no C++ compiler here: the CPU kernel is not built")
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    values = codes.view(FP8).view(-1, 1, 1, 1).expand(-1, 1, 1, 16).contiguous()
    cache = torch.cat([torch.zeros(1, 1, 1, 16, dtype=FP8), values])  # block i + 1: code i
    tables = torch.arange(1, codes.numel() + 1).unsqueeze(1)
    q = torch.ones(codes.numel(), 1, 16)
    out = cpu_kernels.paged_decode(
        q, cache, cache, tables, torch.ones(codes.numel(), dtype=torch.int64), 1.0,
        scales=SCALES,
    )  # fmt: skip
    assert torch.equal(out[:, 0, 0], codes.view(FP8).float() * SCALES.v)


def test_triton_decoding_of_every_code():
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    out = torch.empty(codes.shape, dtype=torch.float32)
    _decode_kernel[(1,)](codes, out, codes.numel(), BLOCK_N=256)
    expected = codes.view(FP8).float()
    assert torch.equal(out, expected) and torch.equal(out.signbit(), expected.signbit())


def _fp8_run(name: str, block_size: int, dtype: torch.dtype, window=0, softcap=0.0):
    """The mixed batch (decode; plain prefill; prefill after a cached prefix) through backend
    `name` over fp8 caches -> (out, k_cache, v_cache)."""
    inputs, q, k, v, caches = _mixed_batch(block_size)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k_cache, v_cache = to_fp8(caches[0], SCALES.k), to_fp8(caches[1], SCALES.v)
    backend = get_backend(name.removesuffix("-torch"))
    backend.use_cpu_kernel = not name.endswith("-torch")  # the reference's torch decode path
    meta = backend.prepare(inputs)
    backend.store_kv(k_cache, v_cache, k, v, meta, SCALES)
    scale = q.shape[-1] ** -0.5
    limits = {"window": window, "softcap": softcap, "scales": SCALES}
    out = backend.attend(q, k, v, k_cache, v_cache, meta, scale, **limits)
    return out, k_cache, v_cache, (inputs, q)


BACKENDS = ["reference", "reference-torch", "sdpa", "triton", "flash-attn"]


def _as_float(k_cache, v_cache):
    return readable(k_cache, SCALES.k, torch.float32), readable(v_cache, SCALES.v, torch.float32)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (5, 0.0), (40, 0.0), (5, 1.5)])
@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_reads_an_fp8_cache(name, window, softcap, fake_flash):  # noqa: F811
    """Each backend stores the same bytes and attends as float64 attention over the values
    the cache stands for (stored value x scale): new tokens too, as they were stored."""
    out, k_cache, v_cache, (inputs, q) = _fp8_run(name, BLOCK, torch.float32, window, softcap)
    _, ref_k, ref_v, _ = _fp8_run("reference", BLOCK, torch.float32)
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v.view(torch.uint8))
    expected = _brute_force(inputs, q, *_as_float(k_cache, v_cache), window, softcap)
    assert _relative_error(out, expected) < 1e-5


def test_flash_attn_gathers_an_fp8_cache_it_could_page(fake_flash):  # noqa: F811
    """Blocks of 256 tokens: flash-attn 2 would read a bf16 cache in place, not an fp8 one."""
    out, *_ = _fp8_run("flash-attn", 256, torch.float32)
    reference, *_ = _fp8_run("reference", 256, torch.float32)
    assert _relative_error(out, reference.double()) < 1e-5
    assert fake_flash and all(not call["paged"] for call in fake_flash)


@pytest.mark.parametrize("name", ["reference", "reference-torch", "triton"])
def test_bfloat16_queries_over_an_fp8_cache(name):
    out, k_cache, v_cache, (inputs, q) = _fp8_run(name, BLOCK, torch.bfloat16)
    expected = _brute_force(inputs, q.float(), *_as_float(k_cache, v_cache), 0)
    assert out.dtype == torch.bfloat16 and _relative_error(out, expected) < 1e-2


def test_the_scales_are_applied():
    """Scales 1 on a cache written with SCALES read values 2x (K) and 8x (V) too small."""
    inputs, q, k, v, caches = _mixed_batch(BLOCK)
    backend = get_backend("reference")
    k_cache, v_cache = to_fp8(caches[0], 1.0), to_fp8(caches[1], 1.0)
    meta = backend.prepare(inputs)
    backend.store_kv(k_cache, v_cache, k, v, meta)  # as if scales were 1
    right = backend.attend(q, k, v, k_cache, v_cache, meta, 0.25)
    k8, v8 = to_fp8(caches[0], SCALES.k), to_fp8(caches[1], SCALES.v)
    backend.store_kv(k8, v8, k, v, meta, SCALES)
    scaled = backend.attend(q, k, v, k8, v8, meta, 0.25, scales=SCALES)
    assert _relative_error(scaled, right.double()) < 0.1  # the same values, rounded elsewhere
    unscaled = backend.attend(q, k, v, k8, v8, meta, 0.25)
    assert _relative_error(unscaled, right.double()) > 0.5


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_split_decode_over_fp8_equals_the_cpu_kernel(splits):
    """Long contexts cut into splits (each scaled by v_scale before the merge)."""
    from shard import cpu_kernels
    from shard.attention.triton_kernels import paged_decode

    if cpu_kernels.load() is None:
        pytest.skip("no C++ compiler here: the CPU kernel is not built")
    gen = torch.Generator().manual_seed(3)
    k_cache = to_fp8(torch.randn(40, BLOCK, 3, 64, generator=gen) * 4, SCALES.k)
    v_cache = to_fp8(torch.randn(40, BLOCK, 3, 64, generator=gen), SCALES.v)
    tables = torch.stack([torch.randperm(39, generator=gen)[:36] + 1 for _ in range(2)])
    context = torch.tensor([570, 301])
    q = torch.randn(2, 9, 64, generator=gen)
    args = (q, k_cache, v_cache, tables, context, 0.125)
    expected = cpu_kernels.paged_decode(*args, scales=SCALES)
    out = paged_decode(*args[:3], tables.to(torch.int32), context.to(torch.int32), 0.125,
                       splits=splits, scales=SCALES)  # fmt: skip
    assert _relative_error(out, expected.double()) < 1e-5


@pytest.fixture(scope="module")
def fp8_engine(tiny_model_dir):
    return make_engine(tiny_model_dir, kv_cache_dtype="fp8_e4m3fn")


def test_engine_invariants_hold_over_an_fp8_cache(fp8_engine):
    """Batched = alone; a prompt in chunks = whole; a cached prefix = recomputed: every key
    is read as the cache holds it, wherever it came from."""
    engine = fp8_engine
    alone = [run_to_end(engine, 99, [spec(1, p, 6, ignore_eos=True)]).tokens[1] for p in PROMPTS]
    together = run_to_end(
        engine, 1, [spec(i, p, 6, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    )
    assert [together.tokens[i] for i in range(len(PROMPTS))] == alone
    text = PROMPTS[3]
    n_prompt = len(engine.tokenizer.encode(text, add_special_tokens=False).ids)
    chunked = run_to_end(
        engine, 2, [spec(1, text, 6, ignore_eos=True, chunk_len=n_prompt // 3 + 1)]
    )
    assert chunked.tokens[1] == alone[3]
    bs = engine.block_size
    blocks = list(range(1, 8))
    run_to_end(engine, 3, [spec(1, text, 1, blocks=blocks)])  # writes the prefix
    cached = n_prompt // bs
    reuse = blocks[:cached] + list(range(20, 26))
    hit = run_to_end(
        engine, 4, [spec(2, text, 6, ignore_eos=True, blocks=reuse, cache_len=cached * bs)]
    )
    assert hit.tokens[2] == alone[3]
    assert engine.blocks_all_back()


def test_fp8_cache_tokens_follow_the_full_precision_ones(fp8_engine, tiny_model_dir):
    """The first token of each prompt over fp8 K/V against float32 K/V: one of float32's top
    3 (the tiny random model's log-probs are near ties), its log-probability within 0.01 of
    what float32 gives the same token."""
    plain = make_engine(tiny_model_dir)

    def first(engine, batch):
        specs = [spec(i, p, 1, ignore_eos=True, top_n_tokens=3) for i, p in enumerate(PROMPTS)]
        done = run_to_end(engine, batch, specs)
        return {i: done.generations[i][0] for i in range(len(PROMPTS))}

    expected, got = first(plain, 1), first(fp8_engine, 5)
    for i in range(len(PROMPTS)):
        top = dict(
            zip(expected[i].top_tokens[0].ids, expected[i].top_tokens[0].logprobs, strict=True)
        )
        token = got[i].top_tokens[0].ids[0]
        assert token in top
        assert abs(got[i].top_tokens[0].logprobs[0] - top[token]) < 0.01


def test_an_fp8_pool_holds_four_times_the_float32_blocks(fp8_engine, tiny_model_dir):
    plain = make_engine(tiny_model_dir)
    assert fp8_engine.runner.kv.keys[0].dtype == FP8
    assert fp8_engine.runner.kv.num_blocks == 4 * plain.runner.kv.num_blocks
    assert fp8_engine.runner.kv.nbytes == plain.runner.kv.nbytes
    assert KVCache.bytes_per_block(2, 16, 2, 64, FP8) * 2 == KVCache.bytes_per_block(
        2, 16, 2, 64, torch.bfloat16
    )
    assert "KV cache fp8_e4m3fn" in fp8_engine.runner.kernel_report()


def test_warmup_calibrates_the_scales(fp8_engine):
    """After Warmup each layer's scales put the calibration text's largest K and V value at
    448 / MARGIN in the pool (the fp8 forward's values differ from the float one's slightly)."""
    from shard.kv_calibration import CALIBRATION_TEXT, MARGIN

    engine = fp8_engine
    scales = engine.runner.kv.scales
    assert all(s.k != 1.0 and s.v != 1.0 and s.k > 0 and s.v > 0 for s in scales)
    ids = engine.tokenizer.encode(CALIBRATION_TEXT).ids
    blocks = list(range(1, 2 + len(ids) // engine.block_size))
    run_to_end(engine, 7, [spec(1, "", 1, input_ids=ids, blocks=blocks)])
    for pool in engine.runner.kv.keys + engine.runner.kv.values:
        top = pool[1 : blocks[-1] + 1].float().abs().max().item()
        assert 0.8 * FP8_MAX / MARGIN < top < 1.25 * FP8_MAX / MARGIN


@pytest.mark.slow
def test_smollm2_perplexity_with_an_fp8_cache(smollm_dir):
    """SmolLM2 over 2,000 tokens of English (prompt chunks of 256 read the earlier ones
    from the cache): fp8 K/V within 3% of float32 K/V's perplexity, averaged over the
    calibrated scales and those scales 0.1% up and down. One perplexity is a draw: where
    fp8's grid falls moves it by about a percent (on a Zen 5 EPYC: 8.190 at the calibrated
    scales, 8.102 and 8.137 at 1.001x and 0.999x), and a machine's float32 products (oneDNN's
    kernels differ by CPU) move the calibrated scales by that much."""
    from tests.test_quant import _english_text, _perplexity

    options = dict(kv_bytes=256 << 20, max_total=2100)
    base = make_engine(smollm_dir, **options)
    ids = _english_text(base.tokenizer)
    reference = _perplexity(base, ids)
    engine = make_engine(smollm_dir, kv_cache_dtype="fp8_e4m3fn", **options)
    calibrated = list(engine.runner.kv.scales)
    draws = []
    for factor in (1.0, 1.001, 0.999):
        engine.runner.kv.scales[:] = [
            s._replace(k=s.k * factor, v=s.v * factor) for s in calibrated
        ]
        draws.append(_perplexity(engine, ids))
    fp8 = sum(draws) / len(draws)
    print(f"perplexity float32 K/V {reference:.3f}, fp8 K/V {fp8:.3f} (draws {draws})")
    assert abs(fp8 / reference - 1) < 0.03


@pytest.mark.parametrize("form", ["k_scale and v_scale", "kv_scale"])
def test_a_checkpoint_s_kv_scales_are_used(tiny_model_dir, tmp_path, form):
    """llm-compressor's `self_attn.k_scale` / `v_scale` (or one `kv_scale`) per layer, as TGI
    reads them: no calibration then."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "scaled"
    shutil.copytree(tiny_model_dir, model)
    tensors = load_file(str(model / "model.safetensors"))
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    for i in range(layers):
        prefix = f"model.layers.{i}.self_attn"
        if form == "kv_scale":
            tensors[f"{prefix}.kv_scale"] = torch.tensor(0.02 * (i + 1))
        else:
            tensors[f"{prefix}.k_scale"] = torch.tensor(0.03 * (i + 1))
            tensors[f"{prefix}.v_scale"] = torch.tensor(0.01 * (i + 1))
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    engine = make_engine(model, kv_cache_dtype="fp8_e4m3fn")
    got = [(round(s.k, 6), round(s.v, 6)) for s in engine.runner.kv.scales]
    if form == "kv_scale":
        assert got == [(round(0.02 * (i + 1), 6),) * 2 for i in range(layers)]
    else:
        assert got == [(round(0.03 * (i + 1), 6), round(0.01 * (i + 1), 6)) for i in range(layers)]
    done = run_to_end(engine, 1, [spec(1, PROMPTS[0], 4, ignore_eos=True)])
    assert len(done.tokens[1]) == 4
