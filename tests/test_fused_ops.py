"""The fused layer kernels (shard/models/fused.py) against the torch forms (TorchOps): each
op on random inputs in float32/float16/bfloat16, and a whole model's hidden states with one
set of ops against the other. On CPU the kernels run under TRITON_INTERPRET=1; under
PYTGI_TEST_DEVICE=cuda (gpu_check.sh) they run compiled on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

from shard.models.ops import TorchOps, ops_for
from shard.models.rope import Rotary

pytest.importorskip("triton")
from shard.models.fused import TritonOps  # noqa: E402

DEVICE = os.environ.get("PYTGI_TEST_DEVICE", "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The two forms round at the same points; what is left is the norm's reduction order.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Triton's interpreter (triton 3.x) truncates float32 -> bfloat16 where compiled code
# rounds to nearest even, so bit-equality with torch is only asked of the other cases.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _randn(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert error < TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [64, 576, 1000])  # 1000: not a power of two (masked tail)
def test_norm_and_add_norm_match_torch(dtype, size):
    hidden = _randn(5, size, dtype=dtype, seed=size, scale=3.0)
    delta = _randn(5, size, dtype=dtype, seed=size + 1)
    weight = _randn(size, dtype=dtype, seed=size + 2)
    torch_ops, fused = TorchOps(), TritonOps()
    _close(fused.norm(hidden, weight, 1e-5), torch_ops.norm(hidden, weight, 1e-5), dtype)
    total, normed = fused.add_norm(hidden, delta, weight, 1e-6)
    ref_total, ref_normed = torch_ops.add_norm(hidden, delta, weight, 1e-6)
    if dtype != torch.bfloat16 or not INTERPRETED:
        assert torch.equal(total, ref_total)  # one rounding of the same float32 sum
    _close(total, ref_total, dtype)
    _close(normed, ref_normed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 80])  # 80: a half of 40, masked
def test_rotary_matches_torch_in_place_on_strided_rows(dtype, head_dim):
    tokens, heads, kv_heads = 6, 4, 2
    rotary = Rotary(head_dim, 512, 10000.0, None, dtype, torch.device(DEVICE))
    positions = torch.tensor([0, 1, 7, 100, 511, 3], device=DEVICE)
    # q and k heads as the model has them: a slice of the packed QKV rows (strided rows)
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=head_dim)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    ref = TorchOps().rotate(qk.clone(), TorchOps().rotary_state(positions, rotary))
    fused = TritonOps()
    out = fused.rotate(qk, fused.rotary_state(positions, rotary))
    assert out.data_ptr() == qk.data_ptr()  # in place
    if dtype != torch.bfloat16 or not INTERPRETED:
        assert torch.equal(out, ref)  # the same products, each rounded as torch rounds it
    _close(out, ref, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [128, 1536, 1100])  # 1100: a partial last block
def test_silu_mul_matches_torch(dtype, inter):
    gate_up = _randn(3, 2 * inter, dtype=dtype, seed=inter, scale=4.0)
    _close(TritonOps().silu_mul(gate_up), TorchOps().silu_mul(gate_up), dtype)


def test_empty_batches_launch_nothing():
    fused = TritonOps()
    empty = torch.empty(0, 64, device=DEVICE)
    assert fused.norm(empty, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert fused.silu_mul(torch.empty(0, 256, device=DEVICE)).shape == (0, 128)


def test_ops_for_picks_fused_on_cuda_only():
    assert not isinstance(ops_for(torch.device("cpu")), TritonOps)
    if DEVICE == "cuda":
        assert isinstance(ops_for(torch.device("cuda")), TritonOps)


@pytest.fixture
def model_dir(request):
    """The tiny random model on CPU; on CUDA the random SmolLM2-135M gpu_check.sh builds
    (that machine has no packaged GGUF to build the tiny one's tokenizer from)."""
    if DEVICE == "cuda":
        return os.environ["PYTGI_GPU_MODEL_DIR"]
    return request.getfixturevalue("tiny_model_dir")


# bfloat16 on CPU only: on the GPU's 30-layer random model a near-tie may flip a greedy token
# (test_gpu.py checks bfloat16 there, teacher-forced against transformers).
@pytest.mark.parametrize("dtype", ["float32"] + (["bfloat16"] if DEVICE == "cpu" else []))
def test_model_tokens_match_with_either_ops(model_dir, dtype):
    """Whole forwards (prefill of two prompts, then decode steps) through the engine, once
    with each set of ops: the same greedy tokens, log-probabilities within rounding."""
    from tests.helpers import make_engine, run_to_end, spec

    results = []
    for ops in (TorchOps(), TritonOps()):
        engine = make_engine(model_dir, device=DEVICE, dtype=dtype, attention="reference")
        engine.runner.model.ops = ops
        specs = [spec(0, "The quick brown fox", 6, ignore_eos=True),
                 spec(1, "Hello there, how are", 6, ignore_eos=True)]  # fmt: skip
        results.append(run_to_end(engine, 1, specs))
    torch_run, fused_run = results
    assert fused_run.tokens == torch_run.tokens
    for request, logprobs in torch_run.logprobs.items():
        gaps = [abs(a - b) for a, b in zip(logprobs, fused_run.logprobs[request], strict=True)]
        assert max(gaps) < (1e-4 if dtype == "float32" else 5e-2), gaps
