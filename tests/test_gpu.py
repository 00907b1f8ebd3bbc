"""GPU checks (marker `gpu`), run by benchmarks/gpu_check.sh with PYTGI_TEST_DEVICE=cuda and
PYTGI_GPU_MODEL_DIR set to a random-weight model of SmolLM2-135M's shape (bfloat16).

Greedy decoding on random weights meets near-ties between the top two tokens, where bf16
rounding order may pick either; so each backend is checked teacher-forced against
transformers: at every generated position our token is transformers' argmax or within
2e-2 of it, and our log-probability is within 2e-2 of transformers'; both "within 2e-2"
widen to three of transformers' own bf16 rounding steps at the size of the top logit or of
our token's (a negative logit may be the larger), since its logits can say no more. On the
H200, 2026-11-28, logits in [4, 8) round to steps of 2^-5 and in [2, 4) of 2^-6: a token one
step under the argmax failed a bare 2e-2, and log-probabilities two steps apart (plus 2e-5
from the float32 log-sum-exp) failed a two-step rule.
"""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import pytest
import torch

from common.config import ShardConfig
from shard.engine import ShardEngine
from tests.helpers import run_to_end, spec

pytestmark = pytest.mark.gpu
TOLERANCE = 2e-2
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello",
    "In a hole in the ground there lived a hobbit, not a nasty dirty wet hole.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Once upon a time, in a kingdom by the sea,",
    "def fibonacci(n):",
    "Paris is the capital of",
    "Translate to French: good morning, my friend.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    path = os.environ.get("PYTGI_GPU_MODEL_DIR")
    assert path, "set PYTGI_GPU_MODEL_DIR (benchmarks/gpu_check.sh builds the model)"
    assert torch.cuda.is_available(), "these tests need a CUDA device"
    return Path(path)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    return model.to("cuda").eval()


def _engine(model_dir, **options) -> ShardEngine:
    config = ShardConfig(
        model_dir=str(model_dir), device="cuda", cuda_memory_fraction=0.05, **options
    )
    engine = ShardEngine(config)
    engine.warmup([], None, 1024, 1024)
    return engine


def _release(engine: ShardEngine) -> None:
    engine.runner.free_kv()
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def _generate(engine: ShardEngine, new_tokens: int = 16):
    specs = [spec(i, p, new_tokens, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    collected = run_to_end(engine, 1, specs)
    return collected.tokens, collected.logprobs


def rounding_step(value: float, dtype: torch.dtype = torch.bfloat16) -> float:
    """The distance between neighbouring `dtype` numbers at |value| (one ulp)."""
    if value == 0:
        return torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(value)))


@torch.inference_mode()
def _check_against_transformers(engine: ShardEngine, hf_model, tokens, logprobs) -> None:
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False).ids
        ids = torch.tensor([prompt_ids + tokens[i]], device="cuda")
        logits = hf_model(ids).logits[0]  # [T, V] in the model's dtype
        hf = logits.float().log_softmax(-1)
        first = len(prompt_ids) - 1
        steps = hf[first : first + len(tokens[i])]
        for step, (token, ours) in enumerate(zip(tokens[i], logprobs[i], strict=True)):
            theirs = steps[step, token].item()
            gap = steps[step].max().item() - theirs
            largest = max(logits[first + step].max().item(), -logits[first + step, token].item())
            allowed = max(TOLERANCE, 3 * rounding_step(largest))
            assert gap <= allowed, f"prompt {i} step {step}: not transformers' argmax ({gap})"
            assert abs(ours - theirs) <= allowed, f"prompt {i} step {step}: {ours} vs {theirs}"


@pytest.mark.parametrize("attention", ["sdpa", "triton", "flash-attn"])
def test_backend_matches_transformers(model_dir, hf_model, attention):
    if attention == "flash-attn":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed on this machine")
    engine = _engine(model_dir, attention=attention)
    assert engine.info().attention_impl == attention
    tokens, logprobs = _generate(engine)
    _check_against_transformers(engine, hf_model, tokens, logprobs)
    _release(engine)


def test_cuda_graphs_match_eager(model_dir, hf_model):
    engine = _engine(model_dir, attention="triton", cuda_graphs=(1, 2, 4, 8, 16))
    assert engine.runner.graphs is not None and engine.info().cuda_graph_batch_sizes == (
        1,
        2,
        4,
        8,
        16,
    )
    replays = []
    run = engine.runner.graphs.run
    engine.runner.graphs.run = lambda inputs: (
        replays.append(inputs.input_ids.shape[0]) or run(inputs)
    )
    tokens, logprobs = _generate(engine)
    assert replays and max(replays) == len(PROMPTS)  # decode steps went through the graphs
    _check_against_transformers(engine, hf_model, tokens, logprobs)
    single = run_to_end(engine, 2, [spec(0, PROMPTS[0], 16, ignore_eos=True)])
    _check_against_transformers(engine, hf_model, {0: single.tokens[0]}, {0: single.logprobs[0]})
    _release(engine)


def test_info_reports_gpu_memory_and_kv(model_dir):
    engine = _engine(model_dir, attention="triton", cuda_graphs=(1, 2))
    info = engine.info()
    assert info.device_type == "cuda" and info.device_name != "cpu"
    assert info.device_memory_total > info.device_memory_used > info.kv_cache_bytes > 0
    assert info.kv_cache_blocks == engine.runner.kv.num_blocks
    _release(engine)


