"""The compiled CPU decode kernels against PyTorch: paged decode attention (blocks read in
place) and the single-row linear, then the engine's tokens with and without them."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from shard import cpu_kernels
from shard.attention.reference import gather_blocks
from shard.models.linear import Linear
from tests.helpers import make_engine, run_to_end, spec


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    assert module is not None, "the CPU kernels must build here (make install builds them)"
    return module


def _gathered_sdpa(q, k_cache, v_cache, tables, context, scale, window=0, softcap=0.0):
    rows, heads, dim = q.shape
    kv_heads, bs = k_cache.shape[2], k_cache.shape[1]
    width = -(-int(context.max()) // bs)
    keys = gather_blocks(k_cache, tables[:, :width].flatten(), rows).transpose(1, 2).float()
    values = gather_blocks(v_cache, tables[:, :width].flatten(), rows).transpose(1, 2).float()
    positions = torch.arange(width * bs)
    mask = positions < context.unsqueeze(1)
    if window:
        mask &= positions >= (context - window).unsqueeze(1)
    mask = mask[:, None, None, :]
    grouped = q.float().view(rows, kv_heads, heads // kv_heads, dim)
    if softcap:
        scores = torch.tanh(grouped @ keys.transpose(-1, -2) * scale / softcap) * softcap
        out = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ values
    else:
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(rows, heads, dim)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (1, 0.0), (17, 0.0), (64, 0.0), (17, 1.5)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize(
    "heads,kv_heads,dim",
    [(9, 3, 64), (4, 4, 32), (8, 1, 16), (16, 4, 128), (12, 1, 80), (6, 2, 24), (14, 2, 64)],
)
def test_paged_decode(kernels, dtype, tolerance, rows, heads, kv_heads, dim, window, softcap):
    """Windows (0: none) and soft-capped scores as well. The shapes take every form of the
    kernel: values summed in registers for groups of 1-8 query heads (in one pass over the
    keys, or several when dim is wide), a key at a time past 8 (12 per KV head here),
    bfloat16 keys by bf16 dot products (dim a multiple of 32) or widened (80), and dims that
    are no multiple of the vector width (24 with AVX-512)."""
    gen = torch.Generator().manual_seed(rows * 31 + heads)
    blocks, bs = 64, 16
    k_cache = torch.randn(blocks, bs, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, bs, kv_heads, dim, generator=gen).to(dtype)
    tables = torch.stack([torch.randperm(blocks - 1, generator=gen)[:10] + 1 for _ in range(rows)])
    context = torch.tensor([1, 16, 17, 100, 160, 33, 2, 64, 150][:rows])
    q_full = torch.randn(rows, heads + 2 * kv_heads, dim, generator=gen).to(dtype)
    q = q_full[:, :heads]  # strided rows, as the model's q is (a slice of packed QKV)
    scale = dim**-0.5
    out = cpu_kernels.paged_decode(q, k_cache, v_cache, tables, context, scale, window, softcap)
    ref = _gathered_sdpa(q, k_cache, v_cache, tables, context, scale, window, softcap)
    assert out.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < tolerance


def _long_contexts(dtype, contexts, seed):
    """SmolLM2's heads (9 over 3 KV heads of 64) over caches of 3200 slots, a table of 130
    shuffled blocks a request (2080 positions), one query row per context."""
    gen = torch.Generator().manual_seed(seed)
    blocks, bs, rows = 200, 16, len(contexts)
    k_cache = torch.randn(blocks, bs, 3, 64, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, bs, 3, 64, generator=gen).to(dtype)
    tables = torch.stack([torch.randperm(blocks - 1, generator=gen)[:130] + 1 for _ in range(rows)])
    q = torch.randn(rows, 9, 64, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(contexts)


@pytest.mark.parametrize("window", [0, 600])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [False, True])
def test_paged_decode_of_contexts_longer_than_a_chunk(kernels, dtype, tolerance, window, batch):
    """The vector forms attend 512 keys a task and merge the tasks' softmax sums per head:
    contexts at, around and several chunks past a boundary, alone (heads split by KV group)
    and together (a task takes every head), with a window that starts inside a chunk. Each
    request is checked on its own."""
    contexts = [1, 511, 512, 513, 1024, 1500, 2080]
    q, k_cache, v_cache, tables, context = _long_contexts(dtype, contexts, 11)
    scale = 0.125
    ref = _gathered_sdpa(q, k_cache, v_cache, tables, context, scale, window)
    for rows in [range(len(contexts))] if batch else [[r] for r in range(len(contexts))]:
        rows = list(rows)
        out = cpu_kernels.paged_decode(
            q[rows], k_cache, v_cache, tables[rows], context[rows], scale, window
        )
        for i, r in enumerate(rows):
            assert _relative(out[i], ref[r]) < tolerance, (contexts[r], batch)


@pytest.mark.parametrize("contexts", [[5, 0], [2081], [-3]])
def test_a_context_outside_its_block_table_is_an_error_not_a_read(kernels, contexts):
    """A context of no keys, or of more positions than its table holds, would read past the
    caches (or nothing to soften); the kernel names the row instead."""
    q, k_cache, v_cache, tables, context = _long_contexts(torch.float32, contexts, 13)
    with pytest.raises(RuntimeError, match=r"context length -?\d+ of row \d+ outside 1\.\.2080"):
        cpu_kernels.paged_decode(q, k_cache, v_cache, tables, context, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_requests_attention_is_bitwise_the_same_alone_and_in_any_batch(kernels, dtype):
    """How the work is shared (KV groups split across tasks for 1-3 requests, every head in
    one task for more, chunks taken by whichever thread is free) never changes a request's
    output: batches decode each request as it decodes alone."""
    contexts = [1300, 40, 700, 1, 513, 1024, 90, 2080]
    q, k_cache, v_cache, tables, context = _long_contexts(dtype, contexts, 12)
    alone = [
        cpu_kernels.paged_decode(q[[r]], k_cache, v_cache, tables[[r]], context[[r]], 0.125)
        for r in range(len(contexts))
    ]
    for size in (2, 3, 8):
        rows = list(range(size))
        out = cpu_kernels.paged_decode(
            q[rows], k_cache, v_cache, tables[rows], context[rows], 0.125
        )
        for r in rows:
            assert torch.equal(out[r], alone[r][0]), (size, contexts[r])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
# Weight rows go 4 at a time, `inner` in steps of two vectors, then one, then one value at a
# time: shapes that leave each of those remainders (8 or 16 lanes), and a lone last row.
@pytest.mark.parametrize(
    "rows,inner,outer", [(1, 576, 960), (1, 100, 37), (2, 64, 48), (3, 72, 9), (1, 40, 6)]
)
def test_linear_small(kernels, dtype, tolerance, rows, inner, outer):
    gen = torch.Generator().manual_seed(inner)
    x = torch.randn(rows, inner, generator=gen).to(dtype)
    w = torch.randn(outer, inner, generator=gen).to(dtype)
    out = kernels.linear_small(x, w)
    ref = x.double() @ w.double().T
    assert ((out.double() - ref).norm() / ref.norm()).item() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_single_row_path_matches_packed(kernels, dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype)
    fast, packed = Linear(w, bias, gemv=True), Linear(w, bias, gemv=False)
    bf16_panels = dtype == torch.bfloat16 and fast.panels is not None  # single rows as fast
    assert (fast.plain is not None) != bf16_panels and packed.plain is None
    x = torch.randn(1, 1, 64, generator=gen).to(dtype)
    assert torch.allclose(fast(x).float(), packed(x).float(), rtol=2e-2, atol=2e-2)
    several = torch.randn(5, 64, generator=gen).to(dtype)
    if fast.widen:  # bfloat16 without bf16 instructions: float32 products in our kernel
        assert torch.allclose(fast(several).float(), packed(several).float(), rtol=1e-2, atol=2e-2)
    else:
        assert torch.equal(fast(several), packed(several))  # more rows: oneDNN either way


@pytest.mark.parametrize(
    "rows,inner,outer", [(2, 13, 7), (5, 64, 96), (9, 576, 960), (64, 40, 31), (7, 1100, 17)]
)
def test_bf16_linear_is_the_float32_product_of_the_widened_weights(kernels, rows, inner, outer):
    """Float32 inputs: the product of the bfloat16 weights (exact in float32) within float32
    rounding; bfloat16 inputs: that, rounded once to bfloat16. Shapes cover the register
    tiles' remainders (rows % 4, outputs % 3) and inputs not a multiple of 8."""
    gen = torch.Generator().manual_seed(rows * inner)
    w = torch.randn(outer, inner, generator=gen).bfloat16()
    x = torch.randn(rows, inner, generator=gen)
    ref = x.double() @ w.double().T
    out = kernels.bf16_linear(x, w)
    assert out.dtype == torch.float32
    bound = 1e-6 * (x.double().abs() @ w.double().abs().T)
    assert bool(((out.double() - ref).abs() <= bound).all())
    half = kernels.bf16_linear(x.bfloat16(), w)
    exact = x.bfloat16().double() @ w.double().T
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.double(), exact, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("rows", [2, 5, 64, 65, 130])
def test_bf16_layer_without_bf16_instructions_widens_its_weights(kernels, monkeypatch, rows):
    """Several rows of a bfloat16 layer on a CPU without bf16 instructions: float32 products
    (the kernel up to 64 rows, float32 tiles of the weight past; here tiles of 20 output rows
    and a partial last one), bias added after, as the single-row path adds it."""
    import shard.models.linear as linear

    monkeypatch.setattr(cpu_kernels, "has_bf16_instructions", lambda: False)
    monkeypatch.setattr(linear, "_TILE", 20 * 48)
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(70, 48, generator=gen).bfloat16()
    bias = torch.randn(70, generator=gen).bfloat16()
    layer = Linear(w, bias, pack=False, gemv=True)
    assert layer.widen
    x = torch.randn(rows, 48, generator=gen).bfloat16()
    ref = (x.double() @ w.double().T).bfloat16() + bias
    linear._tiles.__dict__.clear()  # the tile buffer made afresh, under inference mode
    with torch.inference_mode():  # as the shard runs; then outside it, as tools may
        inside = layer(x.view(1, rows, 48))
    out = layer(x.view(1, rows, 48))
    assert out.shape == (1, rows, 70) and out.dtype == torch.bfloat16
    assert torch.equal(inside, out)
    assert torch.allclose(out[0].double(), ref.double(), rtol=2**-7, atol=1e-6)
    monkeypatch.setattr(cpu_kernels, "has_bf16_instructions", lambda: True)
    assert not Linear(w, bias, pack=False, gemv=True).widen  # native bf16: torch's path
    assert not Linear(w.float(), bias, pack=False, gemv=True).widen


