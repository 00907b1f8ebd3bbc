"""Attention backends against the reference: the Triton kernels (under TRITON_INTERPRET=1 on
CPU), the Triton and flash-attn backends on mixed batches, and whole-engine greedy tokens."""

from __future__ import annotations

import sys

import pytest
import torch

from shard.attention import AttentionInputs, get_backend
from shard.errors import ModelLoadError
from tests import fake_flash_attn
from tests.helpers import make_engine, run_to_end, spec

pytest.importorskip("triton")
from shard.attention.triton_kernels import paged_decode, write_kv  # noqa: E402

BLOCK = 16


def _reference_decode(q, k_cache, v_cache, tables, context, window=0, softcap=0.0):
    """float64 attention of each row over its first `context` slots (the last `window`),
    scores soft-capped when `softcap`."""
    outs = []
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    for i, ctx in enumerate(context.tolist()):
        first = max(0, ctx - window) if window else 0
        slots = [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for p in range(first, ctx)]
        keys = k_cache.view(-1, num_kv_heads, head_dim)[slots].double()
        values = v_cache.view(-1, num_kv_heads, head_dim)[slots].double()
        q_i = q[i].double().view(num_kv_heads, group, head_dim)
        scores = q_i @ keys.permute(1, 2, 0) * head_dim**-0.5  # [KVH, G, ctx]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out = torch.softmax(scores, -1) @ values.transpose(0, 1)
        outs.append(out.reshape(-1, head_dim))
    return torch.stack(outs)


def _relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("window", [0, 20])  # 20: short of most contexts, across blocks
@pytest.mark.parametrize("splits", [None, 3, 12])  # 12: most splits past every context
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 16)])
def test_paged_decode_matches_reference(
    dtype, tolerance, heads, kv_heads, head_dim, splits, window
):
    """Contexts at block and split edges (1, 16/17, 64/65 keys), scattered blocks; one pass
    or the context cut into splits (64 keys each here) merged by log-sum-exp."""
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    num_blocks = 48
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    context = torch.tensor([1, 16, 17, 64, 65, 150], dtype=torch.int32)
    tables = torch.zeros(len(context), 12, dtype=torch.int32)
    for i in range(len(context)):  # scattered, shared and out-of-order blocks
        tables[i] = torch.randperm(num_blocks - 1, generator=gen)[:12] + 1
    q = torch.randn(len(context), heads, head_dim, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))  # every element must be written
    scale = head_dim**-0.5
    paged_decode(q, k_cache, v_cache, tables, context, scale, out=out, splits=splits, window=window)
    assert not out.isnan().any()
    ref = _reference_decode(q, k_cache, v_cache, tables, context, window)
    assert _relative_error(out, ref) < tolerance