@pytest.mark.parametrize("splits", [None, 1])  # None: 9 or 16 splits of the 4160-key tables
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 64), (32, 8, 128)])
def test_triton_kernels_on_cuda(dtype, heads, kv_heads, head_dim, splits):
    from shard.attention.triton_kernels import paged_decode
    from tests.test_attention_backends import _reference_decode, _relative_error

    gen = torch.Generator().manual_seed(heads + head_dim)
    blocks, bs = 600, 16
    k_cache = torch.randn(blocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
    context = torch.tensor([1, 17, 300, 4000], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks - 1, generator=gen)[:260] + 1 for _ in context])
    q = torch.randn(len(context), heads, head_dim, generator=gen).to(dtype)
    cuda = [t.cuda() for t in (q, k_cache, v_cache, tables.to(torch.int32), context)]
    out = paged_decode(*cuda, head_dim**-0.5, splits=splits).cpu()
    ref = _reference_decode(q, k_cache, v_cache, tables, context)
    assert _relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 64), (32, 8, 128)])
def test_triton_prefill_on_cuda(dtype, heads, kv_heads, head_dim):
    """The paged prefill kernel compiled: long prompts, a long cached prefix, short chunks."""
    from tests.test_attention_backends import check_paged_prefill

    shapes = [(0, 300), (3000, 100), (17, 2), (1000, 33)]  # (cached, new) per request
    check_paged_prefill(shapes, heads, kv_heads, head_dim, dtype, 1e-2, device="cuda")


def test_seeded_sampling_on_cuda(model_dir):
    """Per-request CUDA generators: a seed repeats its tokens, another seed differs.
    (Alone vs in a batch is not compared: GPU matmuls round differently per batch size.)"""
    from shard.sampling import SamplingParams

    engine = _engine(model_dir, attention="triton", cuda_graphs=(1, 2, 4))

    def sample(seed: int, batch_id: int) -> list[int]:
        sampling = SamplingParams(do_sample=True, temperature=1.0, seed=seed)
        request = spec(0, PROMPTS[0], 24, sampling=sampling, ignore_eos=True)
        return run_to_end(engine, batch_id, [request]).tokens[0]

    first = sample(42, 1)
    assert sample(42, 2) == first and sample(7, 3) != first
    _release(engine)


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_layer_kernels_on_cuda(method, rows):
    """shard/models/quant_triton.py compiled: Llama-1B's MLP shapes, bfloat16 inputs."""
    from shard.models import quant, quant_triton

    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(8192, 2048, generator=gen)
    x = torch.randn(rows, 2048, generator=gen).bfloat16()
    if method == "int8":
        q, scales = quant.quantize_int8(weight)
        w = quant.dequantize_int8(q, scales)
        out = quant_triton.q8_linear(x.cuda(), q.cuda(), scales.cuda())
    else:
        packed, scales, mins = quant.quantize_int4(weight, 32)
        w = quant.dequantize_int4(packed, scales, mins)
        out = quant_triton.q4_linear(x.cuda(), packed.cuda(), scales.cuda(), mins.cuda())
    expected = x.double() @ w.bfloat16().double().T
    assert ((out.cpu().double() - expected).norm() / expected.norm()).item() < 1e-2


def _near_transformers(engine: ShardEngine, hf_model, tolerance: float) -> None:
    """A lossy format (fp8, int4): the first 4 generated tokens of each prompt, teacher-
    forced, within `tolerance` of transformers' argmax and of its log-probability."""
    tokens, logprobs = _generate(engine, 4)
    with torch.inference_mode():
        for i, prompt in enumerate(PROMPTS):
            prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False).ids
            ids = torch.tensor([prompt_ids + tokens[i]], device="cuda")
            hf = hf_model(ids).logits[0].float().log_softmax(-1)[len(prompt_ids) - 1 :]
            for step, (token, ours) in enumerate(zip(tokens[i], logprobs[i], strict=True)):
                assert hf[step].max().item() - hf[step, token].item() <= tolerance, (i, step)
                assert abs(ours - hf[step, token].item()) <= tolerance, (i, step)


@pytest.mark.parametrize(
    "options",
    [{"kv_cache_dtype": "fp8_e4m3fn"}, {"quantize": "fp8"}, {"quantize": "int8"},
     {"quantize": "int4"}],
    ids=["fp8-kv", "fp8-weights", "int8", "int4"],
)  # fmt: skip
def test_lossy_formats_on_cuda(model_dir, hf_model, options):
    """Each format served with Triton attention and CUDA graphs; fp8 weights only where the
    GPU multiplies fp8 (elsewhere refused by name)."""
    from shard.errors import ModelLoadError
    from shard.models.fp8 import fp8_products

    if options.get("quantize") == "fp8" and not fp8_products(torch.device("cuda")):
        with pytest.raises(ModelLoadError, match="needs a GPU with fp8 products"):
            _engine(model_dir, **options)
        return
    engine = _engine(model_dir, attention="triton", cuda_graphs=(1, 2, 4, 8), **options)
    _near_transformers(engine, hf_model, 0.25 if options.get("quantize") == "int4" else 0.1)
    _release(engine)