PROMPTS = ["The quick brown fox", "Hello", "In a hole in the ground there lived a hobbit."]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [64, 576, 1000, 1003])  # 16 lanes, 8, one at a time
def test_the_norms_match_torch(kernels, dtype, size):
    """CpuOps' one-call norms against TorchOps: the residual sum bit-equal (one rounding of
    the same float32 sum), the norms within rounding of the reduction order."""
    from shard.models.ops import CpuOps, TorchOps, ops_for

    assert isinstance(ops_for(torch.device("cpu")), CpuOps)
    gen = torch.Generator().manual_seed(size)
    hidden, delta = (torch.randn(5, size, generator=gen).to(dtype) * 3 for _ in range(2))
    weight = torch.randn(size, generator=gen).to(dtype)
    ours, ref = CpuOps(kernels), TorchOps()
    before = hidden.clone()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert _relative(ours.norm(hidden, weight, 1e-5), ref.norm(hidden, weight, 1e-5)) < tolerance
    total, normed = ours.add_norm(hidden, delta, weight, 1e-6)
    ref_total, ref_normed = ref.add_norm(hidden, delta, weight, 1e-6)
    assert torch.equal(total, ref_total) and normed.dtype == dtype
    assert _relative(normed, ref_normed) < tolerance
    assert torch.equal(hidden, before)  # the residual is a new tensor
    strided = torch.randn(5, 2 * size, generator=gen).to(dtype)[:, :size]  # on a copy
    got = ours.norm(strided, weight, 1e-5)
    assert torch.equal(got, ours.norm(strided.contiguous(), weight, 1e-5))
    assert _relative(got, ref.norm(strided, weight, 1e-5)) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (80, 80), (16, 12)])