def check_paged_prefill(
    shapes, heads, kv_heads, head_dim, dtype, tolerance, device="cpu", window=0
):
    """paged_prefill over requests of (cached, new) tokens in scattered blocks, on `device`,
    against float64 attention; a foreign row after each request must stay untouched."""
    from shard.attention.triton_kernels import PREFILL_TOKENS, paged_prefill, prefill_programs

    gen = torch.Generator().manual_seed(heads * 10 + head_dim)
    per_request = max(-(-(cached + new) // BLOCK) for cached, new in shapes)
    num_blocks = len(shapes) * per_request + 1
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.stack(
        [torch.randperm(num_blocks - 1, generator=gen)[:per_request] + 1 for _ in shapes]
    )
    starts, row = [], 0
    for _, new in shapes:
        starts.append(row)
        row += new + 1  # one foreign row after each request
    q = torch.randn(row, heads, head_dim, generator=gen).to(dtype)
    programs = prefill_programs(
        starts, [n for _, n in shapes], [c for c, _ in shapes], range(len(shapes)), PREFILL_TOKENS
    )
    assert len(programs) == sum(-(-new // PREFILL_TOKENS) for _, new in shapes)
    out = torch.full_like(q, float("nan")).to(device)
    on_device = [t.to(device) for t in (q, k_cache, v_cache, tables.to(torch.int32))]
    programs_t = torch.tensor(programs, dtype=torch.int32, device=device)
    paged_prefill(*on_device, programs_t, head_dim**-0.5, out, window)
    out = out.cpu()
    for i, (cached, new) in enumerate(shapes):
        rows = slice(starts[i], starts[i] + new)
        expected = torch.stack(
            [
                _reference_decode(
                    q[starts[i] + t : starts[i] + t + 1],
                    k_cache,
                    v_cache,
                    tables[i : i + 1],
                    torch.tensor([cached + t + 1]),
                    window,
                )[0]
                for t in range(new)
            ]
        )
        assert _relative_error(out[rows], expected) < tolerance, (cached, new)
        assert out[starts[i] + new].isnan().all()  # the foreign row


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 16)])
def test_paged_prefill_matches_reference(dtype, tolerance, heads, kv_heads, head_dim):
    """No prefix, a prefix inside a block, new tokens across several 16-token programs."""
    shapes = [(0, 17), (5, 16), (33, 40), (0, 2), (70, 3)]  # (cached, new) per request
    check_paged_prefill(shapes, heads, kv_heads, head_dim, dtype, tolerance)


@pytest.mark.parametrize("window", [1, 7, 20])
def test_paged_prefill_with_a_sliding_window(window):
    shapes = [(0, 17), (5, 16), (33, 40), (70, 3)]
    check_paged_prefill(shapes, 4, 2, 32, torch.float32, 1e-5, window=window)


@pytest.mark.parametrize(
    "rows, kv_heads, max_context, splits",
    [
        (1, 8, 256, 1),  # short contexts: one pass
        (1, 8, 511, 1),
        (1, 8, 4096, 16),  # 33 wanted to fill the GPU, 4096 / 256 allowed
        (4, 8, 4160, 9),  # 264 / 32 programs
        (1, 1, 131072, 32),  # capped
        (64, 8, 131072, 1),  # 512 programs fill the GPU already
    ],
)
def test_decode_splits(rows, kv_heads, max_context, splits):
    from shard.attention.triton_kernels import decode_splits

    assert decode_splits(rows, kv_heads, max_context) == splits


def test_write_kv_skips_padding_slots_and_reads_strided_rows():
    kv_heads, head_dim = 3, 16
    k_cache = torch.randn(8, BLOCK, kv_heads, head_dim)
    v_cache = torch.randn(8, BLOCK, kv_heads, head_dim)
    packed = torch.randn(5, 9 + 2 * kv_heads, head_dim)  # q, k, v heads of a packed QKV
    k, v = packed[:, 9 : 9 + kv_heads], packed[:, 9 + kv_heads :]
    slots = torch.tensor([3, -1, 70, 71, 127])
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    expect_k.view(-1, kv_heads, head_dim)[slots[keep]] = k[keep]
    expect_v.view(-1, kv_heads, head_dim)[slots[keep]] = v[keep]
    write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


def _mixed_batch(block_size: int):
    """Three requests: one decoding (39 cached), one plain prefill (20 new), one prefill of
    10 new after a 2-block cached prefix. Returns inputs and the new q, k, v."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim = 6, 2, 16
    query_lens, cache_lens = [1, 20, 10], [39, 0, 2 * block_size]
    tables, slots, next_block = [], [], 1
    for q_len, cached in zip(query_lens, cache_lens, strict=True):
        needed = -(-(q_len + cached) // block_size)
        blocks = list(range(next_block, next_block + needed))
        next_block += needed
        tables.append(blocks)
        slots += [
            blocks[p // block_size] * block_size + p % block_size
            for p in range(cached, cached + q_len)
        ]
    width = max(len(t) for t in tables)
    inputs = AttentionInputs(
        query_starts=[0, 1, 21],
        query_lens=query_lens,
        cache_lens=cache_lens,
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        block_size=block_size,
    )
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    caches = [
        torch.randn(next_block + 1, block_size, kv_heads, head_dim, generator=gen) for _ in range(2)
    ]
    return inputs, q, k, v, caches


def _run_backend(backend, inputs, q, k, v, caches):
    k_cache, v_cache = (c.clone() for c in caches)
    meta = backend.prepare(inputs)
    backend.store_kv(k_cache, v_cache, k, v, meta)
    out = backend.attend(q, k, v, k_cache, v_cache, meta, q.shape[-1] ** -0.5)
    return out, k_cache, v_cache


def _brute_force(inputs, q, k_cache, v_cache, window, softcap=0.0):
    """float64: each new token at position p against the cache's keys up to p (the last
    `window`), one at a time."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, start in enumerate(inputs.query_starts):
        for t in range(inputs.query_lens[i]):
            position = inputs.cache_lens[i] + t
            table = inputs.block_tables[i : i + 1]
            row = q[start + t : start + t + 1]
            context = torch.tensor([position + 1])
            expected = _reference_decode(row, k_cache, v_cache, table, context, window, softcap)
            out[start + t] = expected[0]
    return out