def test_rotary_and_silu_match_torch(kernels, dtype, head_dim, rotary_dim):
    """Strided rows of a fused q/k tensor and partial rotary (Phi-4-mini's): the same
    roundings as the torch form, so bfloat16 equal to it (every product and sum rounded
    where torch rounds, in 16 lanes, 8 and one at a time: halves of 32, 40 and 6) and
    float32 up to float32 contraction in one ulp."""
    from shard.models.ops import CpuOps, TorchOps
    from shard.models.rope import Rotary

    rotary = Rotary(head_dim, 512, 10000.0, None, dtype, torch.device("cpu"),
                    rotary_dim=rotary_dim)  # fmt: skip
    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(6, 7, head_dim, generator=gen).to(dtype)
    qk = qkv[:, :5]  # rows strided: v's heads follow
    positions = torch.tensor([0, 1, 2, 100, 300, 511])
    ours, ref = CpuOps(kernels), TorchOps()
    got = ours.rotate(qk, ours.rotary_state(positions, rotary))
    want = ref.rotate(qk, ref.rotary_state(positions, rotary))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert got.shape == want.shape and _relative(got, want) < tolerance
    assert dtype == torch.float32 or torch.equal(got, want)
    gate_up = torch.randn(3, 2 * 96, generator=gen).to(dtype) * 4
    assert _relative(ours.silu_mul(gate_up), ref.silu_mul(gate_up)) < tolerance


def test_bf16_silu_rounds_as_the_torch_form(kernels):
    """bfloat16 SiLU-gate, 8 lanes at a time and then the tail: SiLU rounded to bfloat16,
    times up, rounded again (to nearest even), as torch's bfloat16 ops round; equal to them
    on 10,000 random gates, a NaN gate giving NaN."""
    from shard.models.ops import TorchOps

    gen = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(4, 2 * 1251, generator=gen) * 4).bfloat16()
    gate_up[0, 3] = float("nan")
    got, want = kernels.silu_mul(gate_up), TorchOps().silu_mul(gate_up)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[0, 3].isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_exp_extremes_in_silu_and_softmax(kernels):
    """The AVX2 exponential clamps its input (e^x stays a normal float32): SiLU of gates far
    past +-88 and softmax over scores hundreds apart still match torch."""
    gates = torch.tensor([-500.0, -200.0, -90.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0,
                          90.0, 200.0, 500.0, 3.0, -3.0, 0.5])  # fmt: skip
    gate_up = torch.cat([gates, torch.linspace(-2, 2, 16)]).view(1, 32)
    from shard.models.ops import CpuOps, TorchOps

    got, want = CpuOps(kernels).silu_mul(gate_up), TorchOps().silu_mul(gate_up)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-30) and torch.isfinite(got).all()
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(4, 16, 1, 64, generator=gen) * 30  # scores spread over thousands
    v_cache = torch.randn(4, 16, 1, 64, generator=gen)
    q = torch.randn(1, 2, 64, generator=gen) * 30
    tables, context = torch.tensor([[1, 2, 3]]), torch.tensor([37])
    out = cpu_kernels.paged_decode(q, k_cache, v_cache, tables, context, 0.125)
    ref = _gathered_sdpa(q, k_cache, v_cache, tables, context, 0.125)
    assert torch.isfinite(out).all() and _relative(out, ref) < 1e-5


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_engine_tokens_with_and_without_kernels(tiny_model_dir, kernels):
    """Every CPU kernel off (attention, single rows, norms) against every one on."""
    from shard.models.ops import TorchOps

    plain = make_engine(tiny_model_dir, cpu_gemv=False)
    plain.runner.backend.use_cpu_kernel = False
    plain.runner.model.ops = TorchOps()
    fast = make_engine(tiny_model_dir)
    for batch in ([PROMPTS[0]], PROMPTS):
        specs = [spec(i, p, 8, ignore_eos=True) for i, p in enumerate(batch)]
        expected = run_to_end(plain, 1, specs)
        specs = [spec(i, p, 8, ignore_eos=True) for i, p in enumerate(batch)]
        got = run_to_end(fast, 1, specs)
        assert got.tokens == expected.tokens
        for i in got.logprobs:
            assert (
                max(abs(a - b) for a, b in zip(got.logprobs[i], expected.logprobs[i], strict=True))
                < 1e-4
            )