@pytest.mark.parametrize(
    "window, softcap", [(1, 0.0), (5, 0.0), (16, 0.0), (40, 0.0), (0, 2.0), (5, 1.5)]
)
@pytest.mark.parametrize("name", ["reference", "reference-torch", "triton", "flash-attn"])
def test_window_and_softcap_in_every_backend(name, window, softcap, fake_flash):
    """Decode, plain prefill and prefill after a prefix, each with keys past the window;
    scores soft-capped (small caps, so the cap changes them)."""
    inputs, q, k, v, caches = _mixed_batch(BLOCK)
    backend = get_backend(name.removesuffix("-torch"))
    backend.use_cpu_kernel = not name.endswith("-torch")  # the reference's torch decode path
    k_cache, v_cache = (c.clone() for c in caches)
    meta = backend.prepare(inputs)
    backend.store_kv(k_cache, v_cache, k, v, meta)
    scale = q.shape[-1] ** -0.5
    out = backend.attend(q, k, v, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
    expected = _brute_force(inputs, q, k_cache, v_cache, window, softcap)
    assert _relative_error(out, expected) < 1e-5
    if softcap:
        assert _relative_error(out, _brute_force(inputs, q, k_cache, v_cache, window)) > 1e-3


@pytest.fixture
def fake_flash(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn.as_module())
    monkeypatch.delitem(sys.modules, "shard.attention.flash_backend", raising=False)
    fake_flash_attn.calls.clear()
    return fake_flash_attn.calls


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("name", ["sdpa", "triton", "flash-attn"])
def test_backend_matches_reference_on_mixed_batch(name, block_size, fake_flash):
    inputs, q, k, v, caches = _mixed_batch(block_size)
    ref_out, ref_k, ref_v = _run_backend(get_backend("reference"), inputs, q, k, v, caches)
    backend = get_backend(name)
    assert backend.name == name
    out, k_cache, v_cache = _run_backend(backend, inputs, q, k, v, caches)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert _relative_error(out, ref_out.double()) < 1e-5
    if name == "flash-attn":  # paged reads only where flash-attn 2 allows them
        assert fake_flash == [{"paged": block_size == 256, "rows": 30}]


def test_flash_backend_plain_prefill_passes_new_kv(fake_flash):
    inputs, q, k, v, caches = _mixed_batch(16)
    plain = AttentionInputs([0], [20], [0], inputs.slot_mapping[1:21], inputs.block_tables[1:2], 16)
    backend = get_backend("flash-attn")
    out, _, _ = _run_backend(backend, plain, q[1:21], k[1:21], v[1:21], caches)
    ref, _, _ = _run_backend(get_backend("reference"), plain, q[1:21], k[1:21], v[1:21], caches)
    assert _relative_error(out, ref.double()) < 1e-5
    assert fake_flash == [{"paged": False, "rows": 20}]


def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ModelLoadError, match="unknown attention backend 'nope'"):
        get_backend("nope")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "shard.attention.flash_backend", raising=False)
    with pytest.raises(ModelLoadError, match="'flash-attn' cannot be imported"):
        get_backend("flash-attn")


PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello",
    "In a hole in the ground there lived a hobbit, not a nasty dirty wet hole.",
]


@pytest.mark.parametrize("name", ["triton", "flash-attn"])
def test_engine_greedy_tokens_equal_reference(tiny_model_dir, name, fake_flash):
    reference = make_engine(tiny_model_dir)
    other = make_engine(tiny_model_dir, attention=name)
    assert other.info().attention_impl == name
    specs = [spec(i, p, 6, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    expected = run_to_end(reference, 1, specs).tokens
    specs = [spec(i, p, 6, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    assert run_to_end(other, 1, specs).tokens == expected