def test_without_a_compiler_the_torch_path_serves(monkeypatch, caplog):
    import torch.utils.cpp_extension as extension

    from shard.attention import AttentionInputs
    from shard.attention.reference import ReferenceBackend

    def no_compiler(**_kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpu_kernels, "_state", {})  # forget the module built earlier
    monkeypatch.setattr(cpu_kernels, "_built", lambda name: None)  # a machine with none built
    monkeypatch.setattr(extension, "load", no_compiler)
    assert cpu_kernels.load() is None
    assert "CPU decode kernel unavailable" in caplog.text and "no C++ compiler" in caplog.text
    decode = AttentionInputs([0], [1], [5], torch.tensor([21]), torch.tensor([[1]]), 16)
    meta = ReferenceBackend().prepare(decode)
    assert meta.decode_tables is None and meta.decode_blocks is not None  # gather + SDPA
    assert Linear(torch.randn(8, 4), gemv=True).plain is None


def test_a_built_kernel_loads_from_another_checkout_without_a_compiler(kernels, tmp_path):
    """The module `make install` built is imported as it is: a shard whose source sits at
    another path (another checkout, a worktree) and that has no compiler still gets it (torch's
    builder alone compiled again there: ~50 s at a fresh checkout's first start)."""
    import os
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "csrc"
    shutil.copytree(cpu_kernels.CSRC, copy)
    code = (
        "import pathlib, shard.cpu_kernels as k; "
        f"k.CSRC = pathlib.Path({str(copy)!r}); "
        "print('loaded' if k.load() is not None else 'none')"
    )
    env = {**os.environ, "PATH": str(tmp_path), "CXX": "/no/c++", "CC": "/no/cc"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "loaded", result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(
    "avx512f" not in cpu_kernels.cpu_flags().split(),
    reason="no AVX-512 here: the other tests run the AVX2 forms of the kernels already",
)
def test_the_avx2_forms_of_the_kernels_on_an_avx512_cpu():
    """An AVX-512 CPU compiles the 16-lane products (quant.cpp); the AVX2 ones, which other
    CPUs run, are built here too (PYTGI_CPU_KERNEL_CFLAGS=-mno-avx512f, a module of its own)
    and the kernel tests run against them in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTGI_CPU_KERNEL_CFLAGS": "-mno-avx512f"}
    selection = "not avx2_forms and not engine and not serves and not shards and not smollm2"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection,
         "tests/test_cpu_kernels.py", "tests/test_quant.py"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    print(result.stdout.strip().splitlines()[-1])
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("vocab", [7, 49152, 1000 + 3])  # under one vector, SmolLM2's, a tail
def test_greedy_is_torchs_argmax_and_logprob(kernels, rows, vocab):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 5
    ids, logprobs = kernels.greedy(logits)
    assert torch.equal(ids, logits.argmax(-1))
    expected = logits.max(-1).values - torch.logsumexp(logits, -1)
    assert torch.allclose(logprobs, expected, atol=2e-6, rtol=0)


def test_greedy_takes_the_first_of_equal_maxima_and_masked_rows(kernels):
    """Ties: the first index (torch's argmax); -inf logits (a grammar's mask) add nothing;
    a strided view of rows; an empty batch."""
    logits = torch.full((3, 100), float("-inf"))
    logits[0, [9, 40]] = 1.5
    logits[1, [3, 17, 18]] = torch.tensor([0.5, 2.0, 2.0])
    logits[2, 99] = -2.0
    ids, logprobs = kernels.greedy(logits)
    assert ids.tolist() == [9, 17, 99]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).max(-1).values)
    wide = torch.randn(4, 300)
    ids, _ = kernels.greedy(wide[:, :150])
    assert torch.equal(ids, wide[:, :150].argmax(-1))
    ids, logprobs = kernels.greedy(torch.empty(0, 50))
    assert ids.shape == (0,) and logprobs.shape == (0,)


def _runs_beside_python(call) -> bool:
    """Whether this thread ran Python while `call` (tens of ms) computed on another: it
    wakes from a short sleep during the call, which with the GIL held it could only do after
    the call returned."""
    started, ended = threading.Event(), []

    def run() -> None:
        started.set()
        call()
        ended.append(time.perf_counter())

    thread = threading.Thread(target=run)
    thread.start()
    started.wait()
    time.sleep(0.001)  # with the GIL held, this thread runs again only after the call
    woke = time.perf_counter()
    thread.join()
    return woke < ended[0]


def _stack_step(kernels, layers: int = 3, hidden: int = 1024, rows: int = 32):
    """A DecodeStack of `layers` copies of one float32 layer (16 heads over 4 KV heads of 64,
    intermediate 4 x hidden) and a step of `rows` requests of one token: (stack, args)."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, inter = 16, 4, 64, 4 * hidden

    def plain(n, k):
        return kernels.projection(0, torch.randn(n, k, generator=gen) / k**0.5, n=n)

    stack = kernels.DecodeStack(heads, kv_heads, dim, 1e-5, dim**-0.5, torch.ones(hidden))
    projections = [
        plain((heads + 2 * kv_heads) * dim, hidden), plain(hidden, heads * dim),
        plain(2 * inter, hidden), plain(hidden, inter),
    ]  # fmt: skip
    for _ in range(layers):
        stack.add_layer(torch.ones(hidden), torch.ones(hidden), *projections, 0, None, None)
    cache = torch.zeros(rows + 1, 16, kv_heads, dim)
    args = (
        torch.randn(rows, hidden, generator=gen), torch.ones(rows, dim // 2),
        torch.zeros(rows, dim // 2), torch.arange(1, rows + 1) * 16,
        torch.arange(1, rows + 1).unsqueeze(1), torch.ones(rows, dtype=torch.int64),
        [cache] * layers, [cache.clone()] * layers, [1.0] * layers, [1.0] * layers,
    )  # fmt: skip
    return stack, args


def test_kernels_run_without_the_gil(kernels):
    """The kernels release the GIL while they compute, so the shard's gRPC handlers (its
    event loop's thread) run during a step on the engine's thread: the decode step, the
    products, the attention. Each call here takes tens of milliseconds."""
    stack, args = _stack_step(kernels)
    x, w = torch.randn(32, 4096), torch.randn(4096, 4096)
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn(4097, 16, 4, 64, generator=gen) for _ in range(2))
    q = torch.randn(16, 64, 64, generator=gen)  # 16 query heads a KV head
    tables = torch.arange(1, 4097).view(16, 256)
    context = torch.full((16,), 256 * 16)
    calls = {
        "DecodeStack.forward": lambda: stack.forward(*args),
        "linear_small": lambda: kernels.linear_small(x, w),
        "paged_decode": lambda: kernels.paged_decode(
            q, k_cache, v_cache, tables, context, 0.125, 0, 0.0, 1.0, 1.0
        ),
    }
    held = [name for name, call in calls.items() if not _runs_beside_python(call)]
    assert not held, f"{held} held the GIL while computing"
